"""Fill-in-the-middle pretraining documents and held-out cases (dsv2.train.fim), and their scoring (dsv2.eval.tasks)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsv2.cli import main as cli_main
from dsv2.eval.tasks import fim_exact_match
from dsv2.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE
from dsv2.train import fim
from dsv2.train.tasks import stdlib_files

CODE = "".join(p.read_text(encoding="utf-8") for p in stdlib_files()[:20])


def _split_document(doc: str) -> tuple[str, str, str]:
    """The PSM layout read back: (prefix, middle, suffix)."""
    assert doc.startswith(FIM_BEGIN) and doc.count(FIM_HOLE) == 1 and doc.count(FIM_END) == 1
    prefix, rest = doc.removeprefix(FIM_BEGIN).split(FIM_HOLE)
    suffix, middle = rest.split(FIM_END)
    return prefix, middle, suffix


def test_chunks_are_whole_lines_within_the_budget() -> None:
    text = "short\n" * 50 + "x" * 300 + "\n" + "tail"
    got = list(fim.chunks(text, 100))
    assert "".join("".join(c) for c in got) == text
    assert all(line.endswith("\n") for c in got for line in c[:-1])
    assert all(sum(map(len, c)) <= 100 for c in got if len(c) > 1)
    assert ["x" * 300 + "\n"] in got  # a line over the budget is a chunk of its own


def test_cut_keeps_the_text_and_starts_at_code() -> None:
    lines = ["def f(x):\n", "\n", "    return x + 1\n", "}\n", "y = f(2)\n"]
    for seed in range(40):
        hole = fim.cut(lines, random.Random(seed), max_lines=3)
        assert hole.prefix + hole.middle + hole.suffix == "".join(lines)
        assert len(hole.middle.strip().splitlines()[0].strip()) >= 4  # not a blank or a lone bracket
        assert 1 <= hole.middle.count("\n") <= 3
        held = fim.cut(lines, random.Random(seed), context=True)
        assert held.middle == "    return x + 1\n"  # the only line with code that has a line on each side
        assert held.prefix and held.suffix
    assert fim.cut(["\n", "}\n"], random.Random(0)) is None


def test_documents_are_psm_of_a_fraction_of_the_chunks() -> None:
    n_chunks = sum(1 for _ in fim.chunks(CODE))
    docs = fim.fim_documents([CODE], 0.5, random.Random(0))
    assert 0.35 * n_chunks < len(docs) < 0.65 * n_chunks
    for doc in docs:
        prefix, middle, suffix = _split_document(doc)
        assert prefix + middle + suffix in CODE and middle.strip()
        assert len(prefix + middle + suffix) <= fim.CHUNK_CHARS or (prefix + middle + suffix).count("\n") <= 1
    assert len(fim.fim_documents([CODE], 1.0, random.Random(0))) > len(docs)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        fim.fim_documents([CODE], 0, random.Random(0))


def test_heldout_holes_are_one_line_with_context() -> None:
    holes = fim.heldout_holes([CODE], 30, random.Random(1))
    assert len(holes) == 30 and len({h.prefix for h in holes}) == 30  # different chunks
    for h in holes:
        assert h.prefix + h.middle + h.suffix in CODE
        assert h.prefix.endswith("\n") and h.middle.count("\n") == 1 and h.suffix
    with pytest.raises(ValueError, match="only 0 evaluation cases in the held-out text, 1 wanted"):
        fim.heldout_holes(["one line\n"], 1, random.Random(0))


class _Oracle:
    """An LLM stand-in that fills every hole correctly and writes every line left to right wrongly, recording
    what it was asked."""

    def __init__(self, holes: list[fim.Hole]) -> None:
        self.by_prefix = {h.prefix: h for h in holes}
        self.calls: list[tuple[list[str], object, object]] = []

    def generate(self, prompts, params, suffix=None):  # noqa: ANN001, ANN201
        self.calls.append((list(prompts), params, suffix))
        texts = [self.by_prefix[p].middle if suffix is not None else "wrong\n" for p in prompts]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts]


def test_exact_match_scores_fills_against_the_removed_line() -> None:
    holes = fim.heldout_holes([CODE], 5, random.Random(2))
    llm = _Oracle(holes)
    got = fim_exact_match(llm, holes)
    assert (got["exact_match"], got["prefix_only_exact_match"], got["n"]) == (1.0, 0.0, 5)
    (fim_prompts, fim_params, suffixes), (left_prompts, left_params, none) = llm.calls
    assert suffixes == [h.suffix for h in holes] and none is None
    assert fim_prompts == left_prompts == [h.prefix for h in holes]
    assert fim_params.temperature == 0 and tuple(left_params.stop) == ("\n",)
    holes[0] = holes[0]._replace(middle="something else\n")
    assert fim_exact_match(llm, holes)["exact_match"] == 0.8  # the oracle still writes the old line


def test_cli_writes_fim_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "code.jsonl"
    src.write_text(json.dumps({"text": CODE}) + "\n")
    out = tmp_path / "fim.jsonl"
    assert fim.main([str(src), str(out), "--fraction", "1"]) == 0
    docs = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert docs and all(_split_document(d) for d in docs)
    assert f"{len(docs)} FIM documents" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        fim.main([str(src), str(out), "--fraction", "2"])
    assert "--fraction must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_eval_fim_needs_a_tokenizer_with_the_markers() -> None:
    from dsv2.default_model import default_model_dir

    with pytest.raises(SystemExit, match="has no fill-in-the-middle tokens"):
        cli_main(["eval", "--model", str(default_model_dir()), "--fim", "4"])
    with pytest.raises(SystemExit, match="--fim-source: no such file: /nonexistent.jsonl"):
        cli_main(["eval", "--model", str(default_model_dir()), "--fim", "4", "--fim-source", "/nonexistent.jsonl"])
