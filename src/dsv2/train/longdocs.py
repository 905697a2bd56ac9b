"""Long documents for the context-extension stage (DeepSeek-V2 §3.1.4, scaled down), and the needles of the
needle-in-a-haystack evaluation, which plants them the same way.

    python -m dsv2.train.longdocs data/tiny --tokenizer runs/tiny/pretrain/final --seq-len 2048

writes two JSONL corpora for `recipes/tiny-long.toml`:
- long-stdlib.jsonl: each stdlib package's files concatenated in path order, one document per package
  (stdlib_files' order, test directories left out as in pretraining): text whose later parts refer to
  definitions thousands of tokens earlier;
- long-needles.jsonl: synthetic retrieval documents, pass keys planted at random depths in stdlib filler
  and asked for at the end (one per document, or up to `--max-needles`), their tokens a minority
  (`--needle-share`, default 25%) of everything the stage trains on: these two corpora and the `--mix-with`
  files (e.g. the pretraining corpus's arithmetic text, which keeps the short-context skills in the mix).

Evaluation draws its needles with the same `haystack` from held-out filler (the stdlib's test suites), so a
needle the model retrieves at test time is never one it saw in training: names and keys are drawn per cell.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dsv2.tokenizer import Tokenizer
from dsv2.train.tasks import read_jsonl, stdlib_files, stdlib_root, write_jsonl

_NAMES = ("amber", "basil", "cedar", "delta", "ember", "fable", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
          "umber", "velvet", "willow", "yarrow", "zephyr", "acorn", "bramble", "cobalt", "dune", "falcon")


@dataclass(frozen=True)
class Needle:
    name: str
    key: int  # five digits

    @property
    def line(self) -> str:  # a comment line: the filler is Python source
        return f"# The pass key of {self.name} is {self.key}.\n"

    @property
    def question(self) -> str:
        return f"\n# What is the pass key of {self.name}?\n# The pass key of {self.name} is"

    @property
    def answer(self) -> str:
        return f" {self.key}."


def draw_key(rng: random.Random) -> int:
    return rng.randrange(10000, 100000)


def draw_needle(rng: random.Random) -> Needle:
    return Needle(rng.choice(_NAMES), draw_key(rng))


class Filler:
    """Lines of source text to bury needles in, with their token counts (computed once per document)."""

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer) -> None:
        self.documents = [d for d in documents if d.strip()]
        if not self.documents:
            raise ValueError("no filler text: every document is empty")
        self.tokenizer = tokenizer
        self._lines: dict[int, tuple[list[str], list[int]]] = {}

    def lines(self, i: int) -> tuple[list[str], list[int]]:
        if i not in self._lines:
            lines = self.documents[i].splitlines(keepends=True)
            counts = [len(ids) for ids in self.tokenizer.encode_batch(lines, add_bos=False, add_eos=False)]
            self._lines[i] = lines, counts
        return self._lines[i]

    def take(self, n_tokens: int, rng: random.Random) -> list[str]:
        """About n_tokens of consecutive lines, from a random line of a random document onwards (continuing into
        further random documents)."""
        out, count = [], 0
        while count < n_tokens:
            lines, counts = self.lines(rng.randrange(len(self.documents)))
            start = rng.randrange(len(lines)) if count == 0 else 0
            for line, c in zip(lines[start:], counts[start:]):
                if count >= n_tokens:
                    break
                out.append(line)
                count += c
        return out


def haystack(filler: Filler, needle: Needle, length: int, depth: float, rng: random.Random,
             others: Sequence[tuple[Needle, float]] = ()) -> str:
    """A prompt of at most `length` tokens (BOS included, as the tokenizer adds it): filler with the needle's
    line at `depth` (0 = first line, 1 = just before the questions) and its question last, so that the answer's
    tokens are the next ones. Depth is measured in lines of filler, which are near-uniform in tokens.

    `others` (training documents; the evaluation plants one needle): further needles planted at their depths
    the same way, each asked and answered, in the given order, before the needle's own question."""
    for _, d in ((needle, depth), *others):
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {d}")
    names = [needle.name] + [n.name for n, _ in others]
    if len(set(names)) != len(names):
        raise ValueError(f"the needles of one haystack need distinct names, got {names}")
    tok = filler.tokenizer
    asked = "".join(n.question + n.answer for n, _ in others) + needle.question
    fixed = len(tok.encode("".join(n.line for n in (needle, *(o for o, _ in others))) + asked))
    if fixed >= length:
        raise ValueError(f"a haystack of {length} tokens has no room for filler (the needles and questions take "
                         f"{fixed})")
    lines = filler.take(length - fixed, rng)
    planted = sorted([(depth, needle), *((d, n) for n, d in others)], key=lambda x: x[0])

    def text() -> str:
        out, start = [], 0
        for d, n in planted:
            at = max(start, round(d * len(lines)))
            out += lines[start:at] + [n.line]
            start = at
        return "".join(out + lines[start:]) + asked

    # Line counts are per line alone; BPE merges across line ends differ a little, so trim until it fits,
    # taking lines from the side away from the needle to keep its depth.
    while lines and len(tok.encode(text())) > length:
        lines.pop(0 if depth > 0.5 else -1)
    return text()


def package_documents(root: Path | None = None) -> list[str]:
    """The stdlib's files grouped by top-level package (a module outside any package is its own document),
    each group's sources concatenated in path order, separated by a path comment."""
    root = root or stdlib_root()
    groups: dict[str, list[str]] = defaultdict(list)
    for path in stdlib_files(root):
        rel = path.relative_to(root)
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if source.strip():
            groups[rel.parts[0]].append(f"# {rel.as_posix()}\n{source}")
    return ["\n".join(parts) for _, parts in sorted(groups.items())]


def retrieval_documents(filler: Filler, n_tokens: int, min_len: int, max_len: int, rng: random.Random,
                        max_needles: int = 1) -> list[dict[str, str]]:
    """Haystacks of uniformly random length with 1 to max_needles needles (fewer in short ones) at uniform depths,
    every question answered, until n_tokens are written (counted by the haystack's target length). Several
    needles per document give several answers to learn from per document, and make each question name which
    of the planted keys it wants."""
    out, count = [], 0
    while count < n_tokens:
        length = rng.randint(min_len, max_len)
        # about 60 tokens per needle (its line, question and answer), leaving at least half the length to filler
        names = rng.sample(_NAMES, rng.randint(1, max(1, min(max_needles, length // 120))))
        needles = [Needle(name, draw_key(rng)) for name in names]
        others = [(n, rng.random()) for n in needles[1:]]
        out.append({"text": haystack(filler, needles[0], length - 4, rng.random(), rng, others)
                    + needles[0].answer + "\n"})
        count += length
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv2.train.longdocs", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", required=True, help="the pretrained checkpoint (tokenizer.json) to count with")
    parser.add_argument("--seq-len", type=int, default=2048, help="the extension's training length: the longest "
                        "retrieval document")
    parser.add_argument("--min-len", type=int, default=256, help="the shortest retrieval document, in tokens")
    parser.add_argument("--max-needles", type=int, default=1,
                        help="needles per retrieval document, at most (about one per 120 tokens of it)")
    parser.add_argument("--needle-share", type=float, default=0.25,
                        help="retrieval documents' share of the tokens written (the rest is long natural text)")
    parser.add_argument("--mix-with", nargs="*", default=[], metavar="JSONL",
                        help="other corpora the extension trains on, counted in the needle share")
    parser.add_argument("--stdlib-root", default=None, metavar="DIR",
                        help="the source tree whose packages become documents (default: this Python's stdlib)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 <= args.needle_share < 1.0:
        parser.error(f"--needle-share must be in [0, 1), got {args.needle_share}")
    if args.max_needles < 1:
        parser.error(f"--max-needles must be at least 1, got {args.max_needles}")
    if not 0 < args.min_len <= args.seq_len:
        parser.error(f"need 0 < --min-len <= --seq-len, got {args.min_len} and {args.seq_len}")
    tok = Tokenizer.from_dir(args.tokenizer)
    out = Path(args.out_dir)
    docs = package_documents(Path(args.stdlib_root) if args.stdlib_root else None)
    natural = sum(len(ids) for ids in tok.encode_batch(docs, add_bos=False, add_eos=False))
    write_jsonl(out / "long-stdlib.jsonl", ({"text": d} for d in docs))
    print(f"{out / 'long-stdlib.jsonl'}: {len(docs)} package documents, {natural} tokens")
    for path in args.mix_with:
        mixed = sum(len(ids) for ids in tok.encode_batch([r["text"] for r in read_jsonl(path)],
                                                         add_bos=False, add_eos=False))
        print(f"{path}: {mixed} tokens in the mix")
        natural += mixed
    rng = random.Random(args.seed)
    n_needle = round(natural * args.needle_share / (1 - args.needle_share))
    filler = Filler([r["text"] for r in read_jsonl(out / "stdlib.jsonl")] if (out / "stdlib.jsonl").exists()
                    else docs, tok)
    records = retrieval_documents(filler, n_needle, args.min_len, args.seq_len, rng, args.max_needles)
    write_jsonl(out / "long-needles.jsonl", records)
    print(f"{out / 'long-needles.jsonl'}: {len(records)} retrieval documents, ~{n_needle} tokens "
          f"({100 * n_needle / (natural + n_needle):.0f}% of the mix)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
