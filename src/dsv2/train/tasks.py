"""The corpus dsv2 assembles offline: arithmetic word problems with known answers, and the Python standard library.

Arithmetic. Each problem is a template applied to integer operands; `(template, operands)` is its key and fixes
everything else (the question's wording, the person's name, the answer). The split of a problem is a function of
its key alone -- a SHA-256 bucket -- so the splits are disjoint by construction whatever the seed or the number of
problems drawn: the seed only chooses *which* keys of a split are drawn. Worked answers end in the fixed sentence
"The answer is N.", which the extractor and the GRPO rewards read.

The splits: train (pretraining and SFT), rl (GRPO's prompts), validation and test. rl is kept apart from train
because a small model answers the problems it was pretrained on from memory: GRPO on those prompts has nothing to
learn (its sampled reward barely moves), while on problems it has never seen the reward says something new.

    python -m dsv2.train.tasks data/ --train 20000 --rl 3000 --validation 500 --test 500 --stdlib

writes SFT conversations, GRPO prompts and pretraining text per split, and the stdlib corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS: dict[str, tuple[float, float]] = {"train": (0.0, 0.7), "rl": (0.7, 0.9), "validation": (0.9, 0.95),
                                          "test": (0.95, 1.0)}
NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia", "Noor")
ANSWER_PREFIX = "The answer is"
# The last integer after "The answer is" counts; a trailing period is optional so that "The answer is 7" at a
# length cut-off still scores, but the *format* reward asks for the full sentence.
_ANSWER_RE = re.compile(ANSWER_PREFIX + r"\s*(-?\d[\d,]*)")
_FORMAT_RE = re.compile(ANSWER_PREFIX + r" -?\d+\.")

Operands = tuple[int, ...]


@dataclass(frozen=True)
class Template:
    name: str  # stable: part of every problem's key, so renaming a template re-splits its problems
    question: str  # str.format fields: name, a, b, c
    steps: str  # the worked solution before "The answer is N."; fields also p (an intermediate) and ans
    sample: Callable[[random.Random], Operands]
    answer: Callable[[Operands], int]
    intermediate: Callable[[Operands], int] = lambda ops: 0


def _pair(lo: int, hi: int) -> Callable[[random.Random], Operands]:
    return lambda rng: (rng.randint(lo, hi), rng.randint(lo, hi))


def _less_than_first(rng: random.Random) -> Operands:
    a = rng.randint(2, 99)
    return a, rng.randint(1, a - 1)


def _find_then_lose(rng: random.Random) -> Operands:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return a, b, rng.randint(1, a + b - 1)


TEMPLATES: tuple[Template, ...] = (
    Template("add", "{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
             "{name} starts with {a} apples and buys {b} more, so {a} + {b} = {ans}.",
             _pair(1, 99), lambda o: o[0] + o[1]),
    Template("sub", "{name} had {a} stickers and gave {b} of them away. How many stickers are left?",
             "{name} gave away {b} of {a} stickers, so {a} - {b} = {ans}.",
             _less_than_first, lambda o: o[0] - o[1]),
    Template("mul", "A box holds {a} pencils. How many pencils are in {b} boxes?",
             "Each of the {b} boxes holds {a} pencils, so {b} * {a} = {ans}.",
             _pair(2, 12), lambda o: o[0] * o[1]),
    Template("div", "{name} shares {p} cookies equally among {b} friends. How many cookies does each friend get?",
             "{p} cookies shared by {b} friends is {p} / {b} = {ans}.",
             _pair(2, 12), lambda o: o[0], intermediate=lambda o: o[0] * o[1]),
    Template("add_sub", "{name} has {a} marbles, finds {b} more and then loses {c}. How many marbles are left?",
             "{a} + {b} = {p} marbles, and after losing {c}, {p} - {c} = {ans}.",
             _find_then_lose, lambda o: o[0] + o[1] - o[2], intermediate=lambda o: o[0] + o[1]),
    Template("mul_add", "A hall has {a} rows of {b} chairs and {c} extra chairs. How many chairs are there?",
             "{a} rows of {b} chairs make {a} * {b} = {p}, and {p} + {c} = {ans}.",
             lambda rng: (rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 20)),
             lambda o: o[0] * o[1] + o[2], intermediate=lambda o: o[0] * o[1]),
    Template("price", "A notebook costs {a} dollars and a pen costs {b} dollars. "
                      "How many dollars do {c} notebooks and one pen cost?",
             "{c} notebooks cost {c} * {a} = {p} dollars, and with the pen {p} + {b} = {ans}.",
             lambda rng: (rng.randint(1, 20), rng.randint(1, 10), rng.randint(2, 9)),
             lambda o: o[2] * o[0] + o[1], intermediate=lambda o: o[2] * o[0]),
)
_BY_NAME = {t.name: t for t in TEMPLATES}


@dataclass(frozen=True)
class Problem:
    template: str
    operands: Operands
    question: str
    solution: str  # worked answer ending in "The answer is N."
    answer: int

    @property
    def key(self) -> str:
        return problem_key(self.template, self.operands)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.solution}]


def problem_key(template: str, operands: Operands) -> str:
    return f"{template}:{','.join(map(str, operands))}"


def _key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def split_of(key: str) -> str:
    """The split a problem key belongs to: a uniform bucket in [0, 1) from its SHA-256, never from a seed."""
    bucket = int.from_bytes(_key_hash(key)[:8], "big") / 2**64
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def make_problem(template: str, operands: Operands) -> Problem:
    t = _BY_NAME[template]
    # The name comes from the key's hash too (other bytes than the split's), so the key fixes the whole text.
    name = NAMES[int.from_bytes(_key_hash(problem_key(template, operands))[8:12], "big") % len(NAMES)]
    fields = dict(zip("abc", operands)) | {"name": name, "p": t.intermediate(operands), "ans": t.answer(operands)}
    solution = f"{t.steps.format(**fields)} {ANSWER_PREFIX} {fields['ans']}."
    return Problem(template, operands, t.question.format(**fields), solution, fields["ans"])


def problems(split: str, n: int, seed: int = 0, replace: bool = False) -> list[Problem]:
    """n problems of one split, drawn by a seeded generator (a template uniformly, then operands).

    Without replacement (the default, for evaluation sets) a draw whose key is already taken is rejected, so a
    template with few keys runs out and the large ones fill the rest: 60,000 distinct train problems hold every
    train key of mul (84) and div (84) but 46,671 of add_sub. With replacement (for a training corpus) every
    template keeps its 1/7 share and a template with few keys repeats them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    rng = random.Random(f"{seed}:{split}")  # str seeds hash through SHA-512: stable across runs and machines
    out: dict[str, Problem] = {}
    drawn: list[Problem] = []
    for _ in range(200 * n + 1000):  # rejection sampling; the bound only turns an impossible n into an error
        if len(drawn) == n:
            return drawn
        t = rng.choice(TEMPLATES)
        ops = t.sample(rng)
        key = problem_key(t.name, ops)
        if split_of(key) != split or (key in out and not replace):
            continue
        if key not in out:
            out[key] = make_problem(t.name, ops)
        drawn.append(out[key])
    raise ValueError(f"could not draw {n} {'distinct ' if not replace else ''}{split} problems (got {len(drawn)})")


# ------------------------------------------------------------------------------------------ scoring


def extract_answer(text: str) -> int | None:
    """The last integer written after "The answer is" (thousands commas allowed), or None."""
    found = _ANSWER_RE.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def has_answer_format(text: str) -> bool:
    return _FORMAT_RE.search(text) is not None


def exact_match(outputs: Iterable[str], answers: Iterable[int]) -> list[bool]:
    return [extract_answer(o) == a for o, a in zip(outputs, answers, strict=True)]


# ------------------------------------------------------------------------------------------ files


def sft_record(p: Problem) -> dict[str, Any]:
    return {"messages": p.messages()}


def grpo_record(p: Problem) -> dict[str, Any]:
    return {"messages": p.messages()[:1], "answer": p.answer}


def pretrain_record(p: Problem) -> dict[str, Any]:
    return {"text": f"{p.question}\n{p.solution}"}


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_arithmetic(out_dir: str | os.PathLike, sizes: Mapping[str, int], seed: int = 0,
                     replace: frozenset[str] = frozenset()) -> list[Path]:
    """Per split: {split}-sft.jsonl (conversations), {split}-grpo.jsonl (prompt + answer), {split}-text.jsonl.
    The splits named in `replace` are drawn with replacement (`problems`)."""
    out, written = Path(out_dir), []
    for split, n in sizes.items():
        batch = problems(split, n, seed, replace=split in replace)
        for kind, record in (("sft", sft_record), ("grpo", grpo_record), ("text", pretrain_record)):
            path = out / f"{split}-{kind}.jsonl"
            write_jsonl(path, map(record, batch))
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------ stdlib corpus

# Test suites are a third of the stdlib and mostly boilerplate, so pretraining leaves them out and they serve as
# held-out code for perplexity; site-packages is not the stdlib at all (pyenv and source builds keep it inside
# the stdlib directory).
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
NEVER_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(os.path.dirname(os.__file__))


def stdlib_files(root: str | os.PathLike | None = None, tests: bool = False) -> list[Path]:
    """The stdlib's .py files outside test directories (or, with tests=True, only those inside one), sorted by
    relative path (the same list on every run)."""
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):  # os.walk does not follow directory symlinks
        subdirs[:] = [d for d in subdirs if d not in NEVER_DIRS and (tests or d not in TEST_DIRS)]
        if not tests or TEST_DIRS & set(Path(directory).relative_to(root).parts):
            found.extend(Path(directory, f) for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def write_stdlib_corpus(out: str | os.PathLike, root: str | os.PathLike | None = None,
                        max_bytes: int | None = None, tests: bool = False) -> tuple[int, int]:
    """Write the stdlib source (`stdlib_files(root, tests)`) to `out`: one {"text": source} per file for .jsonl
    (so the pretraining loader puts an EOS between files), else the files joined by blank lines. Files that are
    not UTF-8 are skipped. Stops before the file that would pass max_bytes. Returns (files, characters) written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_files, n_chars = 0, 0
    with open(out, "w", encoding="utf-8") as f:
        for path in stdlib_files(root, tests):
            try:
                source = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if not source.strip():
                continue
            if max_bytes is not None and n_chars + len(source) > max_bytes:
                break
            f.write(json.dumps({"text": source}) + "\n" if out.suffix == ".jsonl" else source + "\n\n")
            n_files, n_chars = n_files + 1, n_chars + len(source)
    return n_files, n_chars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv2.train.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--rl", type=int, default=0, help="problems of the rl split (GRPO prompts the train split "
                        "never shows); 0 writes no rl files")
    parser.add_argument("--validation", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-with-replacement", action="store_true",
                        help="draw the train split with replacement: every template equally often (templates with "
                        "few keys repeat them) rather than distinct problems, among which the small templates are rare")
    parser.add_argument("--stdlib", action="store_true", help="also write stdlib.jsonl (the stdlib's source) and "
                        "stdlib-heldout.jsonl (the first MB of its test suites, which stdlib.jsonl leaves out)")
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "rl": args.rl, "validation": args.validation, "test": args.test}
    sizes = {split: n for split, n in sizes.items() if n > 0 or split == "train"}
    replace = frozenset({"train"} if args.train_with_replacement else ())
    for path in write_arithmetic(args.out_dir, sizes, args.seed, replace):
        print(path)
    if args.stdlib:
        for name, tests, max_bytes in (("stdlib.jsonl", False, None), ("stdlib-heldout.jsonl", True, 2**20)):
            files, chars = write_stdlib_corpus(Path(args.out_dir) / name, max_bytes=max_bytes, tests=tests)
            print(f"{Path(args.out_dir) / name}: {files} files, {chars} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
