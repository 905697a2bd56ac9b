"""Long context: the extension stage's data (dsv2.train.longdocs), its recipe, and the needle-in-a-haystack and
loss-by-position evaluation (dsv2.eval.needle, `dsv2 eval --needle`)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dsv2 import Tokenizer, Transformer, load
from dsv2.cli import main
from dsv2.eval.needle import (attention_probs, copy_loss, depth_grid, head_scores, loss_by_position, needle_grid,
                              retrieved, with_context)
from dsv2.train.config import TrainConfig
from dsv2.train.longdocs import Filler, Needle, draw_needle, haystack, package_documents, retrieval_documents
from dsv2.train.trainer import train
from tests.conftest import randomize_, small_config
from tests.test_sft import arith_tokenizer, save_with_tokenizer
from tests.test_train_run import write_corpus

SOURCE = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))
RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-long.toml"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(arith_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def filler(tok: Tokenizer) -> Filler:
    return Filler([SOURCE, SOURCE.replace("return", "yield")], tok)


@pytest.mark.parametrize("length", [128, 300, 777])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_haystack_fits_its_length_and_plants_the_needle_at_its_depth(filler: Filler, tok: Tokenizer,
                                                                       length: int, depth: float) -> None:
    rng = random.Random(f"{length}/{depth}")
    needle = draw_needle(rng)
    text = haystack(filler, needle, length, depth, rng)
    n_tokens = len(tok.encode(text))
    assert length - 24 <= n_tokens <= length  # full, give or take the last line that would not fit
    assert text.endswith(needle.question) and text.count(needle.line) == 1
    lines = text[: -len(needle.question)].splitlines(keepends=True)
    at = lines.index(needle.line)
    assert abs(at / (len(lines) - 1) - depth) <= 1.5 / (len(lines) - 1)
    # The answer a model should give is the key, and the scorer reads it back.
    assert retrieved(needle.answer, needle.key) and not retrieved(needle.answer, needle.key + 1)


def test_haystack_refuses_lengths_without_room_and_bad_depths(filler: Filler) -> None:
    needle = Needle("amber", 12345)
    with pytest.raises(ValueError, match="no room for filler"):
        haystack(filler, needle, 8, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        haystack(filler, needle, 100, 1.5, random.Random(0))


@pytest.mark.parametrize(("text", "ok"), [(" 12345.", True), ("12345", True), ("\n12345 and", True),
                                          (" 1234", False), (" 123456.", False), (" the 12345", False)])
def test_retrieved_reads_the_first_number(text: str, ok: bool) -> None:
    assert retrieved(text, 12345) is ok


def test_retrieval_documents_answer_their_question_and_reach_the_token_budget(filler: Filler) -> None:
    docs = retrieval_documents(filler, 3000, 128, 256, random.Random(0))
    assert sum(len(filler.tokenizer.encode(d["text"])) for d in docs) >= 3000 * 0.8
    for d in docs:
        asked = re.search(r"\n# What is the pass key of (\w+)\?\n# The pass key of \1 is (\d+)\.\n$", d["text"])
        assert asked is not None
        planted = f"# The pass key of {asked.group(1)} is {asked.group(2)}.\n"
        assert d["text"][: asked.start() + 1].count(planted) == 1  # the fact is in the filler, once


def test_retrieval_documents_with_several_needles_answer_every_question_from_the_filler(filler: Filler) -> None:
    docs = retrieval_documents(filler, 6000, 128, 700, random.Random(1), max_needles=4)
    counts = []
    for d in docs:
        text = d["text"]
        answered = re.findall(r"\n# What is the pass key of (\w+)\?\n# The pass key of \1 is (\d+)\.", text)
        names = [name for name, _ in answered]
        assert answered and len(set(names)) == len(names)
        first_question = text.index("\n# What is the pass key of")
        assert text.endswith(f"# The pass key of {answered[-1][0]} is {answered[-1][1]}.\n")
        for name, key in answered:  # each fact planted once, in the filler before the questions
            assert text[: first_question + 1].count(f"# The pass key of {name} is {key}.\n") == 1
            assert text.count(f"# The pass key of {name} is ") == 2
        assert len(filler.tokenizer.encode(text)) <= 700
        counts.append(len(answered))
    assert max(counts) > 1 and min(counts) == 1  # short documents keep one needle, longer ones get more


def test_haystack_refuses_two_needles_of_one_name(filler: Filler) -> None:
    with pytest.raises(ValueError, match="distinct names"):
        haystack(filler, Needle("amber", 12345), 300, 0.5, random.Random(0), [(Needle("amber", 54321), 0.2)])


def test_package_documents_concatenate_each_package_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "b.py").write_text("B = 2\n")
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("C = 3\n")
    (tmp_path / "solo.py").write_text("S = 0\n")
    docs = package_documents(tmp_path)
    assert docs == ["# pkg/a.py\nA = 1\n\n# pkg/b.py\nB = 2\n\n# pkg/sub/c.py\nC = 3\n", "# solo.py\nS = 0\n"]


class ScriptedLLM:
    """Reads the key out of prompts up to `reach` tokens long (the engine's interface that needle_grid uses)."""

    def __init__(self, tok: Tokenizer, reach: int, context: int) -> None:
        self.tok, self.reach = tok, reach
        self.cfg = SimpleNamespace(max_position_embeddings=context)
        self.prompts: list[str] = []

    def generate(self, prompts: list[str], params: object) -> list[SimpleNamespace]:
        self.prompts += prompts
        out = []
        for p in prompts:
            name = re.search(r"pass key of (\w+)\?", p).group(1)
            key = re.search(rf"pass key of {name} is (\d+)", p).group(1)
            text = f" {key}." if len(self.tok.encode(p)) <= self.reach else " 0."
            out.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return out


def test_needle_grid_scores_each_cell_with_fresh_needles(filler: Filler, tok: Tokenizer) -> None:
    llm = ScriptedLLM(tok, reach=300, context=256)
    grid = needle_grid(llm, filler, [128, 256, 512], depth_grid(3), n=2, seed=5)
    assert grid["accuracy"] == [[1.0, 1.0, 0.0]] * 3  # [depth][length]
    assert grid["by_length"] == {"128": 1.0, "256": 1.0, "512": 0.0} and grid["overall"] == pytest.approx(2 / 3)
    assert grid["extrapolated"] == [512] and len(grid["failures"]) == 5
    keys = [re.search(r"is (\d+)\.\n", p).group(1) for p in llm.prompts]
    assert len(llm.prompts) == 18 and len(set(keys)) >= 16  # drawn per prompt
    again = ScriptedLLM(tok, reach=300, context=256)
    needle_grid(again, filler, [512], depth_grid(3), n=2, seed=5)
    assert again.prompts == llm.prompts[12:]  # a cell's prompts depend on the seed and the cell alone


def test_with_context_keeps_the_weights_and_the_logits() -> None:
    model = randomize_(Transformer(small_config(vocab_size=64, max_position_embeddings=64)), seed=3, std=0.1).eval()
    longer = with_context(model, 300)
    assert with_context(model, 64) is model and longer.cfg.max_position_embeddings == 300
    ids = torch.randint(0, 64, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(longer(ids), model(ids), rtol=0, atol=0)


def test_loss_by_position_is_the_per_position_cross_entropy() -> None:
    model = randomize_(Transformer(small_config(vocab_size=64)), seed=4, std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (40, 33, 20)]  # the 20-token one is left out
    result = loss_by_position(model, docs, 33)
    with torch.no_grad():
        per = torch.stack([F.cross_entropy(model(torch.tensor([d[:32]]))[0], torch.tensor(d[1:33]), reduction="none")
                           for d in docs[:2]]).mean(0)
    assert result["documents"] == 2
    assert [b["positions"] for b in result["buckets"]] == [[0, 1], [1, 2], [2, 4], [4, 8], [8, 16], [16, 32]]
    for b in result["buckets"]:
        lo, hi = b["positions"]
        assert b["mean_nll"] == pytest.approx(per[lo:hi].mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="no held-out document has 64 tokens"):
        loss_by_position(model, docs, 64)


def test_dsv2_eval_needle_writes_the_grid_and_its_heatmap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok_dir = arith_tokenizer(tmp_path)
    model = randomize_(Transformer(small_config(vocab_size=320, max_position_embeddings=160)), seed=2, std=0.05)
    ckpt = save_with_tokenizer(model, tok_dir, tmp_path / "ckpt")
    held_out = tmp_path / "held.jsonl"
    held_out.write_text("".join(json.dumps({"text": SOURCE[i * 2000:]}) + "\n" for i in range(3)))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(ckpt), "--needle", "--needle-lengths", "128", "200", "--needle-depths", "2",
                 "--needle-n", "2", "--needle-filler", str(held_out), "--loss-by-position", str(held_out),
                 "--loss-by-position-length", "300", "--copy", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["copy"]["n"] == 40 and result["copy"]["gain"] == pytest.approx(
        result["copy"]["first"] - result["copy"]["second"])
    grid = result["needle"]
    assert grid["lengths"] == [128, 200] and grid["depths"] == [0.0, 1.0] and grid["extrapolated"] == [200]
    assert all(0.0 <= a <= 1.0 for row in grid["accuracy"] for a in row)
    assert Path(grid["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["loss_by_position"]["documents"] == 3 and result["loss_by_position"]["context"] == 160
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--needle", "--needle-lengths", "4",
                 "--needle-filler", str(held_out)]) == 2
    assert "no room for filler" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x = 1"}\n{"txt": 2}\n')
    assert main(["eval", "--model", str(ckpt), "--needle", "--needle-filler", str(bad)]) == 2
    assert f"{bad}:2: expected an object with a string 'text' field" in capsys.readouterr().err


def test_the_extension_recipe_writes_yarn_and_trains_from_the_pretrained_weights(tmp_path: Path) -> None:
    tok_dir = arith_tokenizer(tmp_path)
    base = randomize_(Transformer(small_config(vocab_size=320, rope_scaling=None, max_position_embeddings=32)),
                      seed=1, std=0.05)
    pretrained = save_with_tokenizer(base, tok_dir, tmp_path / "pretrained")
    overrides = [f"model.config={json.dumps(str(pretrained))}", f"model.init_from={json.dumps(str(pretrained))}",
                 f"data.tokenizer={json.dumps(str(pretrained))}",
                 f"data.paths={json.dumps([str(write_corpus(tmp_path))])}", "data.seq_len=64",
                 f"train.out_dir={json.dumps(str(tmp_path / 'long'))}", "train.steps=2", "train.batch_size=2",
                 "train.micro_batch_size=1", "train.threads=1", "train.progress=false", "optim.warmup_steps=1",
                 "moe.n_devices=1", "moe.max_devices=1", "moe.device_limited=false"]
    cfg = TrainConfig.from_toml(RECIPE, overrides)
    train(cfg)
    extended = load(tmp_path / "long" / "final")
    hf = json.loads((tmp_path / "long" / "final" / "config.json").read_text())
    assert hf["max_position_embeddings"] == 8192
    assert hf["rope_scaling"] == {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 256,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert extended.cfg.hidden_size == base.cfg.hidden_size
    # Started from the pretrained weights (a small step away), not from a fresh initialization.
    w0, w1 = base.embed.weight, extended.embed.weight
    assert 0 < (w1 - w0).abs().max() < 0.05 * w0.abs().max()


class NgramCopier(torch.nn.Module):
    """Predicts, after a 4-gram seen before, the token that followed its latest earlier occurrence, and is
    uniform elsewhere: an induction head in its purest form, to check copy_loss's bookkeeping against."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.anchor = vocab, torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids[0].tolist()
        logits = torch.zeros(1, len(seq), self.vocab)
        for p in range(3, len(seq)):
            key = seq[p - 3: p + 1]
            for q in range(p - 1, 2, -1):
                if seq[q - 3: q + 1] == key and q + 1 < len(seq):
                    logits[0, p, seq[q + 1]] = 50.0
                    break
        return logits


def test_copy_loss_tells_a_copier_from_a_model_that_cannot_copy(tok: Tokenizer) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(2000)]
    filler = Filler(["\n".join(" ".join(words[i: i + 6]) for i in range(j, j + 300, 6)) for j in (0, 1000)], tok)
    uniform = math.log(tok.vocab_size)
    copier = copy_loss(NgramCopier(tok.vocab_size), filler, n=6, span=48, gap=16)
    assert copier["second"] < 0.2 * uniform < 0.8 * uniform < copier["first"] and copier["gain"] > 0.6 * uniform
    blind = copy_loss(Uniform(tok.vocab_size), filler, n=6, span=48, gap=16)  # pays the same twice
    assert blind["first"] == pytest.approx(uniform) and blind["second"] == pytest.approx(uniform)
    assert blind["gain"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="span"):
        copy_loss(Uniform(tok.vocab_size), filler, span=1)


def test_attention_probs_are_the_weights_each_layer_applies() -> None:
    """Recomputed weights times each layer's values give exactly what its attention returned."""
    from dsv2.model.mla import MLA

    model = randomize_(Transformer(small_config()), seed=3).eval()
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append((mod, args, out)))
             for m in model.modules() if isinstance(m, MLA)]
    ids = torch.randint(0, model.cfg.vocab_size, (1, 23))
    with torch.no_grad():
        logits, probs = attention_probs(model, ids)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(logits, model(ids))
        assert probs.shape == (model.cfg.num_hidden_layers, model.cfg.num_attention_heads, 23, 23)
        assert torch.all(probs.triu(1) == 0) and torch.allclose(probs.sum(-1), torch.ones(()))
        for (attn, (x, cos, sin, *_), out), p in zip(outputs, probs):
            c_kv = attn.project(x, cos, sin)[2]
            v = attn.wkv_b(c_kv).view(1, 23, attn.n_heads, -1)[..., attn.nope_dim:]
            o = torch.einsum("hts,shd->thd", p, v[0]).flatten(-2)
            torch.testing.assert_close(attn.wo(o)[None], out, atol=1e-5, rtol=1e-4)


def test_head_scores_find_a_previous_token_head_and_an_induction_head() -> None:
    start, span, gap = 1, 6, 3
    T = start + 2 * span + gap - 1
    probs = torch.zeros(1, 3, T, T)
    for t in range(T):
        probs[0, 0, t, max(t - 1, 0)] = 1.0  # previous token
        probs[0, 2, t, : t + 1] = 1.0 / (t + 1)  # uniform
        probs[0, 1, t, t] = 1.0  # itself, except in the second copy: the first copy's next token
    for i in range(span - 1):
        q = start + span + gap + i
        probs[0, 1, q] = 0.0
        probs[0, 1, q, start + i + 1] = 1.0
    previous, induction = head_scores(probs, start, span, gap)
    assert previous[0, 0] == 1 and induction[0, 1] == 1
    assert previous[0, 1] == 0 and induction[0, 0] == 0
    assert 0 < previous[0, 2] < 0.5 and 0 < induction[0, 2] < 0.2


class Uniform(NgramCopier):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, ids.shape[1], self.vocab)
