VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.13.0

.PHONY: install test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/load_memory.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/tokenizer.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
