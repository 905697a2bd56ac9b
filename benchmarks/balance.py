"""Expert-load balance with and without the expert-level balance loss (α1), on the tiny recipe and real text.

Two runs of `recipes/tiny.toml` that differ only in `moe.expert_balance` (the recipe's α1, then 0), same seed,
data and steps; the device- and communication-level losses (α2, α3) and token dropping stay as the recipe sets
them. For each step we take max/mean expert load per MoE layer (tokens routed to the busiest expert over the
mean), averaged over layers, and report the median of the last 10% of steps; the curves go to a PNG.

    python benchmarks/balance.py --data data/tiny/stdlib.jsonl data/tiny/train-text.jsonl \
        [--steps 300] [--out docs/balance.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from dsv2.train.config import TrainConfig
from dsv2.train.trainer import train

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.toml"


def run(data: list[str], steps: int, alpha1: float | None, root: Path, tokenizer: str | None) -> list[float]:
    """One run; returns max/mean expert load per step (averaged over the MoE layers)."""
    overrides = [f"data.paths={json.dumps(data)}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
                 f"train.out_dir={root / f'alpha1-{alpha1}'}", "train.log_every=1"]
    if tokenizer:
        overrides.append(f"data.tokenizer={tokenizer}")
    if alpha1 is not None:
        overrides.append(f"moe.expert_balance={alpha1}")
    out = train(TrainConfig.from_toml(RECIPE, overrides))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [statistics.fmean(layer["max_mean"] for layer in r["moe"]) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="text/JSONL files, as data.paths")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokenizer", default=None, help="data.tokenizer (default: the recipe's, a trained BPE)")
    parser.add_argument("--out", default="docs/balance.png")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    alpha1 = TrainConfig.from_toml(RECIPE).moe.expert_balance
    with tempfile.TemporaryDirectory() as tmp:
        curves = {f"α1 = {alpha1}": run(args.data, args.steps, None, Path(tmp), args.tokenizer),
                  "α1 = 0": run(args.data, args.steps, 0.0, Path(tmp), args.tokenizer)}
    tail = max(1, args.steps // 10)
    print(f"tiny recipe, {args.steps} steps; max/mean expert load (mean over MoE layers), median of last {tail} steps")
    print("| α1 | max/mean |\n|---|---|")
    for name, curve in curves.items():
        print(f"| {name.split('= ')[1]} | {statistics.median(curve[-tail:]):.3f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set(xlabel="step", ylabel="max / mean expert load", title="tiny recipe: expert load with and without α1")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
