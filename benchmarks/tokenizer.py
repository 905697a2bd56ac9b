"""Encode throughput of dsv2's Tokenizer vs transformers' fast tokenizer on the real DeepSeek-V2 tokenizer files.

Both wrap the same Rust core; the claim is that dsv2 adds no overhead (target: within 10%). Text: ~10 MB built
deterministically from the CPython standard library sources plus generated CJK/emoji text. Same process, the two
sides alternated (order flipped every repetition), medians of several repetitions. Reported twice: MB per wall
second, and MB per CPU second of the process (all threads), which a busy shared machine disturbs far less.

    python benchmarks/tokenizer.py [--mb 10] [--reps 5] [--doc-kb 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer

from dsv2.tokenizer import Tokenizer, named_tokenizer_dir


def build_text(target_bytes: int) -> str:
    """Stdlib sources in sorted path order (90%), then seeded CJK/emoji/punctuation text (10%)."""
    stdlib = Path(os.path.dirname(os.__file__))
    parts: list[str] = []
    size = 0
    for path in sorted(stdlib.rglob("*.py")):
        if size >= 0.9 * target_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode("utf-8"))
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("😀🎉🚀👍❤️🇨🇳，。！？「」 \n") + ["👨‍👩‍👧"]
    while size < target_bytes:
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 200))) + "\n"
        parts.append(line)
        size += len(line.encode("utf-8"))
    return "".join(parts)


def split_docs(text: str, doc_bytes: int) -> list[str]:
    """Line-aligned documents of about doc_bytes each."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line.encode("utf-8"))
        if size >= doc_bytes:
            docs.append("".join(current))
            current, size = [], 0
    if current:
        docs.append("".join(current))
    return docs


def seconds(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU of every thread in the process) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--doc-kb", type=float, default=4.0)
    args = parser.parse_args()

    text = build_text(int(args.mb * 1e6))
    docs = split_docs(text, int(args.doc_kb * 1000))
    mb = len(text.encode("utf-8")) / 1e6
    ours = Tokenizer.from_name("deepseek-v2")
    theirs = AutoTokenizer.from_pretrained(named_tokenizer_dir("deepseek-v2"))

    cases = {
        "one string": (
            lambda: ours.encode(text, add_bos=False),
            lambda: theirs(text, add_special_tokens=False)["input_ids"],
        ),
        f"batch of {len(docs)} docs": (
            lambda: ours.encode_batch(docs, add_bos=False),
            lambda: theirs(docs, add_special_tokens=False)["input_ids"],
        ),
    }
    print(f"text: {mb:.2f} MB, {len(docs)} docs; {os.cpu_count()} cores, {platform.machine()}; {args.reps} reps")
    print("| case | dsv2 MB/s | transformers MB/s | ratio | dsv2 MB/CPU-s | transformers MB/CPU-s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (dsv2_fn, hf_fn) in cases.items():
        if dsv2_fn() != hf_fn():
            raise SystemExit(f"{name}: dsv2 and transformers disagree on the ids")
        times: dict[str, list[tuple[float, float]]] = {"dsv2": [], "hf": []}
        for rep in range(args.reps):
            order = [("dsv2", dsv2_fn), ("hf", hf_fn)]
            for side, fn in order if rep % 2 == 0 else order[::-1]:
                times[side].append(seconds(fn))
        wall = {side: mb / statistics.median([t[0] for t in ts]) for side, ts in times.items()}
        cpu = {side: mb / statistics.median([t[1] for t in ts]) for side, ts in times.items()}
        print(f"| encode, {name} | {wall['dsv2']:.2f} | {wall['hf']:.2f} | {wall['dsv2'] / wall['hf']:.2f} "
              f"| {cpu['dsv2']:.2f} | {cpu['hf']:.2f} | {cpu['dsv2'] / cpu['hf']:.2f} |")


if __name__ == "__main__":
    main()
