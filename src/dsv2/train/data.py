"""Pretraining data: text / JSONL / directories -> one memory-mapped token file -> shuffled packed blocks.

Documents are tokenized once (the tokenizer's BOS if it adds one, then the text, then EOS) and concatenated.
Block i is tokens[i*L : i*L + L + 1]: inputs are its first L tokens, targets its last L, so consecutive
blocks share one token and every token after the first is a target exactly once per epoch. Blocks are
visited in a seeded permutation per epoch; the loader's position (epoch, index) is its whole state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from dsv2.tokenizer import NAMED_TOKENIZERS, Tokenizer, named_tokenizer_dir, train_bpe

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
_ENCODE_CHUNK = 256  # documents per encode_batch call: big enough for the Rust core to use every thread


class DataError(ValueError):
    """Missing, empty or malformed training input."""


@dataclass(frozen=True)
class TokenFile:
    path: Path
    n_tokens: int
    dtype: str

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def input_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The files to read, in a fixed order: each path itself, or a directory's text/JSONL files (recursive)."""
    if not paths:
        raise DataError("no training data given (data.paths is empty)")
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return out


def documents(file: Path, text_field: str = "text") -> Iterator[str]:
    """A JSONL file yields each line's `text_field`; any other file is one document."""
    if file.suffix not in JSONL_SUFFIXES:
        try:
            yield file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e})") from e
        return
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield _jsonl_text(line, text_field, f"{file}:{line_no}")


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{where}: expected an object with a string {text_field!r} field")
    return record[text_field]


def tokenize_to_file(paths: list[str | os.PathLike], tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                     text_field: str = "text", progress: bool = True) -> TokenFile:
    """Tokenize `paths` into cache_dir/tokens-<fingerprint>.bin, or reuse it if the inputs are unchanged."""
    files = input_files(paths)
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache / f"tokens-{_fingerprint(files, tokenizer, text_field)}"
    meta_path = stem.with_suffix(".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TokenFile(stem.with_suffix(".bin"), meta["n_tokens"], meta["dtype"])
    n = _write_tokens(files, tokenizer, text_field, stem.with_suffix(".bin"), dtype, progress)
    if n < 2:
        stem.with_suffix(".bin").unlink()
        raise DataError(f"the training data ({', '.join(map(str, files))}) holds no text to train on")
    _atomic_write_text(meta_path, json.dumps({"n_tokens": n, "dtype": dtype, "files": [str(f) for f in files]}))
    return TokenFile(stem.with_suffix(".bin"), n, dtype)


def _write_tokens(files: list[Path], tokenizer: Tokenizer, text_field: str, out: Path, dtype: str,
                  progress: bool) -> int:
    tmp = out.with_suffix(".bin.tmp")
    n = 0
    total = sum(f.stat().st_size for f in files)
    with open(tmp, "wb") as sink, tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                                       disable=not progress) as bar:
        for file in files:
            batch: list[str] = []
            for doc in documents(file, text_field):
                batch.append(doc)
                if len(batch) == _ENCODE_CHUNK:
                    n += _append(sink, tokenizer, batch, dtype)
                    batch = []
            n += _append(sink, tokenizer, batch, dtype)
            bar.update(file.stat().st_size)
    os.replace(tmp, out)
    return n


def _append(sink: BinaryIO, tokenizer: Tokenizer, texts: list[str], dtype: str) -> int:
    texts = [t for t in texts if t.strip()]
    if not texts:
        return 0
    ids = np.fromiter((i for doc in tokenizer.encode_batch(texts, add_eos=True) for i in doc), dtype=dtype)
    ids.tofile(sink)
    return ids.size


def _fingerprint(files: list[Path], tokenizer: Tokenizer, text_field: str) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(tokenizer.backend.to_str().encode())
    h.update(f"{tokenizer.add_bos_token}{tokenizer.eos_id}{text_field}".encode())
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class BlockLoader:
    """Packed blocks of seq_len + 1 tokens in a seeded per-epoch order, resumable at an exact position."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_blocks = (len(tokens) - 1) // seq_len
        if self.n_blocks == 0:
            raise DataError(f"{len(tokens)} tokens do not fill one block of {seq_len} + 1")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def next_ids(self, n: int) -> np.ndarray:
        """The block ids of the next n sequences (crossing into the next epoch if needed)."""
        out = []
        while n:
            take = min(n, self.n_blocks - self.index)
            out.append(self._order[self.index:self.index + take])
            self.index, n = self.index + take, n - take
            if self.index == self.n_blocks:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return np.concatenate(out)

    def blocks(self, ids: np.ndarray) -> np.ndarray:
        """(n, seq_len + 1) int64 token blocks."""
        L = self.seq_len
        return np.stack([self.tokens[i * L:i * L + L + 1] for i in ids]).astype(np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_blocks"] != self.n_blocks or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data ({state['n_blocks']} blocks, seed {state['seed']}) is not this "
                            f"run's ({self.n_blocks} blocks, seed {self.seed}); same data, seq_len and seed needed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def load_tokenizer(spec: str, paths: list[str | os.PathLike], out_dir: str | os.PathLike,
                   text_field: str = "text") -> tuple[Tokenizer, Path]:
    """A tokenizer and the directory holding its files. spec: a name Tokenizer.from_name knows, a directory,
    or "bpe:N" to train an N-entry byte-level BPE on the training data once, into out_dir/tokenizer."""
    if spec in NAMED_TOKENIZERS:
        return Tokenizer.from_name(spec), named_tokenizer_dir(spec)
    if spec.startswith("bpe:"):
        target = Path(out_dir) / "tokenizer"
        if not (target / "tokenizer.json").is_file():
            _train_bpe(int(spec.removeprefix("bpe:")), input_files(paths), target, text_field)
        return Tokenizer.from_dir(target), target
    if not Path(spec).is_dir():
        raise DataError(f"data.tokenizer {spec!r} is neither a known name ({', '.join(NAMED_TOKENIZERS)}), "
                        f"'bpe:N', nor a directory")
    return Tokenizer.from_dir(spec), Path(spec)


def _train_bpe(vocab_size: int, files: list[Path], target: Path, text_field: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    # train_bpe reads plain text: JSONL documents are written out first, one temporary text file.
    corpus = target / "bpe-corpus.txt.tmp"
    with open(corpus, "w", encoding="utf-8") as f:
        for file in files:
            for doc in documents(file, text_field):
                f.write(doc + "\n")
    try:
        train_bpe([corpus], vocab_size, target, show_progress=False)
    finally:
        corpus.unlink()
