# Two entry points, both safe on a fresh clone with only Python installed:
#   make test   create .venv, install engram with its test extras, run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/hashing.py
	$(PY) benchmarks/engram_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
