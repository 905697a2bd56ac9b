"""Training data: tokenize once into a memmap, pack into blocks, shuffle by seed, resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dsv2.tokenizer import Tokenizer
from dsv2.train.data import BlockLoader, DataError, tokenize_to_file


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_name("deepseek-v2")


def test_text_jsonl_and_directories_tokenize_to_one_stream(tmp_path: Path, tok: Tokenizer) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("The first document.")
    (corpus / "sub" / "b.jsonl").write_text(json.dumps({"text": "Second one."}) + "\n\n"
                                            + json.dumps({"text": "Third.", "id": 3}) + "\n")
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    tf = tokenize_to_file([corpus], tok, tmp_path / "cache", progress=False)
    want = [i for doc in ("The first document.", "Second one.", "Third.") for i in tok.encode(doc, add_eos=True)]
    assert tf.dtype == "uint32" and tf.tokens().tolist() == want
    # a second call reuses the file instead of tokenizing again
    assert tokenize_to_file([corpus], tok, tmp_path / "cache", progress=False) == tf
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1


@pytest.mark.parametrize(("content", "message"), [
    ("", "holds no text"),
    ("{not json}\n", r"bad.jsonl:1: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl:2: expected an object with a string 'text' field"),
])
def test_bad_input_is_a_clear_error(tmp_path: Path, tok: Tokenizer, content: str, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=message):
        tokenize_to_file([bad], tok, tmp_path / "cache", progress=False)


def test_missing_paths_are_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(DataError, match="no such file"):
        tokenize_to_file([tmp_path / "nope.txt"], tok, tmp_path / "cache", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        tokenize_to_file([tmp_path / "empty"], tok, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="no training data"):
        tokenize_to_file([], tok, tmp_path / "cache", progress=False)


def test_blocks_pack_the_stream_and_each_epoch_is_a_permutation() -> None:
    tokens = np.arange(41, dtype=np.uint16)  # 41 tokens -> (41 - 1) // 8 = 5 blocks of 8 + 1
    loader = BlockLoader(tokens, seq_len=8, seed=3)
    assert loader.n_blocks == 5
    assert loader.blocks(np.array([2])).tolist() == [list(range(16, 25))]
    first = loader.next_ids(3)
    rest = loader.next_ids(4)  # 2 from epoch 0, then 2 from epoch 1
    assert sorted(first.tolist() + rest[:2].tolist()) == [0, 1, 2, 3, 4]
    assert (loader.epoch, loader.index) == (1, 2)
    assert not np.array_equal(BlockLoader(tokens, 8, seed=3).next_ids(5), BlockLoader(tokens, 8, seed=4).next_ids(5))


def test_loader_resumes_from_its_state() -> None:
    tokens = np.arange(1000, dtype=np.uint32)
    a = BlockLoader(tokens, seq_len=16, seed=0)
    a.next_ids(50)
    state = a.state_dict()
    b = BlockLoader(tokens, seq_len=16, seed=0)
    b.load_state_dict(state)
    assert np.array_equal(a.next_ids(37), b.next_ids(37))
    with pytest.raises(DataError, match="same data, seq_len and seed"):
        BlockLoader(tokens, seq_len=16, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="do not fill one block"):
        BlockLoader(tokens[:10], seq_len=16, seed=0)
