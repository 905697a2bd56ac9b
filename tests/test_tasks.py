"""Arithmetic word problems (splits, answers, extraction, files) and the stdlib corpus."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from dsv2.train import tasks
from dsv2.train.tasks import (SPLITS, TEMPLATES, exact_match, extract_answer, has_answer_format, make_problem,
                              problems, split_of, stdlib_files, write_stdlib_corpus)


def test_splits_are_disjoint_by_construction() -> None:
    drawn = {(split, seed): problems(split, n, seed)
             for split, n in (("train", 3000), ("rl", 1000), ("validation", 300), ("test", 300)) for seed in (0, 1)}
    for (split, _), batch in drawn.items():
        assert all(split_of(p.key) == split for p in batch)
        assert len({p.key for p in batch}) == len(batch)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                keys_a = {p.key for s in (0, 1) for p in drawn[a, s]}
                keys_b = {p.key for s in (0, 1) for p in drawn[b, s]}
                questions_a = {p.question for s in (0, 1) for p in drawn[a, s]}
                questions_b = {p.question for s in (0, 1) for p in drawn[b, s]}
                assert not keys_a & keys_b and not questions_a & questions_b


def test_a_small_template_is_partitioned_exactly() -> None:
    """Every key of the 121-key "mul" template lies in exactly one split, and a split never draws another's."""
    keys = [tasks.problem_key("mul", (a, b)) for a in range(2, 13) for b in range(2, 13)]
    by_split = {s: {k for k in keys if split_of(k) == s} for s in SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(keys)
    drawn = {p.key for p in problems("test", 400, seed=5) if p.template == "mul"}
    assert drawn <= by_split["test"]


def test_the_command_writes_rl_prompts_only_when_asked(tmp_path: Path) -> None:
    """--rl N writes N GRPO prompts that share no problem with the train split's files; without it no rl file."""
    assert tasks.main([str(tmp_path / "a"), "--train", "400", "--rl", "50", "--validation", "5", "--test", "5"]) == 0
    rl = tasks.read_jsonl(tmp_path / "a" / "rl-grpo.jsonl")
    train = {r["text"].split("\n")[0] for r in tasks.read_jsonl(tmp_path / "a" / "train-text.jsonl")}
    assert len(rl) == 50 and all(isinstance(r["answer"], int) for r in rl)
    assert not {r["messages"][0]["content"] for r in rl} & train
    assert tasks.main([str(tmp_path / "b"), "--train", "10", "--validation", "5", "--test", "5"]) == 0
    assert not list((tmp_path / "b").glob("rl-*"))


def test_drawing_with_replacement_balances_templates() -> None:
    """Distinct draws leave the 121-key templates rare; draws with replacement give every template its 1/7 share,
    stay inside the split, and leave the distinct (evaluation) draw unchanged."""
    distinct = Counter(p.template for p in problems("train", 7000, seed=0))
    drawn = problems("train", 7000, seed=0, replace=True)
    balanced = Counter(p.template for p in drawn)
    assert distinct["mul"] < 150 and distinct["add_sub"] > 1500
    assert all(800 <= balanced[t.name] <= 1200 for t in TEMPLATES), balanced
    assert all(split_of(p.key) == "train" for p in drawn) and len({p.key for p in drawn}) < len(drawn)
    assert problems("test", 300, seed=0) == problems("test", 300, seed=0, replace=False)


def test_drawing_is_seeded() -> None:
    assert problems("train", 50, seed=3) == problems("train", 50, seed=3)
    assert problems("train", 50, seed=3) != problems("train", 50, seed=4)
    with pytest.raises(ValueError, match="unknown split"):
        problems("dev", 1)


EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_worked_answers_are_right() -> None:
    """Each equation in a solution holds, the last one gives the answer, and the answer sentence ends it."""
    batch = [p for split in SPLITS for p in problems(split, 200, seed=0)]
    assert {p.template for p in batch} == {t.name for t in TEMPLATES}
    for p in batch:
        equations = EQUATION.findall(p.solution)
        assert equations, p.solution
        for x, op, y, z in equations:
            assert {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y),
                    "/": int(x) // int(y) if int(x) % int(y) == 0 else None}[op] == int(z), p.solution
        assert int(equations[-1][3]) == p.answer
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert extract_answer(p.solution) == p.answer and has_answer_format(p.solution)
        assert make_problem(p.template, p.operands) == p


@pytest.mark.parametrize(("text", "expected"), [
    ("so 2 + 3 = 5. The answer is 5.", 5),
    ("The answer is 3. No wait. The answer is -7.", -7),
    ("The answer is 1,234.", 1234),
    ("The answer is  12", 12),
    ("The answer is 4 or 5.", 4),
    ("the answer is 5.", None),
    ("12 + 30 = 42", None),
    ("", None),
])
def test_extract_answer(text: str, expected: int | None) -> None:
    assert extract_answer(text) == expected


def test_format_and_exact_match() -> None:
    assert has_answer_format("... The answer is 5.") and has_answer_format("The answer is -5. Done")
    assert not has_answer_format("The answer is 5") and not has_answer_format("The answer is five.")
    outputs = ["The answer is 5.", "The answer is 6.", "I think 5", "The answer is 5. The answer is 7."]
    assert exact_match(outputs, [5, 5, 5, 7]) == [True, False, False, True]
    with pytest.raises(ValueError):
        exact_match(outputs, [5])


def test_jsonl_files(tmp_path: Path) -> None:
    assert tasks.main([str(tmp_path), "--train", "20", "--validation", "5", "--test", "5", "--seed", "2"]) == 0
    sft = tasks.read_jsonl(tmp_path / "train-sft.jsonl")
    grpo = tasks.read_jsonl(tmp_path / "test-grpo.jsonl")
    text = tasks.read_jsonl(tmp_path / "validation-text.jsonl")
    assert len(sft) == 20 and len(grpo) == 5 and len(text) == 5
    expected = problems("train", 20, seed=2)
    assert [r["messages"] for r in sft] == [p.messages() for p in expected]
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    test = problems("test", 5, seed=2)
    assert grpo == [{"messages": [{"role": "user", "content": p.question}], "answer": p.answer} for p in test]
    assert text[0]["text"].endswith(problems("validation", 5, seed=2)[0].solution)


def fake_stdlib(root: Path) -> None:
    files = {"os.py": "import sys\n", "json/__init__.py": "x = 1\n", "json/decoder.py": "y = 2\n",
             "test/test_os.py": "t = 1\n", "unittest/test/helper.py": "h = 1\n", "lib2to3/tests/a.py": "a\n",
             "idlelib/idle_test/b.py": "b\n", "site-packages/numpy/core.py": "n\n", "abc.py": "class A: ...\n",
             "empty.py": "\n", "notes.txt": "not python\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped


def test_stdlib_files_skip_tests_and_site_packages(tmp_path: Path) -> None:
    fake_stdlib(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)]
    assert rel == ["abc.py", "empty.py", "json/__init__.py", "json/decoder.py", "latin.py", "os.py"]

    n_files, n_chars = write_stdlib_corpus(tmp_path / "out" / "corpus.jsonl", tmp_path)
    docs = [json.loads(line)["text"] for line in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()]
    assert docs == ["class A: ...\n", "x = 1\n", "y = 2\n", "import sys\n"]
    assert (n_files, n_chars) == (4, sum(map(len, docs)))

    write_stdlib_corpus(tmp_path / "out" / "corpus.txt", tmp_path, max_bytes=len("class A: ...\nx = 1\n"))
    assert (tmp_path / "out" / "corpus.txt").read_text() == "class A: ...\n\n\nx = 1\n\n\n"

    # The held-out side: exactly the test suites the corpus left out.
    rel = [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path, tests=True)]
    assert rel == ["idlelib/idle_test/b.py", "lib2to3/tests/a.py", "test/test_os.py", "unittest/test/helper.py"]


def test_real_stdlib_listing() -> None:
    files = stdlib_files()
    rel = [p.relative_to(tasks.stdlib_root()).as_posix() for p in files]
    assert "os.py" in rel and "json/__init__.py" in rel
    assert rel == sorted(rel)
    assert not any({"test", "tests", "site-packages"} & set(r.split("/")[:-1]) for r in rel)
