"""SFT: labels on assistant turns only, one conversation per row, the loss falls, `dsv2 sft` writes a checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv2 import Tokenizer, Transformer, load, save
from dsv2.cli import main
from dsv2.tokenizer import train_bpe
from dsv2.train.sft import (IGNORE_INDEX, SFTConfig, collate, epoch_batches, fit, prepare, render_with_labels,
                            sft_loss)
from dsv2.train.tasks import pretrain_record, problems, sft_record, write_jsonl
from tests.conftest import randomize_, small_config

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
    {"role": "user", "content": "And 7 * 6?"},
    {"role": "assistant", "content": "7 * 6 = 42. The answer is 42."},
    {"role": "user", "content": "Thanks!"},
]


def arith_tokenizer(root: Path, vocab_size: int = 320) -> Path:
    """A small byte-level BPE (BOS 0, EOS 1, V2's chat template) trained on arithmetic text, for tiny models;
    returns the directory of its files."""
    text = root / "arith.txt"
    text.write_text("\n".join(pretrain_record(p)["text"] for p in problems("train", 400, seed=9)))
    train_bpe([text], vocab_size, root / "tokenizer", show_progress=False)
    return root / "tokenizer"


def save_with_tokenizer(model: Transformer, tokenizer_dir: Path, out: Path) -> Path:
    save(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


def tiny_model(seed: int = 0) -> Transformer:
    return randomize_(Transformer(small_config(vocab_size=320)), seed=seed, std=0.05)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return arith_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions."""
    out, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def test_labels_cover_exactly_the_assistant_turns() -> None:
    v2 = Tokenizer.from_name("deepseek-v2")
    ids, labels = render_with_labels(v2, CONVERSATION)
    assert v2.decode(ids) == v2.apply_chat_template(CONVERSATION[:5], add_generation_prompt=False)
    assert [label for label in labels if label != IGNORE_INDEX] == [i for i, label in zip(ids, labels)
                                                                   if label != IGNORE_INDEX]
    runs = spans(labels)
    assistant = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    assert [v2.decode(ids[a:b]) for a, b in runs] == [" " + CONVERSATION[i]["content"] + v2.eos_token
                                                      for i in assistant]
    for (start, _), i in zip(runs, assistant):
        # What precedes each answer is token for token the prompt the engine would feed for that turn.
        assert ids[:start] == v2.apply_chat_template(CONVERSATION[:i], add_generation_prompt=True, tokenize=True)


def test_conversations_that_teach_nothing_are_refused_or_dropped(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="assistant"):
        render_with_labels(tok, CONVERSATION[:2])
    with pytest.raises(ValueError, match="start with an assistant"):
        render_with_labels(tok, [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "y"}])
    ids, _ = render_with_labels(tok, CONVERSATION)
    first_answer = spans(render_with_labels(tok, CONVERSATION)[1])[0][0]
    rows = prepare(tok, [CONVERSATION, CONVERSATION], seq_len=first_answer)  # cut before any label
    assert rows == []
    [(cut, cut_labels)] = prepare(tok, [CONVERSATION], seq_len=first_answer + 3)
    assert cut == ids[:first_answer + 3] and len(cut_labels) == first_answer + 3


def test_rows_never_mix_conversations(tok: Tokenizer) -> None:
    rows = prepare(tok, [sft_record(p)["messages"] for p in problems("train", 37, seed=1)], seq_len=256)
    rng = random.Random(0)
    for _ in range(2):
        batches = epoch_batches(rows, 4, rng)
        assert sorted(i for b in batches for i in b) == list(range(len(rows)))
        for batch in batches:
            ids_BT, labels_BT, attn_BT = collate([rows[i] for i in batch], pad_id=1)
            for b, i in enumerate(batch):
                n = len(rows[i][0])
                assert ids_BT[b, :n].tolist() == rows[i][0] and labels_BT[b, :n].tolist() == rows[i][1]
                assert attn_BT[b].tolist() == [1] * n + [0] * (ids_BT.shape[1] - n)
                assert (labels_BT[b, n:] == IGNORE_INDEX).all() and (ids_BT[b] == tok.bos_id).sum() == 1


def test_padded_batch_loss_is_the_token_weighted_mean_of_single_conversations(tok: Tokenizer) -> None:
    """No attention across rows or into padding: the batched loss equals the losses of each conversation alone."""
    model = tiny_model().eval()
    rows = prepare(tok, [sft_record(p)["messages"] for p in problems("train", 5, seed=2)], seq_len=256)
    assert len({len(ids) for ids, _ in rows}) > 1  # padding is really exercised
    nll, count = 0.0, 0
    with torch.no_grad():
        batched = sft_loss(model, *collate(rows, pad_id=1)).item()
        for ids, labels in rows:
            logits = model(torch.tensor([ids]))[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            nll += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert batched == pytest.approx(nll / count, rel=1e-5)


def test_loss_decreases_on_a_tiny_model(tok: Tokenizer) -> None:
    rows = prepare(tok, [sft_record(p)["messages"] for p in problems("train", 32, seed=3)], seq_len=128)
    losses = fit(tiny_model(), rows, SFTConfig(steps=12, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=2),
                 pad_id=1)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]


def test_sft_command_writes_a_loadable_checkpoint(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    model_dir = save_with_tokenizer(tiny_model(), tok_dir, tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, map(sft_record, problems("train", 6, seed=4)))
    out = tmp_path / "run"
    assert main(["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "3", "--seq-len", "96", "--lr", "1e-3"]) == 0
    tuned = load(out / "final", dtype=torch.float32)
    base = load(model_dir, dtype=torch.float32)
    assert not torch.equal(tuned.head.weight, base.head.weight)
    assert Tokenizer.from_dir(out / "final").vocab_size == tok.vocab_size
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
