"""``import rankwise`` needs only the declared dependencies, and loads no optional heavy module."""

import json
import os
import pathlib
import subprocess
import sys

import rankwise as rw

ENVIRONMENT = {**os.environ, "PYTHONPATH": str(pathlib.Path(rw.__file__).parents[1])}  # this rankwise

WITHOUT_TENSORLY = """
import json, sys
sys.modules["tensorly"] = None          # "import tensorly" now raises ImportError
import torch
import rankwise as rw
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
_, info = rw.truncate_kernels(model, "cut", ranks=2, verbosity="off")
try:
    rw.truncate_kernels(model, "tucker", ranks=2, verbosity="off")
    message = None
except ImportError as error:
    message = str(error)
print(json.dumps({"cut": info.layer_names, "tucker": message}))
"""

OPTIONAL = ["tensorly", "scipy", "matplotlib", "onnx", "onnxruntime", "onnxscript", "IPython", "transformers"]
LOADED = f"""
import json, sys
import rankwise
print(json.dumps([name for name in {OPTIONAL!r} if name in sys.modules]))
"""


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], env=ENVIRONMENT, capture_output=True,
                          text=True, timeout=300, check=True).stdout


def test_rankwise_imports_and_truncates_without_tensorly():
    result = json.loads(python(WITHOUT_TENSORLY))
    assert result["cut"] == ["0"]
    assert result["tucker"].startswith("method='tucker' and method='cp' need tensorly: pip install tensorly")


def test_import_loads_no_optional_heavy_module():
    assert json.loads(python(LOADED)) == []
