"""Pieces of a training step: routing capture, activation checkpointing, bf16 autocast, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv2 import Transformer
from dsv2.model.moe import DeviceCapacity, Dropping
from dsv2.train.losses import BalanceCoefficients, balance_losses
from dsv2.train.parallel import apply_activation_checkpointing, unwrapped_state_dict
from dsv2.train.plot import plot_run
from dsv2.train.routing import record_routing
from tests.conftest import randomize_, small_config

COEFFS = BalanceCoefficients(expert=0.01, device=0.05, communication=0.02)


def step_grads(model: torch.nn.Module, ids: torch.Tensor, autocast: bool = False
               ) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    dropping = Dropping(DeviceCapacity(n_devices=4, capacity_factor=0.75), torch.tensor([True, False, False]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), record_routing(model) as routings:
        lm = model(ids[:, :-1], labels=ids[:, 1:], dropping=dropping)
    loss = lm + sum(balance_losses(routings, 3, COEFFS, 4, 2).values())
    loss.backward()
    names = {id(p): n.replace(".block.", ".") for n, p in model.named_parameters()}
    return loss.item(), len(routings), {names[id(p)]: p.grad for p in model.parameters()}


def dropping_model(cfg_seed: int = 0) -> Transformer:
    cfg = small_config(num_hidden_layers=3, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    return randomize_(Transformer(cfg), seed=cfg_seed, std=0.1).train()


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    """Recomputation in backward must route and drop exactly as the forward did (protected mask still set,
    routing recorded once per layer)."""
    ids = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    plain = dropping_model()
    wrapped = dropping_model()
    apply_activation_checkpointing(wrapped)
    assert unwrapped_state_dict(wrapped).keys() == plain.state_dict().keys()
    loss_a, n_a, grads_a = step_grads(plain, ids)
    loss_b, n_b, grads_b = step_grads(wrapped, ids)
    assert n_a == n_b == plain.cfg.num_moe_layers
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, atol=1e-6), name


def test_bf16_autocast_step_reaches_every_parameter() -> None:
    ids = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(1))
    model = dropping_model()
    loss_fp32, _, _ = step_grads(model, ids)
    loss, _, grads = step_grads(model, ids, autocast=True)
    assert loss == pytest.approx(loss_fp32, rel=2e-2)
    for name, g in grads.items():
        assert g is not None and bool(torch.isfinite(g).all()), name
    assert grads["layers.1.ffn.gate.weight"].abs().sum() > 0


def test_plot_writes_pngs(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 5.0 - s, "lm_loss": 4.9 - s, "expert_balance": 0.01, "device_balance": 0.05,
                "moe": [{"max_mean": 1.5 - 0.1 * s, "cv": 0.2, "dropped": 0.1, "load": [3 + s, 5, 2, 6]}] * 2}
               for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = plot_run(tmp_path, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "expert_load.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no steps"):
        plot_run(tmp_path)
