"""Evaluation: perplexity against an independent computation, exact-match scoring, HumanEval's scorer, `dsv2 eval`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dsv2 import Tokenizer, Transformer
from dsv2.cli import main
from dsv2.eval.perplexity import perplexity, windows
from dsv2.eval.tasks import arithmetic_accuracy, check_completion, humaneval_problems
from dsv2.train.tasks import make_problem, problems
from tests.conftest import randomize_, small_config
from tests.test_sft import arith_tokenizer, save_with_tokenizer


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize_(Transformer(small_config(vocab_size=64)), seed=8, std=0.1).eval()


TOKENS = torch.randint(0, 64, (45,), generator=torch.Generator().manual_seed(1)).tolist()


def test_perplexity_is_exp_of_the_mean_nll(model: Transformer) -> None:
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS]))[0]
    nll = F.cross_entropy(logits[:-1], torch.tensor(TOKENS[1:]))  # every target with all its context
    result = perplexity(model, TOKENS, window=64)
    assert result.tokens == len(TOKENS) - 1
    assert result.mean_nll == pytest.approx(nll.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(torch.exp(nll).item(), rel=1e-5)


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (10, 1), (44, 20)])
def test_windows_score_each_target_once_with_enough_context(window: int, stride: int) -> None:
    spans = windows(len(TOKENS), window, stride)
    scored = [t for start, end, first in spans for t in range(first, end + 1)]
    assert scored == list(range(1, len(TOKENS)))
    for start, end, first in spans:
        assert end - start <= window and start <= first - 1
        assert first - 1 - start >= min(window - stride, first - 1)  # context of the first scored target


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3)])
def test_batched_windows_equal_one_forward_per_window(model: Transformer, window: int, stride: int) -> None:
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in windows(len(TOKENS), window, stride):
            logits = model(torch.tensor([TOKENS[start:end]]))[0]
            targets = torch.tensor(TOKENS[start + 1:end + 1])
            keep = slice(first - start - 1, None)
            nll += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += len(targets[keep])
    result = perplexity(model, TOKENS, window, stride, batch_size=3)
    assert (result.tokens, result.nll) == (count, pytest.approx(nll, rel=1e-5))


class FakeLLM:
    """Answers each chat with the next hand-written text; records the sampling parameters it was given."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts, self.params, self.prompts = list(texts), None, None

    def chat(self, conversations: Sequence[Any], params: Any) -> list[SimpleNamespace]:  # noqa: ANN401
        return self.generate(conversations, params)

    def generate(self, prompts: Sequence[Any], params: Any) -> list[SimpleNamespace]:  # noqa: ANN401
        self.params, self.prompts = params, list(prompts)
        assert len(prompts) == len(self.texts)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in self.texts]


def test_arithmetic_exact_match_on_hand_made_outputs() -> None:
    batch = problems("test", 4, seed=0)
    texts = [batch[0].solution, f"The answer is {batch[1].answer + 1}.", f"It is {batch[2].answer}.",
             f"The answer is {batch[3].answer}"]
    llm = FakeLLM(texts)
    result = arithmetic_accuracy(llm, batch)  # type: ignore[arg-type]
    assert (result["correct"], result["n"], result["accuracy"]) == (2, 4, 0.5)
    assert llm.params.temperature == 0  # greedy
    assert [e["correct"] for e in result["examples"]] == [True, False, False]
    assert llm.prompts[0] == [{"role": "user", "content": batch[0].question}]


def test_arithmetic_accuracy_per_template() -> None:
    batch = [make_problem("add", (1, 2)), make_problem("add", (3, 4)), make_problem("mul", (2, 3))]
    llm = FakeLLM(["The answer is 3.", "The answer is 8.", "The answer is 6."])  # right, wrong, right
    result = arithmetic_accuracy(llm, batch)  # type: ignore[arg-type]
    assert result["by_template"] == {"add": {"correct": 1, "n": 2}, "mul": {"correct": 1, "n": 1}}


def test_arithmetic_text_format_prompts_like_the_pretraining_corpus() -> None:
    batch = problems("test", 2, seed=0)
    llm = FakeLLM([batch[0].solution, batch[1].solution])
    result = arithmetic_accuracy(llm, batch, prompt_format="text")  # type: ignore[arg-type]
    assert (result["accuracy"], result["format"]) == (1.0, "text")
    # The question and a newline, as in every {"text": question\nsolution} pretraining document.
    assert llm.prompts == [f"{p.question}\n" for p in batch] and llm.params.stop == ("\n",)
    with pytest.raises(ValueError, match="prompt_format"):
        arithmetic_accuracy(llm, batch, prompt_format="json")  # type: ignore[arg-type]


def test_humaneval_scorer_accepts_the_canonical_solution_and_rejects_wrong_ones() -> None:
    problem = humaneval_problems(limit=1)[0]
    assert problem["task_id"] == "HumanEval/0" and len(humaneval_problems()) == 164
    assert check_completion(problem, problem["canonical_solution"])
    assert not check_completion(problem, "    return False\n")
    assert not check_completion(problem, "    while True:\n        pass\n", timeout=0.5)


def test_eval_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok_dir = arith_tokenizer(tmp_path)
    net = randomize_(Transformer(small_config(vocab_size=320)), seed=2, std=0.05)
    model_dir = save_with_tokenizer(net, tok_dir, tmp_path / "model")
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(p.solution for p in problems("validation", 5)))
    docs = tmp_path / "held_out.jsonl"
    docs.write_text("".join(json.dumps({"text": p.solution}) + "\n" for p in problems("validation", 3)))
    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(model_dir), "--ppl-text", str(text), str(docs), "--ppl-window", "64",
                 "--arith", "3", "--humaneval", "--humaneval-limit", "2", "--max-tokens", "8", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    tok = Tokenizer.from_dir(tok_dir)
    expected = perplexity(net, tok.encode(text.read_text()), window=64)
    assert result["perplexity"][0]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    # JSONL documents are scored as the pretraining loader packs them: <bos> doc <eos> <bos> doc <eos> ...
    packed = [i for p in problems("validation", 3) for i in [tok.bos_id, *tok.encode(p.solution, add_bos=False),
                                                                tok.eos_id]]
    expected = perplexity(net, packed, window=64)
    assert result["perplexity"][1]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    # A random model answers nothing right, and the numbers are still reported.
    assert (result["arithmetic"]["n"], result["arithmetic"]["accuracy"]) == (3, 0.0)
    assert (result["humaneval"]["n"], result["humaneval"]["pass@1"]) == (2, 0.0)
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        main(["eval", "--model", str(model_dir)])
