# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
# TORCH_SPEC overrides the torch requirement (e.g. TORCH_SPEC="torch==2.5.1" or a CUDA wheel URL).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# DiffDRR is a reference renderer for tests and `svdrr bench`; installed without its dependencies because they
# would replace the CPU torch with a CUDA build and add torchvision.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "diffdrr==0.6.1"
	$(PY) -m pip install --quiet torchio fastcore einops pandas
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m SVDRRLogic demo -o demo-output

# pytest exits 5 when it collected nothing: that is a failure, never a pass.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m SVDRRLogic bench

clean:
	rm -rf $(VENV) demo-output
