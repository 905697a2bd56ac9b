"""Balance losses (DeepSeek-V2 eqs. 23-31) against explicit per-token loops and hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dsv2 import Transformer
from dsv2.model.moe import Router, Routing
from dsv2.train.losses import (
    BalanceCoefficients,
    balance_losses,
    communication_balance,
    device_balance,
    expert_balance,
)
from tests.conftest import randomize_, small_config


def loop_losses(scores: list[list[list[float]]], indices: list[list[list[int]]], D: int, M: int
                ) -> tuple[float, float, float]:
    """The three sums of eqs. 23, 26 and 29 written term by term, averaged over sequences."""
    exp_total = dev_total = comm_total = 0.0
    for seq_scores, seq_idx in zip(scores, indices):
        T, E, K = len(seq_scores), len(seq_scores[0]), len(seq_idx[0])
        groups = [list(range(d * E // D, (d + 1) * E // D)) for d in range(D)]
        f = [E / (K * T) * sum(1 for t in range(T) if i in seq_idx[t]) for i in range(E)]
        P = [sum(seq_scores[t][i] for t in range(T)) / T for i in range(E)]
        f_dev = [sum(f[j] for j in g) / len(g) for g in groups]
        P_dev = [sum(P[j] for j in g) for g in groups]
        f_comm = [D / (M * T) * sum(1 for t in range(T) if any(j in g for j in seq_idx[t])) for g in groups]
        exp_total += sum(f[i] * P[i] for i in range(E))
        dev_total += sum(f_dev[d] * P_dev[d] for d in range(D))
        comm_total += sum(f_comm[d] * P_dev[d] for d in range(D))
    n = len(scores)
    return exp_total / n, dev_total / n, comm_total / n


def random_routing(B: int, S: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, S, E, generator=g).mul(2).softmax(-1)
    indices = torch.rand(B, S, E, generator=g).argsort(-1)[..., :K]  # K distinct experts, not by score
    return scores, indices


def test_hand_computed_example() -> None:
    """One sequence, T=2 tokens, 4 experts on D=2 devices, K=2, M=1.

    Token 0 picks experts 0, 1 (device 0); token 1 picks experts 1, 2 (devices 0 and 1).
    f = 4/(2*2) * counts(1, 2, 1, 0) = (1, 2, 1, 0); P = mean of the two score rows = (.3, .3, .25, .15).
    expert: 1*.3 + 2*.3 + 1*.25 + 0 = 1.15.
    device: f' = (1.5, .5), P' = (.6, .4) -> .9 + .2 = 1.1.
    comm: token 0 reaches device 0, token 1 both -> f'' = 2/(1*2) * (2, 1) = (2, 1) -> 1.2 + .4 = 1.6.
    """
    scores = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.2, 0.3, 0.3, 0.2]]])
    indices = torch.tensor([[[0, 1], [1, 2]]])
    assert expert_balance(scores, indices).item() == pytest.approx(1.15, abs=1e-6)
    assert device_balance(scores, indices, 2).item() == pytest.approx(1.1, abs=1e-6)
    assert communication_balance(scores, indices, 2, 1).item() == pytest.approx(1.6, abs=1e-6)


def test_perfect_balance_gives_one() -> None:
    """Uniform scores and every expert chosen equally often: each sum is exactly 1 (its minimum)."""
    E, K, S = 8, 2, 4
    scores = torch.full((1, S, E), 1 / E)
    indices = torch.arange(E).view(1, S, K)  # token t takes experts 2t, 2t+1: one device of 4 when D=4
    assert expert_balance(scores, indices).item() == pytest.approx(1.0, abs=1e-6)
    assert device_balance(scores, indices, 4).item() == pytest.approx(1.0, abs=1e-6)
    assert communication_balance(scores, indices, 4, 1).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("B", "S", "E", "K", "D", "M"), [(3, 5, 8, 3, 4, 2), (2, 7, 6, 2, 3, 1), (1, 4, 4, 4, 2, 2)])
def test_losses_match_loops(B: int, S: int, E: int, K: int, D: int, M: int) -> None:
    scores, indices = random_routing(B, S, E, K, seed=B * 100 + S)
    want = loop_losses(scores.tolist(), indices.tolist(), D, M)
    got = (expert_balance(scores, indices), device_balance(scores, indices, D),
           communication_balance(scores, indices, D, M))
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w, rel=1e-5)


def test_balance_losses_sum_layers_with_coefficients_and_skip_zeros() -> None:
    B, S, E, K, D, M = 2, 6, 8, 2, 4, 2
    layers = [random_routing(B, S, E, K, seed=s) for s in (1, 2)]
    routings = [Routing(torch.zeros(B * S, K), i.flatten(0, 1), s.flatten(0, 1)) for s, i in layers]
    coeffs = BalanceCoefficients(expert=0.003, device=0.05, communication=0.02)
    out = balance_losses(routings, B, coeffs, n_devices=D, max_devices=M)
    per_layer = [loop_losses(s.tolist(), i.tolist(), D, M) for s, i in layers]
    assert out["expert_balance"].item() == pytest.approx(0.003 * sum(p[0] for p in per_layer), rel=1e-5)
    assert out["device_balance"].item() == pytest.approx(0.05 * sum(p[1] for p in per_layer), rel=1e-5)
    assert out["communication_balance"].item() == pytest.approx(0.02 * sum(p[2] for p in per_layer), rel=1e-5)
    only_expert = balance_losses(routings, B, BalanceCoefficients(expert=0.001), n_devices=D, max_devices=M)
    assert set(only_expert) == {"expert_balance"}


def test_bad_device_grouping_is_an_error() -> None:
    routing = Routing(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long), torch.full((4, 6), 1 / 6))
    with pytest.raises(ValueError, match="n_devices=4"):
        balance_losses([routing], 1, BalanceCoefficients(device=0.1), n_devices=4, max_devices=1)
    with pytest.raises(ValueError, match="max_devices"):
        balance_losses([routing], 1, BalanceCoefficients(device=0.1), n_devices=3, max_devices=4)
    with pytest.raises(ValueError, match="'expert'"):
        BalanceCoefficients(expert=-1.0)


@pytest.mark.parametrize("name", ["expert_balance", "device_balance", "communication_balance"])
def test_each_loss_reaches_router_weights(name: str) -> None:
    """Non-zero gradient on Router.weight, equal to a central finite difference along it (the top-K choice,
    hence f, is unchanged by the small step, so the loss is smooth there)."""
    cfg = small_config(n_routed_experts=8, num_experts_per_tok=2)
    router = randomize_(Router(cfg), seed=3, std=0.3)
    x = torch.randn(2 * 6, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    coeffs = BalanceCoefficients(**{name.removesuffix("_balance"): 1.0})

    def loss() -> torch.Tensor:
        return balance_losses([router(x)], 2, coeffs, n_devices=4, max_devices=2)[name]

    loss().backward()
    grad = router.weight.grad.clone()
    assert grad.abs().sum().item() > 0
    direction = grad / grad.norm()
    h = 1e-2
    chosen = router(x).indices.sort(-1).values
    with torch.no_grad():
        router.weight += h * direction
        up, chosen_up = loss().item(), router(x).indices.sort(-1).values
        router.weight -= 2 * h * direction
        down, chosen_down = loss().item(), router(x).indices.sort(-1).values
    assert torch.equal(chosen, chosen_up) and torch.equal(chosen, chosen_down)
    assert (up - down) / (2 * h) == pytest.approx(grad.norm().item(), rel=2e-2)


def test_lm_loss_ignores_masked_targets() -> None:
    """Transformer(labels=...) against the loss written term by term from its logits."""
    model = randomize_(Transformer(small_config()), seed=4)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    with torch.no_grad():
        logits = model(ids)
        got = model(ids, labels=targets).item()
    terms = [-logits[b, t].double().log_softmax(-1)[targets[b, t]].item()
             for b in range(2) for t in range(3) if targets[b, t] != -100]
    assert got == pytest.approx(math.fsum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("vocab", [7, 5000])  # one chunk; with 2**21 logits per chunk, 419 rows each
def test_chunked_head_cross_entropy_matches_full_logits(vocab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """dsv2.model.loss against F.cross_entropy on the whole logits: the loss and both gradients, with ignored
    positions, across chunk boundaries; and through Transformer(labels=...)."""
    from dsv2.kernels import onednn
    from dsv2.model import loss
    from dsv2.model.loss import head_cross_entropy

    monkeypatch.setattr(loss, "_CHUNK_ELEMENTS", 1 << 21)

    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 700, 16, generator=g, requires_grad=True)
    w = (torch.randn(vocab, 16, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (3, 700), generator=g)
    labels[0, :300] = -100
    labels[2, 650:] = -100
    products = [torch.nn.functional.linear] + ([onednn.mm] if onednn.available() else [])
    want = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten(), ignore_index=-100)
    for mm, scale in itertools.product(products, (3.0, 1.0)):  # an upstream gradient scales both; 1 skips that
        want_h, want_w = torch.autograd.grad(want * scale, (h, w), retain_graph=True)
        got = head_cross_entropy(h, w, labels, mm)
        got_h, got_w = torch.autograd.grad(got * scale, (h, w))
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(got_h, want_h, atol=1e-6, rtol=1e-4) and torch.allclose(got_w, want_w, atol=1e-6,
                                                                                       rtol=1e-4)
        with torch.no_grad():
            assert head_cross_entropy(h, w, labels, mm).item() == pytest.approx(want.item(), rel=1e-5)

    model = randomize_(Transformer(small_config()), seed=2)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=g)
    targets = ids.roll(-1, dims=1)
    full = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    assert model(ids, labels=targets).item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("onednn_products", [False, True])
def test_chunked_head_cross_entropy_under_bf16_autocast(onednn_products: bool, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Under autocast, Transformer(labels=...) still takes the chunked head (here in chunks of 13 rows), with
    autocast's bf16 products: the loss and every parameter's gradient equal those of the full logits under
    autocast, to bf16 rounding of the per-chunk head gradients."""
    from dsv2.kernels import onednn
    from dsv2.model import loss, transformer

    monkeypatch.setattr(loss, "_CHUNK_ELEMENTS", 13 * 512)
    calls = []
    monkeypatch.setattr(transformer, "head_cross_entropy", lambda *a: calls.append(a) or loss.head_cross_entropy(*a))
    model = randomize_(Transformer(small_config()), seed=3).train()
    if onednn_products:
        onednn.use_for_training_(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=g)
    targets = ids.roll(-1, dims=1)
    targets[1, 20:] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    want_grads = torch.autograd.grad(want, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids, labels=targets)
    got_grads = torch.autograd.grad(got, params)
    assert len(calls) == 1
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), want_grads, got_grads, strict=True):
        assert b.dtype == torch.float32 and a.norm() > 0, name
        assert ((a - b).norm() / a.norm()).item() < 1e-2, name
