# Each target creates .venv and installs the package on first use (pip: torch comes from this
# machine's disk in about two minutes; uv/poetry would download several GB).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt  # the ranges, and the exact set installed here
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir \
	  -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/transferlab demo

test: setup browser
	$(BIN)/python -m pytest -q

browser:  # Debian's chromium renders report.html in a test (installed when missing)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null

bench: setup  # CPU benchmarks (need ../shared/data); the GPU one is benchmarks/gpu_check.sh
	@for b in precision train_throughput inference_throughput scaling; do \
	  echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
