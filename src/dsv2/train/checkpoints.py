"""Resumable training state: checkpoints/step-NNNNNNNN/rank-RRRRR.pt, one file per rank.

Each file is a torch.save of tensors, numbers, strings, lists and dicts only, loaded back with
torch.load(weights_only=True) -- never arbitrary pickles. Sharded (DTensor) parameters and optimizer states
are stored as their local shards and re-wrapped on load. A checkpoint directory is written under a
temporary name and renamed when every rank has finished, so a crash leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_PREFIX = "step-"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def step_of(directory: Path) -> int:
    """The training step a checkpoint directory holds (its name: step-NNNNNNNN)."""
    return int(directory.name[len(_PREFIX):])


def latest(root: Path) -> Path | None:
    """The newest finished checkpoint under root (None if there is none, or no root); temporary ones never count."""
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name[len(_PREFIX):].isdigit())
    return done[-1] if done else None


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.pt"


def write_rank_state(root: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write this rank's file into the step's temporary directory; `publish` makes it visible."""
    tmp = checkpoint_dir(root, step).with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    path = rank_file(tmp, rank)
    with open(path.with_suffix(".partial"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path.with_suffix(".partial"), path)
    return tmp


def publish(root: Path, step: int, keep: int) -> None:
    """Rename the finished temporary directory into place (main rank, after every rank wrote), keep the newest."""
    final = checkpoint_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(final.with_suffix(".tmp"), final)
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.suffix != ".tmp")
    for old in done[:-keep]:
        shutil.rmtree(old)


def read_rank_state(directory: Path, rank: int) -> dict[str, Any]:
    path = rank_file(directory, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: resume with the same number of ranks as the checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _local(v).detach().clone() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    if set(current) != set(state):
        raise ValueError(f"checkpoint does not match the model: missing {sorted(set(current) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(current))[:5]}")
    with torch.no_grad():
        for name, value in current.items():
            _local(value).copy_(state[name])


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: _local(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    optimizer.load_state_dict(state)
    # load_state_dict leaves plain tensors; a sharded parameter's moments must be DTensors laid out like it.
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                for k, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
                        optimizer.state[p][k] = DTensor.from_local(v, p.device_mesh, p.placements,
                                                                   shape=p.shape, stride=p.stride())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
