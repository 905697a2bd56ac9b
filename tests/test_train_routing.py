"""Device-limited routing (§2.2.2) and device-level token dropping (§2.2.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.model.moe import DeviceCapacity, Dropping, MoE, Router, Routing
from dsv2.train.routing import device_limited, protected_blocks
from tests.conftest import randomize_, small_config


@settings(max_examples=60, deadline=None)
@given(n_devices=st.sampled_from([2, 3, 4, 8]), data=st.data())
def test_device_limited_routing_uses_at_most_m_devices(n_devices: int, data: st.DataObject) -> None:
    per_device = data.draw(st.integers(1, 5))
    M = data.draw(st.integers(1, n_devices))
    K = data.draw(st.integers(1, M * per_device))
    E = n_devices * per_device
    cfg = device_limited(small_config(n_routed_experts=E, num_experts_per_tok=K), n_devices, M)
    router = Router(cfg)
    seed = data.draw(st.integers(0, 2**31 - 1))
    randomize_(router, seed, std=data.draw(st.sampled_from([0.05, 1.0, 5.0])))
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    routing = router(x)
    device_TK = routing.indices // per_device
    for t in range(64):
        assert len(set(device_TK[t].tolist())) <= M
    # the devices allowed are the M with the highest max affinity, and inside them the K best experts win
    best = routing.scores.view(64, n_devices, per_device).amax(-1).topk(M, dim=-1).indices
    allowed = torch.zeros(64, n_devices, dtype=torch.bool).scatter_(1, best, True)
    allowed_TE = allowed.repeat_interleave(per_device, dim=1)
    want = routing.scores.masked_fill(~allowed_TE, -1.0).topk(K, dim=-1).values.sort(-1).values
    got = routing.scores.gather(1, routing.indices).sort(-1).values
    assert torch.equal(got, want)


def test_device_limited_config_is_validated() -> None:
    with pytest.raises(ValueError, match="n_routed_experts"):
        device_limited(small_config(n_routed_experts=8), 3, 1)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        device_limited(small_config(n_routed_experts=8, num_experts_per_tok=3), 4, 1)  # 1 device holds 2


def routing_of(scores: torch.Tensor, K: int) -> Routing:
    weights, indices = scores.topk(K, dim=-1)
    return Routing(weights, indices, scores)


def test_capacity_hand_example() -> None:
    """4 tokens, top-1, 2 devices of 2 experts, factor 1: capacity ceil(4*1/2) = 2 per device.
    Tokens 0-2 pick device 0 with affinities .5, .7, .6 -> the .5 one is dropped; token 3 fits on device 1."""
    scores = torch.tensor([[.5, .2, .2, .1], [.1, .7, .1, .1], [.6, .2, .1, .1], [.1, .1, .1, .7]])
    kept = DeviceCapacity(n_devices=2, capacity_factor=1.0).keep(routing_of(scores, 1), None)
    assert kept.squeeze(1).tolist() == [False, True, True, True]
    # the same token protected is kept, and the lowest unprotected one (.6) goes instead
    kept = DeviceCapacity(2, 1.0).keep(routing_of(scores, 1), torch.tensor([True, False, False, False]))
    assert kept.squeeze(1).tolist() == [True, True, False, True]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), factor=st.sampled_from([0.5, 1.0, 1.25]), D=st.sampled_from([1, 2, 4]),
       K=st.integers(1, 4), protect=st.floats(0.0, 0.5))
def test_dropping_respects_capacity_and_protection(seed: int, factor: float, D: int, K: int, protect: float) -> None:
    g = torch.Generator().manual_seed(seed)
    T, E = 48, 8
    scores = (3 * torch.randn(T, E, generator=g)).softmax(-1)
    routing = routing_of(scores, K)
    protected = torch.rand(T, generator=g) < protect
    policy = DeviceCapacity(D, factor)
    kept = policy.keep(routing, protected)
    cap = math.ceil(factor * T * K / D)
    assert policy.capacity(T, K) == cap
    device = routing.indices // (E // D)
    affinity = scores.gather(1, routing.indices)
    assert bool(kept[protected].all())  # a protected sequence never loses an assignment
    for d in range(D):
        on_d = device == d
        n_protected = int((on_d & protected[:, None]).sum())
        assert int((on_d & kept).sum()) == max(min(int(on_d.sum()), cap), n_protected)
        # what is dropped has lower affinity than every unprotected assignment kept on that device
        dropped, kept_free = affinity[on_d & ~kept], affinity[on_d & kept & ~protected[:, None]]
        if dropped.numel() and kept_free.numel():
            assert dropped.max() <= kept_free.min()


def test_moe_drops_only_when_asked_and_dropped_tokens_keep_shared_experts() -> None:
    cfg = small_config(n_routed_experts=8, num_experts_per_tok=2)
    moe = randomize_(MoE(cfg), seed=11)
    x = torch.randn(4, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = moe(x)
    dropping = Dropping(DeviceCapacity(n_devices=4, capacity_factor=0.5), torch.tensor([False, True, False, False]))
    out: list[Routing] = []
    dropped = moe(x, routing_out=out, dropping=dropping)
    ref = moe(x, reference=True, dropping=dropping)
    kept = out[0].kept.view(4, 6, 2)
    assert not bool(kept.all()) and bool(kept[1].all())
    assert torch.allclose(dropped, ref, atol=1e-5)
    fully_dropped = ~kept.any(-1)  # (B, S): tokens that lost every routed expert
    assert bool(fully_dropped.any())
    assert torch.allclose(dropped[fully_dropped], moe.shared(x[fully_dropped]), atol=1e-6)
    out = []
    assert torch.equal(moe(x, routing_out=out), plain)
    assert out[0].kept is None


def test_protected_mask_must_match_batch() -> None:
    cfg = small_config()
    moe = MoE(cfg)
    dropping = Dropping(DeviceCapacity(n_devices=2), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="protected"):
        moe(torch.randn(2, 3, cfg.hidden_size), dropping=dropping)


def test_protected_blocks_are_an_exact_seeded_fraction() -> None:
    a, b = protected_blocks(1000, 0.1, seed=7), protected_blocks(1000, 0.1, seed=7)
    assert a.sum() == 100 and np.array_equal(a, b)
    assert not np.array_equal(a, protected_blocks(1000, 0.1, seed=8))
    with pytest.raises(ValueError, match="fraction"):
        protected_blocks(10, 1.5, seed=0)
