# Two entry points on a fresh machine: `make demo` (the quickstart study) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/cxr-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/cxr-ray

# The quickstart's external site: synthetic PNG films and their manifest (studies/quickstart.yaml), at
# the study's 48 px, so that the files hold exactly the drawings a synthetic source of that site would.
SITE := runs/sites/othersite

$(SITE)/manifest.csv: | $(BIN)/cxr-ray
	$(BIN)/cxr-ray data synthetic $(SITE) --size 48

demo: install $(SITE)/manifest.csv
	$(BIN)/cxr-ray study run studies/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q --durations=30

bench: install
	$(BIN)/python benchmarks/bench_engines.py
	$(BIN)/python benchmarks/bench_asha.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_manifest.py --images 20000

clean:
	rm -rf $(VENV) runs compare .pytest_cache
