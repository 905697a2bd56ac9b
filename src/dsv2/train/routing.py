"""Training-time routing: device-limited selection (§2.2.2) and device-level token dropping (§2.2.4).

Both act through what model/moe.py exposes: device-limited routing is the checkpoint's `group_limited_greedy`
with one group per device, and dropping is a policy the trainer passes with each forward (`moe.Dropping`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.moe import MoE, Routing


def device_limited(cfg: ModelConfig, n_devices: int, max_devices: int) -> ModelConfig:
    """The config whose router sends each token to experts on at most `max_devices` of `n_devices` devices.

    The devices with the highest *max* expert affinity are kept (the paper's rule, and V2's released gate);
    ModelConfig's validation rejects an n_devices that does not divide the experts or an M too small for K.
    The result is a valid HF config: inference routes exactly as training did.
    """
    if cfg.n_routed_experts is None:
        raise ValueError("device-limited routing needs a MoE model (n_routed_experts is null)")
    return cfg.replace(topk_method="group_limited_greedy", n_group=n_devices, topk_group=max_devices)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[Routing]]:
    """Collect each MoE layer's Routing (with its dropping mask) in layer order while the block runs.

    A hook on the routed experts' input, rather than the forward's routing_out list: FSDP's forward hooks may
    copy a list argument, and activation checkpointing would append again while recomputing in backward.
    """
    out: list[Routing] = []
    handles = [moe.experts.register_forward_pre_hook(lambda _module, args: out.append(args[1]))
               for moe in moe_layers(model)]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


def protected_blocks(n_blocks: int, fraction: float, seed: int) -> np.ndarray:
    """(n_blocks,) bool: exactly round(fraction * n_blocks) training sequences whose tokens are never dropped,
    a seeded choice fixed for the whole run (the paper protects ~10% of sequences; how is not public)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"protected fraction must be in [0, 1], got {fraction}")
    chosen = np.random.default_rng([seed, 0x5EED]).permutation(n_blocks)[: round(fraction * n_blocks)]
    mask = np.zeros(n_blocks, dtype=bool)
    mask[chosen] = True
    return mask
