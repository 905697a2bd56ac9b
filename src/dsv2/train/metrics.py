"""Per-step training statistics: losses and, per MoE layer, expert load and dropped assignments."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv2.model.moe import Routing


@dataclass
class StepStats:
    """Sums over the micro-batches of one step (and, once reduced, over data-parallel ranks)."""

    n_experts: int
    n_layers: int
    # On the training device, so that a GPU step is not stopped by a host copy per micro-batch and layer, and the
    # sums are all-reduced where the process group works (nccl reduces only GPU tensors).
    device: torch.device | str = "cpu"
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # fp64, summed over micro-batches
    micro_batches: int = 0
    load: torch.Tensor | None = None  # (layers, E) selections, before dropping
    dropped: torch.Tensor | None = None  # (layers,) dropped assignments

    def __post_init__(self) -> None:
        self.load = torch.zeros(self.n_layers, self.n_experts, dtype=torch.float64, device=self.device)
        self.dropped = torch.zeros(self.n_layers, dtype=torch.float64, device=self.device)

    def add(self, losses: dict[str, torch.Tensor], routings: list[Routing]) -> None:
        self.micro_batches += 1
        for name, value in losses.items():
            value = value.detach().double()
            self.losses[name] = self.losses[name] + value if name in self.losses else value
        for i, r in enumerate(routings):
            # scatter_add_, not bincount: CUDA's bincount reads the largest id back to the host (a sync per layer)
            flat = r.indices.flatten()
            self.load[i].scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
            if r.kept is not None:
                self.dropped[i] += (~r.kept).sum()

    def summary(self) -> dict[str, Any]:
        """Mean losses, and per layer: max/mean load, coefficient of variation, dropped fraction, raw load."""
        out: dict[str, Any] = {k: float(v) / max(self.micro_batches, 1) for k, v in self.losses.items()}
        layers = []
        for i in range(self.n_layers):
            load = self.load[i]
            mean = load.mean().item()
            layers.append({
                "max_mean": load.max().item() / mean if mean else 0.0,
                "cv": load.std(unbiased=False).item() / mean if mean else 0.0,
                "dropped": self.dropped[i].item() / load.sum().item() if mean else 0.0,
                "load": [int(x) for x in load.tolist()],
            })
        out["moe"] = layers
        return out


class MetricsLog:
    """Append-only JSONL, one object per logged step; truncated back to a checkpoint on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is it a `dsv2 train` run directory?)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
