"""Fill-in-the-middle documents for pretraining, and the held-out cases that measure the skill.

DeepSeek-Coder-V2 pretrains on code with FIM at a rate of 0.5 in PSM mode: the document becomes

    <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle

(then EOS, as every pretraining document), the order in which `Tokenizer.fim_prompt` asks for a middle, so a model
trained on them completes a FIM prompt with the middle and stops. The tiny model reads 256 tokens at a time, so
the documents here are line-aligned chunks of source of at most `chunk_chars` characters (about 200 tokens at the
tiny vocabulary's ~3 characters per token of code), and the middle is 1 to `max_lines` whole lines: what an
editor asks to fill, and the shape of the evaluation's cases (one line removed). The plain source stays in the
corpus beside them, so `fraction` is the share of chunks that also appear in FIM form.

    python -m dsv2.train.fim data/tiny/stdlib.jsonl data/tiny/stdlib-fim.jsonl --fraction 0.25   # make tiny-model
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from dsv2.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE

CHUNK_CHARS = 600


class Hole(NamedTuple):
    prefix: str
    middle: str
    suffix: str

    def document(self) -> str:
        """The PSM training text."""
        return f"{FIM_BEGIN}{self.prefix}{FIM_HOLE}{self.suffix}{FIM_END}{self.middle}"


def chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Consecutive lines of `text` (each keeping its newline), at most chunk_chars characters per chunk; a line
    longer than that is a chunk of its own."""
    lines = text.splitlines(keepends=True)
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > chunk_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


def _filled(line: str) -> bool:
    """A line worth asking for: some code, not only blanks or a bracket."""
    return len(line.strip()) >= 4


def cut(lines: Sequence[str], rng: random.Random, max_lines: int = 3, context: bool = False) -> Hole | None:
    """A hole of 1 to max_lines lines starting at a line with code; context: keep at least one line on each
    side (the evaluation's cases). None if the chunk has no such place."""
    lo, hi = (1, len(lines) - 1) if context else (0, len(lines))
    starts = [i for i in range(lo, hi) if _filled(lines[i])]
    if not starts:
        return None
    i = rng.choice(starts)
    n = 1 if context else rng.randint(1, max_lines)
    j = min(i + n, hi)
    return Hole("".join(lines[:i]), "".join(lines[i:j]), "".join(lines[j:]))


def fim_documents(texts: Iterable[str], fraction: float, rng: random.Random, chunk_chars: int = CHUNK_CHARS,
                  max_lines: int = 3) -> list[str]:
    """PSM documents from a `fraction` of the chunks of `texts`, in order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    out = []
    for text in texts:
        for chunk in chunks(text, chunk_chars):
            if rng.random() < fraction and (hole := cut(chunk, rng, max_lines)) is not None:
                out.append(hole.document())
    return out


def heldout_holes(texts: Iterable[str], n: int, rng: random.Random, chunk_chars: int = CHUNK_CHARS) -> list[Hole]:
    """n evaluation cases: one line with code removed from a chunk of held-out source, with at least a line of
    prefix and of suffix, each from a different chunk drawn at random."""
    candidates = [c for text in texts for c in chunks(text, chunk_chars) if len(c) >= 3]
    rng.shuffle(candidates)
    holes = []
    for chunk in candidates:
        if (hole := cut(chunk, rng, context=True)) is not None:
            holes.append(hole)
            if len(holes) == n:
                break
    if len(holes) < n:
        raise ValueError(f"only {len(holes)} evaluation cases in the held-out text, {n} wanted")
    return holes


def main(argv: list[str] | None = None) -> int:
    from dsv2.train.data import documents
    from dsv2.train.tasks import write_jsonl

    p = argparse.ArgumentParser(prog="python -m dsv2.train.fim", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="code documents: a .jsonl of {'text': ...} or a text file")
    p.add_argument("out", help="the .jsonl of FIM documents to write")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the chunks also written in FIM form")
    p.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS)
    p.add_argument("--max-lines", type=int, default=3, help="longest middle, in lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.chunk_chars < 1 or args.max_lines < 1:
        p.error("--chunk-chars and --max-lines must be positive")
    source = Path(args.source)
    if not source.is_file():
        p.error(f"no such file: {source}")
    docs = fim_documents(documents(source), args.fraction, random.Random(args.seed), args.chunk_chars,
                         args.max_lines)
    write_jsonl(args.out, ({"text": d} for d in docs))
    print(f"{args.out}: {len(docs)} FIM documents, {sum(map(len, docs)):,} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
