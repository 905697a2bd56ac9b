"""The model against itself: absorbed decode vs naive attention, grouped vs loop experts, the router."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2 import LatentCache, Transformer
from dsv2.kernels import onednn
from dsv2.model.moe import DeviceCapacity, MoE, Router
from tests.conftest import randomize_, small_config


@pytest.mark.parametrize("q_lora_rank", [None, 32])
@torch.no_grad()
def test_absorbed_decode_equals_naive_forward(q_lora_rank: int | None) -> None:
    """Prefill 8 tokens into the latent cache, then decode 64 tokens one at a time with absorbed attention;
    every step's logits equal the naive full-sequence forward at that position."""
    cfg = small_config(q_lora_rank=q_lora_rank, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    model = randomize_(Transformer(cfg), seed=5).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 72))
    full = model(ids)
    cache = LatentCache(cfg, batch_size=2, max_len=72)
    steps = [model(ids[:, :8], cache=cache)]
    for t in range(8, 72):
        steps.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.length == 72
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4
    # the cache holds exactly kv_lora_rank + qk_rope_head_dim values per token per layer
    assert cache.layers[0].shape == (2, 72, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


@torch.no_grad()
def test_latent_cache_overflow_is_an_error() -> None:
    cfg = small_config()
    model = Transformer(cfg).eval()
    cache = LatentCache(cfg, batch_size=1, max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_loop_reference(dtype: torch.dtype) -> None:
    cfg = small_config(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy",
                       n_group=4, topk_group=2, routed_scaling_factor=3.0)
    moe = randomize_(MoE(cfg), seed=7).to(dtype)
    x = torch.randn(3, 50, cfg.hidden_size, dtype=dtype, requires_grad=True)
    fast = moe(x)
    ref = moe(x, reference=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (fast.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()
    # gradients flow through the grouped path to the inputs, experts and router alike
    grads = torch.autograd.grad(fast.float().square().sum(), [x, moe.experts.w13, moe.gate.weight])
    ref_grads = torch.autograd.grad(ref.float().square().sum(), [x, moe.experts.w13, moe.gate.weight])
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r.float()).abs().max().item() <= 20 * tol * r.float().abs().max().item()


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("n_tokens", [3, 40])
def test_training_experts_equal_loop_reference_with_dropping(gemm: str, n_tokens: int) -> None:
    # The training path (grouped over the kept pairs) against autograd through the per-expert loop: the
    # output and the gradients of the input, both expert stacks and the router, with token dropping on (so
    # some assignments are skipped) and, at 3 tokens x 4 slots < 16 experts, experts that get no rows.
    if gemm == "onednn" and not onednn.available():
        pytest.skip("oneDNN fp32 products need an x86 CPU")
    cfg = small_config(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy",
                       n_group=4, topk_group=2, routed_scaling_factor=3.0)
    moe = randomize_(MoE(cfg), seed=11)
    if gemm == "onednn":
        onednn.use_for_training_(moe)
    x = torch.randn(1, n_tokens, cfg.hidden_size, requires_grad=True)
    routing = moe.gate(x[0])
    routing = routing._replace(kept=DeviceCapacity(n_devices=4, capacity_factor=0.5).keep(routing, None))
    assert not routing.kept.all()
    fast = moe.experts(x[0], routing)
    ref = moe.experts.forward_loop(x[0], routing)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    wrt = [x, moe.experts.w13, moe.experts.w2, moe.gate.weight]
    up = torch.randn_like(ref)
    grads = torch.autograd.grad(fast, wrt, up, retain_graph=True)  # the router's graph is shared
    ref_grads = torch.autograd.grad(ref, wrt, up)
    for name, g, r in zip(["x", "w13", "w2", "router"], grads, ref_grads):
        assert r.abs().max() > 0, name
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), name
    if n_tokens == 3:  # idle experts keep exactly zero gradient
        idle = torch.ones(16, dtype=torch.bool)
        idle[routing.indices[routing.kept]] = False
        assert idle.any() and grads[1][idle].eq(0).all() and grads[2][idle].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_sized_expert_path_equals_grouped_path(dtype: torch.dtype) -> None:
    # Up to E / K tokens without autograd take one matrix-vector chain per assignment, summed in the grouped
    # path's order. One token: bit-identical to the grouped path (batch-1 decode). More tokens: an expert that
    # two tokens share multiplies 2 rows there and 1 here, which BLAS may round differently in the last bit.
    cfg = small_config(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy",
                       n_group=4, topk_group=2, routed_scaling_factor=3.0)
    moe = randomize_(MoE(cfg), seed=3).to(dtype)
    x = torch.randn(4, cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        for T in (1, 2, 4):  # 4 tokens x 4 slots = 16 experts: the largest batch on the few-token path
            routing = moe.gate(x[:T])
            few = moe.experts(x[:T], routing)
            with torch.enable_grad():  # autograd on: the grouped path
                grouped = moe.experts(x[:T], routing)
            if T == 1:
                assert torch.equal(few, grouped)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert (few.float() - grouped.float()).abs().max() <= tol * grouped.float().abs().max()
            ref = moe.experts.forward_loop(x[:T], routing)
            assert (few.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
            # the tensor-only form the compiled decode traces (run eagerly here: same arithmetic)
            gathered = moe.experts._forward_gathered(x[:T], routing)
            assert (gathered.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


@settings(max_examples=60, deadline=None)
@given(n_group=st.sampled_from([2, 4, 8]), data=st.data())
def test_group_limited_routing_stays_in_kept_groups(n_group: int, data: st.DataObject) -> None:
    per_group = data.draw(st.integers(1, 6))
    topk_group = data.draw(st.integers(1, n_group))
    top_k = data.draw(st.integers(1, topk_group * per_group))
    E = n_group * per_group
    cfg = small_config(n_routed_experts=E, num_experts_per_tok=top_k, topk_method="group_limited_greedy",
                       n_group=n_group, topk_group=topk_group)
    router = Router(cfg)
    seed = data.draw(st.integers(0, 2**31 - 1))
    randomize_(router, seed, std=1.0)
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    routing = router(x)
    scores = routing.scores.view(40, n_group, per_group)
    # the kept groups are those with the highest *max* expert score
    kept = torch.topk(scores.amax(-1), topk_group, dim=-1).indices  # (T, topk_group)
    chosen_groups = routing.indices // per_group
    assert bool((chosen_groups[:, :, None] == kept[:, None, :]).any(-1).all())
    # and inside them the K best experts are taken, with their raw probabilities as weights
    group_of = torch.arange(E) // per_group
    in_kept = (group_of[None, :, None] == kept[:, None, :]).any(-1)  # (T, E)
    best = torch.topk(routing.scores.masked_fill(~in_kept, -1.0), top_k, dim=-1).values.sort(-1).values
    assert torch.equal(routing.weights.sort(-1).values, best)


def test_router_weights_scaling_vs_renormalisation() -> None:
    """norm_topk_prob renormalises the K weights to sum 1 and then ignores routed_scaling_factor;
    without it, the weights are the raw softmax probabilities times routed_scaling_factor."""
    x = torch.randn(30, 64)
    plain = randomize_(Router(small_config(routed_scaling_factor=16.0)), seed=3, std=0.5)
    normed = Router(small_config(routed_scaling_factor=16.0, norm_topk_prob=True))
    normed.load_state_dict(plain.state_dict())
    a, b = plain(x), normed(x)
    assert torch.equal(a.indices, b.indices)
    raw = a.scores.gather(1, a.indices)
    assert torch.allclose(a.weights, raw * 16.0)
    assert torch.allclose(b.weights, raw / raw.sum(-1, keepdim=True))
    assert torch.allclose(b.weights.sum(-1), torch.ones(30))
    assert bool((a.scores.sum(-1) - 1).abs().max() < 1e-5)  # softmax over all routed experts
    # a single expert per token is never renormalised (the official `top_k > 1` condition)
    one = Router(small_config(num_experts_per_tok=1, routed_scaling_factor=2.0, norm_topk_prob=True))
    one.load_state_dict(plain.state_dict())
    r = one(x)
    assert torch.allclose(r.weights[:, 0], r.scores.gather(1, r.indices)[:, 0] * 2.0)


def test_moe_layer_frequency_follows_official_rule() -> None:
    cfg = small_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = Transformer(cfg)
    kinds = [type(block.ffn).__name__ for block in model.layers]
    assert kinds == ["MLP", "MLP", "MoE", "MLP", "MoE", "MLP"]


@torch.no_grad()
def test_bf16_forward_gives_fp32_logits() -> None:
    cfg = small_config()
    model = randomize_(Transformer(cfg), seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    full = model(ids)
    half = model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.float32
    assert (half - full).abs().max().item() < 0.1 * full.abs().max().item()
    # the rotary frequencies are not rounded by the cast
    assert model.rotary.inv_freq.dtype == torch.float32


@torch.no_grad()
def test_routing_out_reports_every_moe_layer() -> None:
    cfg = small_config(num_hidden_layers=4, first_k_dense_replace=1)
    model = randomize_(Transformer(cfg), seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    routing: list = []
    logits = model(ids, routing_out=routing)
    assert torch.equal(logits, model(ids))
    assert len(routing) == 3
    assert routing[0].scores.shape == (20, cfg.n_routed_experts)
    assert routing[0].indices.shape == routing[0].weights.shape == (20, cfg.num_experts_per_tok)
