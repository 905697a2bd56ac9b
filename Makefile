VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.13.0

.PHONY: install test bench tiny-model clean

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

# The whole recipe on this machine (about 10 minutes on 2 cores): corpus -> BPE + pretraining -> SFT -> GRPO -> eval.
TINY ?= runs/tiny
tiny-model: install
	$(PY) -m dsv2.train.tasks data/tiny --stdlib
	$(PY) -m dsv2.cli train --config recipes/tiny.toml --train.out_dir=$(TINY)/pretrain \
		--data.paths='["data/tiny/stdlib.jsonl", "data/tiny/train-text.jsonl"]'
	$(PY) -m dsv2.cli sft --model $(TINY)/pretrain/final --data data/tiny/train-sft.jsonl --out $(TINY)/sft --steps 200
	$(PY) -m dsv2.cli grpo --model $(TINY)/sft/final --data data/tiny/train-grpo.jsonl --out $(TINY)/grpo --steps 50
	$(PY) -m dsv2.cli eval --model $(TINY)/grpo/final --arith 200

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
