"""The rankwise command, run as a subprocess (happy paths and every bad-argument path), and its parser."""

import inspect
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import make_batches, tiny_cnn
from rankwise.cli.errors import UsageError
from rankwise.cli.parser import CRITERION_CHOICES, build_parser, library_arguments, option_names
from rankwise.ranks import CRITERIA
from safetensors.torch import save_file
from test_io import WritesMarker, crafted_file

COMMAND = [sys.executable, "-m", "rankwise.cli"]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(pathlib.Path(rw.__file__).parents[1])}  # this rankwise


def rankwise(*args, cwd, command=COMMAND):
    return subprocess.run([*command, *args], cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Models and data files in every accepted and several rejected forms."""
    path = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(tiny_cnn().eval(), path / "cnn.pt")
    images = torch.cat(make_batches((32, 3, 8, 8)))
    torch.save(images, path / "images.pt")
    torch.save(list(images.split(64)), path / "batches.pt")
    np.save(path / "images.npy", images.numpy().astype(np.float64))
    np.savez(path / "images.npz", images[:100].numpy(), images[100:].numpy())
    torch.save(nn.Linear(3, 3).state_dict(), path / "state_dict.pt")
    torch.save({"inputs": images}, path / "dict.pt")
    torch.save(torch.zeros(4, 5), path / "wrong_shape.pt")
    torch.save(torch.tensor(1.0), path / "scalar.pt")
    (path / "garbage.pt").write_text("not a pickle")
    (path / "garbage.npy").write_text("not an array")
    (path / "images.csv").write_text("1,2,3")
    (path / "folder").mkdir()
    (path / "empty.pt").write_bytes(b"")
    (path / "text.safetensors").write_text("hello world, not tensors")
    save_file({"w": torch.zeros(2)}, path / "foreign.safetensors")
    rw.save(tiny_cnn(), path / "plain.safetensors")
    rw.save(tiny_cnn(), path / "stored.safetensors", include_architecture=True)
    write_pickled_models(path)
    return path


def write_pickled_models(path):
    """``elsewhere.pt``, whose class lives in a module of another folder, and ``script.pt``,
    whose class was defined in the script that saved it (``__main__``)."""
    (path / "elsewhere").mkdir()
    (path / "elsewhere" / "elsewhere_net.py").write_text(NET_MODULE)
    save = ("import torch, elsewhere_net; torch.save(elsewhere_net.Net(), {!r})\n"
            "exec(open('elsewhere_net.py').read()); torch.save(Net(), {!r})")
    subprocess.run([sys.executable, "-c", save.format(str(path / "elsewhere.pt"), str(path / "script.pt"))],
                   cwd=path / "elsewhere", check=True, timeout=120)


NET_MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

    def forward(self, x):
        return self.body(x)
"""


def test_analyze_prints_the_table_and_writes_html_and_json(folder):
    run = rankwise("analyze", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--html", "report.html",
                   "--json", "report.json", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "learnables_reduction_goal=0.9" in run.stdout and "wrote report.html" in run.stdout
    assert "NeuronPCA" in run.stderr  # the progress bar
    data = json.loads((folder / "report.json").read_text())
    assert data["network"]["analysed_layers"] == ["0", "2", "5"]
    assert (folder / "report.html").read_text().count('<img class="plot') == 5


def test_compress_writes_a_file_that_info_describes_and_rw_load_reads(folder):
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.npy", "--learnables-reduction", "0.5",
                   "--criterion", "variance", "--allocation", "global", "--output", "half.safetensors", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "53.4% removed" in run.stdout
    model = torch.load(folder / "cnn.pt", weights_only=False)
    expected, info = rw.compress_network_using_projection(
        model, [torch.as_tensor(np.load(folder / "images.npy")).float()], learnables_reduction_goal=0.5,
        criterion="variance", allocation="global", verbosity="off")
    loaded = rw.load(folder / "half.safetensors", model=model)
    assert repr(loaded) == repr(expected)
    x = make_batches((4, 3, 8, 8), seed=3)[0]
    torch.testing.assert_close(loaded(x), expected(x), rtol=1e-5, atol=1e-6)
    run = rankwise("info", "half.safetensors", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "ProjectedConv" in run.stdout and "wrapper" in run.stdout
    assert f"{info.learnables_after:,} learnables" in run.stdout
    assert "architecture stored as a pickle" in run.stdout and "mode eval" in run.stdout


def test_compress_to_a_flops_goal_and_info_reports_the_flops(folder):
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--flops-reduction", "0.4",
                   "--criterion", "variance", "--allocation", "global", "--output", "fast.safetensors", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "flops_reduction_goal=0.4" in run.stdout and "FLOPs on the example batch" in run.stdout
    run = rankwise("info", "fast.safetensors", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "projection (flops_reduction_goal=0.4)" in run.stdout and "FLOPs on the example batch" in run.stdout


def test_analyze_reports_flops_goals(folder):
    run = rankwise("analyze", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--flops-reductions", "0.25,0.5",
                   "--json", "flops.json", cwd=folder)
    assert run.returncode == 0, run.stderr
    goals = {g["goal"]: g for g in json.loads((folder / "flops.json").read_text())["goals"]}
    for value in (0.25, 0.5):
        goal = goals[f"flops_reduction_goal={value:g}"]
        assert goal["flops_after"] <= (1 - value) * goal["flops_before"]
    run = rankwise("analyze", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--flops-reductions", "0.25,2",
                   cwd=folder)
    assert run.returncode == 2 and "argument --flops-reductions: expected a number in [0, 1], got '2'" in run.stderr


def test_compress_to_a_latency_goal_and_info_reports_the_measured_latency(folder):
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--latency-reduction", "0.2",
                   "--criterion", "variance", "--allocation", "global", "--output", "faster.safetensors", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "latency_reduction_goal=0.2" in run.stdout and "latency on latency_input (measured)" in run.stdout
    run = rankwise("info", "faster.safetensors", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert "projection (latency_reduction_goal=0.2)" in run.stdout
    assert "latency on the example batch (measured when compressed)" in run.stdout


def test_compress_quietly_unpacked_selected_layers_then_analyze_the_result(folder):
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.npz", "--explained-variance", "0.9",
                   "--layers", "2,5", "--unpack", "--output", "unpacked.safetensors", "--quiet",
                   "--batch-size", "50", cwd=folder)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    spec = rw.io.read_spec(folder / "unpacked.safetensors")
    assert set(spec["layers"]) == {"2", "5"} and all(s["unpacked"] for s in spec["layers"].values())
    run = rankwise("analyze", "unpacked.safetensors", "--data", "batches.pt", "--quiet", "--trust-pickle",
                   "--json", "unpacked.json", cwd=folder)
    assert (run.returncode, run.stdout) == (0, "")
    assert json.loads((folder / "unpacked.json").read_text())["network"]["analysed_layers"][0] == "0"


def test_compress_and_analyze_with_patterns_and_exclude(folder):
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--explained-variance",
                   "0.9", "--layers", "*", "--exclude", "re:[05]", "--output", "middle.safetensors", "--quiet",
                   cwd=folder)
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    assert set(rw.io.read_spec(folder / "middle.safetensors")["layers"]) == {"2"}
    run = rankwise("analyze", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--exclude", "0", "--json",
                   "rest.json",
                   "--quiet", cwd=folder)
    assert run.returncode == 0, run.stderr
    assert json.loads((folder / "rest.json").read_text())["network"]["analysed_layers"] == ["2", "5"]


def test_compress_with_the_loss_criterion_uniform_allocation_and_sequential_correction(folder):
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--learnables-reduction", "0.3",
                   "--criterion", "loss", "--loss", "kl", "--allocation", "uniform", "--correction", "sequential",
                   "--output", "loss.safetensors", "--quiet", cwd=folder)
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    model = torch.load(folder / "cnn.pt", weights_only=False)
    data = torch.load(folder / "images.pt", weights_only=True)
    batches = list(data) if isinstance(data, (list, tuple)) else [data]
    expected, _ = rw.compress_network_using_projection(
        model, batches, learnables_reduction_goal=0.3, criterion="loss", loss_fn="kl", allocation="uniform",
        correction="sequential", verbosity="off")
    loaded = rw.load(folder / "loss.safetensors", model=model)
    x = make_batches((4, 3, 8, 8), seed=4)[0]
    torch.testing.assert_close(loaded(x), expected(x), rtol=1e-5, atol=1e-6)
    run = rankwise("compress", "cnn.pt", "--trust-pickle", "--data", "images.pt", "--explained-variance", "0.9",
                   "--allocation", "uniform", "--output", "bad.safetensors", cwd=folder)
    assert run.returncode == 2 and "--allocation: 'uniform' spreads a learnables, FLOPs or latency reduction goal" in run.stderr


TRUSTED = ["--trust-pickle", "cnn.pt"]
ANALYZE = ["analyze", *TRUSTED, "--data", "images.pt"]
COMPRESS = ["compress", *TRUSTED, "--data", "images.pt", "--output", "x.safetensors"]
BAD_ARGUMENTS = {  # case -> (arguments, what the one-line message says)
    "no command": ([], "the following arguments are required: COMMAND"),
    "unknown command": (["shrink", "cnn.pt"], "invalid choice: 'shrink'"),
    "no data": (["analyze", "cnn.pt"], "the following arguments are required: --data"),
    "missing model": (["analyze", "absent.pt", "--data", "images.pt"], "MODEL: 'absent.pt' does not exist"),
    "model is a folder": (["analyze", "folder", "--data", "images.pt"], "MODEL: 'folder' is a folder"),
    "model unreadable": (["analyze", "garbage.pt", "--data", "images.pt"],
                         "MODEL: 'garbage.pt' is neither a safetensors file nor a torch.save archive; "
                         "give a file written by torch.save(model) or rankwise.save."),
    "model empty": (["analyze", "empty.pt", "--data", "images.pt"],
                    "MODEL: 'empty.pt' is neither a safetensors file nor a torch.save archive"),
    "model text named safetensors": (["analyze", "text.safetensors", "--data", "images.pt"],
                                     "MODEL: 'text.safetensors' is neither a safetensors file nor"),
    "model a zip archive": (["analyze", "images.npz", "--data", "images.pt"],
                            "MODEL: 'images.npz' is a zip archive but not one written by torch.save"),
    "model is a state dict": (["analyze", "state_dict.pt", "--data", "images.pt"],
                              "MODEL: 'state_dict.pt' holds an object of type OrderedDict, not a model"),
    "model pickle not trusted": (["analyze", "cnn.pt", "--data", "images.pt"],
                                 "MODEL: 'cnn.pt' is a torch.save pickle, and unpickling runs code from "
                                 "the file; pass --trust-pickle if you trust it."),
    "rankwise file pickle not trusted": (["analyze", "stored.safetensors", "--data", "images.pt"],
                                         "MODEL: 'stored.safetensors' stores its architecture as a "
                                         "pickle, and unpickling runs code from the file; pass "
                                         "--trust-pickle if you trust it."),
    "rankwise file without architecture": (["analyze", "--trust-pickle", "plain.safetensors", "--data",
                                            "images.pt"],
                                           "MODEL: 'plain.safetensors' stores no architecture, which the "
                                           "command line needs; save it with rw.save(..., "
                                           "include_architecture=True)"),
    "foreign safetensors": (["analyze", "foreign.safetensors", "--data", "images.pt"],
                            "MODEL: 'foreign.safetensors' is a safetensors file but not one written by "
                            "rankwise.save"),
    "model module missing": (["analyze", "--trust-pickle", "elsewhere.pt", "--data", "images.pt"],
                             "MODEL: 'elsewhere.pt' cannot be unpickled (it needs the module "
                             "'elsewhere_net', which cannot be imported: run from the folder that "
                             "holds it or add that folder to PYTHONPATH)"),
    "model class in __main__": (["analyze", "--trust-pickle", "script.pt", "--data", "images.pt"],
                                "the model's class was defined in the script that saved it; move the "
                                "class into a module"),
    "missing data": ([*ANALYZE[:-1], "absent.npy"], "--data: 'absent.npy' does not exist"),
    "data of unknown type": ([*ANALYZE[:-1], "images.csv"], "--data: expected a .pt, .npy or .npz file"),
    "data unreadable": ([*ANALYZE[:-1], "garbage.npy"],
                        "--data: 'garbage.npy' is not a readable .npy file of tensors or arrays "
                        "(numpy.save of an array)"),
    "data empty": ([*ANALYZE[:-1], "empty.pt"], "--data: 'empty.pt' is not a readable .pt file"),
    "data is a dict": ([*ANALYZE[:-1], "dict.pt"], "--data: 'dict.pt' holds an object of type dict"),
    "data is a scalar": ([*ANALYZE[:-1], "scalar.pt"], "--data: 'scalar.pt' holds a scalar"),
    "data the model rejects": ([*ANALYZE[:-1], "wrong_shape.pt"],
                               "--data: the model rejected batch 0"),
    "quiet analysis writes nothing": ([*ANALYZE, "--quiet"],
                                      "--quiet: with neither --html nor --json, analyze would print"),
    "html not writable": ([*ANALYZE, "--html", "/proc/r.html"], "--html: cannot write '/proc/r.html'"),
    "batch size zero": ([*ANALYZE, "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    "html folder missing": ([*ANALYZE, "--html", "nowhere/r.html"],
                            "--html: the folder 'nowhere' does not exist"),
    "json is a folder": ([*ANALYZE, "--json", "folder"], "--json: 'folder' is a folder"),
    "no goal": (COMPRESS, "one of the arguments --explained-variance --learnables-reduction --flops-reduction --latency-reduction is required"),
    "two goals": ([*COMPRESS, "--explained-variance", "0.9", "--learnables-reduction", "0.5"],
                  "not allowed with argument"),
    "goal above one": ([*COMPRESS, "--explained-variance", "1.5"],
                       "argument --explained-variance: expected a number in [0, 1]"),
    "goal not a number": ([*COMPRESS, "--learnables-reduction", "half"],
                          "argument --learnables-reduction: expected a number"),
    "no output": (["compress", *TRUSTED, "--data", "images.pt", "--explained-variance", "0.9"],
                  "the following arguments are required: --output"),
    "output folder missing": (["compress", *TRUSTED, "--data", "images.pt", "--explained-variance", "0.9",
                               "--output", "nowhere/x.safetensors"],
                              "--output: the folder 'nowhere' does not exist"),
    "unknown layer": ([*COMPRESS, "--explained-variance", "0.9", "--layers", "2,9"],
                      "--layers: '9' is not a layer of the model"),
    "layer not projectable": ([*COMPRESS, "--explained-variance", "0.9", "--layers", "1"],
                              "--layers: '1' cannot be projected"),
    "empty layer name": ([*COMPRESS, "--explained-variance", "0.9", "--layers", "2,,5"],
                         "argument --layers: expected comma"),
    "unknown excluded layer": ([*COMPRESS, "--explained-variance", "0.9", "--exclude", "9"],
                               "--exclude: '9' is not a layer of the model"),
    "exclude everything": ([*ANALYZE, "--exclude", "*"], "--exclude: it leaves no layer to be projected"),
    "bad regular expression": ([*COMPRESS, "--explained-variance", "0.9", "--layers", "re:("],
                               "--layers: 're:(' is not a valid regular expression"),
    "info without file": (["info"], "the following arguments are required: FILE"),
    "info on a missing file": (["info", "absent.safetensors"], "FILE: 'absent.safetensors' does not exist"),
    "info on a torch file": (["info", "cnn.pt"],
                             "FILE: 'cnn.pt' is not a safetensors file (no safetensors header); give a "
                             "file written by rankwise.save."),
}


DRIVER = """
import contextlib, io, json, sys, traceback
from rankwise.cli import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except BaseException:
            status = traceback.format_exc()
    results.append([status, out.getvalue(), err.getvalue()])
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def bad_runs(folder):
    """Every bad-argument case through ``rankwise.cli.main``, in one subprocess (one start-up of
    torch instead of one per case): case -> (exit status or traceback, stdout, stderr)."""
    cases = [arguments for arguments, _ in BAD_ARGUMENTS.values()]
    run = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=folder,
                         env=ENVIRONMENT, capture_output=True, text=True, timeout=300, check=True)
    return dict(zip(BAD_ARGUMENTS, json.loads(run.stdout)))


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_exit_2_with_one_line(bad_runs, folder, case):
    status, stdout, stderr = bad_runs[case]
    assert status == 2, status
    assert stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip() and "NeuronPCA" not in line]
    assert len(lines) == 1 and lines[0].startswith("rankwise: error: "), stderr
    assert BAD_ARGUMENTS[case][1] in lines[0]
    assert not (folder / "x.safetensors").exists()


def test_the_process_exits_2_without_traceback(folder):
    """Through the console script where it is installed (pip install -e .), else ``python -m``."""
    script = pathlib.Path(sys.executable).with_name("rankwise")
    arguments, message = BAD_ARGUMENTS["info on a torch file"]
    run = rankwise(*arguments, cwd=folder, command=[str(script)] if script.exists() else COMMAND)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith("rankwise: error: ") and run.stderr.count("\n") == 1
    assert message in run.stderr and "Traceback" not in run.stderr


def test_info_describes_truncated_and_resized_layers(tmp_path, capsys):
    from rankwise.cli import main

    torch.manual_seed(0)
    model = tiny_cnn().eval()
    rw.WidthEvolver(model, make_batches((1, 3, 8, 8))[0], verbosity="off").grow("0", 2)
    truncated, _ = rw.truncate_kernels(model, "tt", order="hiwo", ranks=(2, 4, 3), layer_names=["2"],
                                       verbosity="off")
    projected, _ = rw.compress_network_using_projection(truncated, make_batches((16, 3, 8, 8)),
                                                        layer_names=["5"], verbosity="off")
    rw.save(projected, tmp_path / "mixed.safetensors")
    assert main(["info", str(tmp_path / "mixed.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "no compressed form" not in printed
    assert "TruncatedConv" in printed and "tt hiwo" in printed and "2,4,3" in printed
    assert "ProjectedLinear" in printed and "projection (" in printed
    assert "in_channels=3, out_channels=10" in printed and "layer sizes" in printed


def test_a_crafted_pickle_never_runs_without_trust_pickle(tmp_path):
    """A .safetensors file and a torch.save file whose pickles would write ``marker``: refused
    with exit status 2 and one line, nothing written; trusted, the pickle does run."""
    torch.manual_seed(0)
    torch.save(torch.randn(4, 10), tmp_path / "inputs.pt")
    crafted_file(tmp_path, nn.Sequential(nn.Linear(10, 3)))
    torch.save(WritesMarker(tmp_path / "marker"), tmp_path / "crafted.pt")
    for model, message in (("crafted.safetensors", "stores its architecture as a pickle"),
                           ("crafted.pt", "is a torch.save pickle")):
        run = rankwise("analyze", model, "--data", "inputs.pt", cwd=tmp_path)
        assert (run.returncode, run.stdout) == (2, "")
        assert run.stderr == (f"rankwise: error: MODEL: '{model}' {message}, and unpickling runs code "
                              "from the file; pass --trust-pickle if you trust it.\n")
        assert not (tmp_path / "marker").exists()
    run = rankwise("analyze", "crafted.safetensors", "--data", "inputs.pt", "--trust-pickle", cwd=tmp_path)
    assert run.returncode == 2 and "cannot be unpickled" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "marker").exists()  # the crafted pickle is live


def test_a_model_class_in_the_current_folder_is_found_as_python_m_finds_it(tmp_path):
    """``-P``: no folder put on the import path by Python itself, as for the console script."""
    (tmp_path / "local_net.py").write_text(NET_MODULE)
    subprocess.run([sys.executable, "-c", "import torch, local_net; torch.save(local_net.Net(), 'net.pt'); "
                    "torch.save(torch.randn(32, 3, 8, 8), 'inputs.pt')"], cwd=tmp_path, check=True,
                   timeout=120)
    run = rankwise("analyze", "net.pt", "--trust-pickle", "--data", "inputs.pt", "--json", "r.json",
                   "--quiet", cwd=tmp_path, command=[sys.executable, "-P", "-m", "rankwise.cli"])
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    assert json.loads((tmp_path / "r.json").read_text())["network"]["analysed_layers"] == ["body.1"]


def test_version(tmp_path):
    run = rankwise("--version", cwd=tmp_path)
    assert (run.returncode, run.stdout) == (0, f"rankwise {rw.__version__}\n")



COMPRESS_GOAL = ["compress", "m.pt", "--data", "d.pt", "--explained-variance", "0.9", "--output", "o"]


@pytest.mark.parametrize("argv, function", [(["analyze", "m.pt", "--data", "d.pt"], rw.analyze),
                                            (COMPRESS_GOAL, rw.compress_network_using_projection)])
def test_each_library_option_is_an_argument_of_the_function_its_command_calls(argv, function):
    """An option declared with ``Parser.add_library_option`` is passed on under its keyword, and the
    library's errors naming that keyword name the option."""
    args = build_parser().parse_args(argv)
    assert set(library_arguments(args)) <= set(inspect.signature(function).parameters)
    assert option_names(args)["exclude"] == "--exclude" and option_names(args)["model"] == "MODEL"


def test_the_criterion_choices_are_the_registered_criteria():
    assert CRITERION_CHOICES == ("auto", *CRITERIA)
    for name in CRITERIA:
        assert build_parser().parse_args([*COMPRESS_GOAL, "--criterion", name]).criterion == name
    with pytest.raises(UsageError, match="invalid choice: 'nope'"):
        build_parser().parse_args([*COMPRESS_GOAL, "--criterion", "nope"])
