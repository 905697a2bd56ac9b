"""The whole recipe at minute scale, as `make tiny-model` runs it at full scale: data (with FIM documents) ->
tokenizer + pretrain -> context extension -> SFT -> GRPO -> eval -> serve through the engine. Each stage's output
must load in the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv2 import LLM, SamplingParams, load
from dsv2.cli import main
from dsv2.train.fim import main as fim_main
from dsv2.train.longdocs import main as longdocs_main
from dsv2.train.tasks import main as tasks_main


def test_every_stage_feeds_the_next(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    tasks_main([str(data), "--train", "300", "--rl", "20", "--validation", "20", "--test", "20"])
    code = data / "code.jsonl"  # a small source tree stands in for the stdlib
    sources = sorted(Path(json.__file__).parent.glob("*.py"))
    code.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in sources))
    assert fim_main([str(code), str(data / "fim.jsonl"), "--fraction", "0.5"]) == 0
    recipe = Path(__file__).parents[1] / "recipes" / "tiny.toml"
    paths = json.dumps([str(data / n) for n in ("train-text.jsonl", "fim.jsonl")])
    assert main(["train", "--config", str(recipe), f"--data.paths={paths}",
                 f"--train.out_dir={runs / 'pre'}", "--train.steps=3", "--train.batch_size=4",
                 "--train.micro_batch_size=4", "--data.seq_len=64", "--data.tokenizer=bpe:600",
                 "--train.checkpoint_every=3", "--optim.warmup_steps=1"]) == 0
    pre = runs / "pre" / "final"
    assert load(pre).cfg.num_hidden_layers == 4  # the tiny preset, in the HF layout
    assert load(pre).cfg.rope_scaling is None  # plain RoPE until the extension
    # The context extension: long documents (a small source tree's packages) plus retrieval documents, then the
    # extension recipe from the pretrained checkpoint.
    assert longdocs_main([str(data), "--tokenizer", str(pre), "--seq-len", "128", "--min-len", "96",
                          "--stdlib-root", str(Path(json.__file__).parent),
                          "--mix-with", str(data / "train-text.jsonl")]) == 0
    long_recipe = Path(__file__).parents[1] / "recipes" / "tiny-long.toml"
    assert main(["train", "--config", str(long_recipe), f"--model.config={pre}", f"--model.init_from={pre}",
                 f"--data.tokenizer={pre}", f"--train.out_dir={runs / 'long'}",
                 f"--data.paths={json.dumps([str(data / n) for n in ('long-stdlib.jsonl', 'long-needles.jsonl')])}",
                 "--train.steps=2", "--train.batch_size=2", "--train.micro_batch_size=2", "--data.seq_len=128",
                 "--optim.warmup_steps=1"]) == 0
    long = runs / "long" / "final"
    assert load(long).cfg.rope_scaling.factor == 32 and load(long).cfg.max_position_embeddings == 8192
    assert main(["sft", "--model", str(long), "--data", str(data / "train-sft.jsonl"), "--out", str(runs / "sft"),
                 "--steps", "2", "--batch-size", "4"]) == 0
    assert main(["grpo", "--model", str(runs / "sft" / "final"), "--data", str(data / "rl-grpo.jsonl"),
                 "--out", str(runs / "grpo"), "--steps", "1", "--group-size", "2", "--prompts-per-step", "2",
                 "--max-tokens", "8"]) == 0
    final = runs / "grpo" / "final"
    capsys.readouterr()
    assert main(["eval", "--model", str(final), "--arith", "4", "--max-tokens", "8", "--fim", "3",
                 "--fim-source", str(code)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arithmetic"]["n"] == 4 and 0.0 <= report["arithmetic"]["accuracy"] <= 1.0
    assert report["fim"]["n"] == 3  # the BPE reserved the FIM tokens, so the final model takes FIM prompts
    [out] = LLM(final, max_cache_tokens=512).chat([{"role": "user", "content": "What is 2 + 3?"}],
                                                  SamplingParams(max_tokens=8, temperature=0))
    assert out.outputs[0].finish_reason in ("stop", "length") and out.outputs[0].token_ids
