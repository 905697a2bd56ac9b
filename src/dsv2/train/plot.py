"""`dsv2 plot RUN_DIR`: the loss curves and the expert-load heatmap of a training run, as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsv2.train.metrics import read_metrics

BALANCE = ("expert_balance", "device_balance", "communication_balance")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png and expert_load.png (into out_dir, default the run directory); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no steps yet")
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_losses(records, out / "loss.png")]
    if records[-1].get("moe"):
        paths.append(_expert_load(records, out / "expert_load.png"))
    return paths


def _losses(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    present = [k for k in BALANCE if k in records[-1]]
    fig, axes = plt.subplots(1, 1 + bool(present), figsize=(6 + 5 * bool(present), 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["lm_loss"] for r in records], label="LM cross-entropy")
    ax.set(xlabel="step", ylabel="loss", title="language-model loss")
    ax.legend()
    if present:
        for k in present:
            axes[0][1].plot(steps, [r[k] for r in records], label=k.replace("_", " "))
        axes[0][1].set(xlabel="step", ylabel="α-weighted loss", title="balance losses")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _expert_load(records: list[dict[str, Any]], path: Path) -> Path:
    """Left: each MoE layer's load per expert at the last logged step, relative to the mean (1 = balanced).
    Right: max/mean load of each layer over the run."""
    import matplotlib.pyplot as plt
    import numpy as np

    last = records[-1]["moe"]
    load = np.array([layer["load"] for layer in last], dtype=float)
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(last) + 3))
    im = ax.imshow(rel, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load / mean, step {records[-1]['step']}",
           yticks=range(len(last)))
    fig.colorbar(im, ax=ax)
    steps = [r["step"] for r in records]
    for i in range(len(last)):
        ax2.plot(steps, [r["moe"][i]["max_mean"] for r in records], label=f"MoE layer {i}")
    ax2.set(xlabel="step", ylabel="max / mean expert load", title="load imbalance")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
