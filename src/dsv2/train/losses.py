"""Training losses: DeepSeek-V2's three sequence-wise balance losses (§2.2.3).

Notation of the paper: N_r routed experts, K_r chosen per token, T tokens *of one sequence*, D devices
E_1..E_D (contiguous blocks of N_r / D experts; the EP ranks when experts are sharded), M the device limit,
s_{i,t} the softmax affinity of token t for expert i (over all routed experts).

- f_i counts selections, so it carries no gradient; P_i averages scores, so the router learns through it.
- The losses are computed per sequence and averaged over the sequences of the batch, then summed over MoE
  layers (the official gate attaches one expert-level loss per layer).
- "Selects" means the router's top-K choice, before any token dropping: the losses balance what the router
  asks for; dropping is what happens when that is unbalanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2.model.moe import Routing


@dataclass(frozen=True)
class BalanceCoefficients:
    """α1 (expert), α2 (device), α3 (communication). V2: 0.003, 0.05, 0.02; V2-Lite: 0.001, 0, 0 (§3.1.2, App. B)."""

    expert: float = 0.0
    device: float = 0.0
    communication: float = 0.0

    def __post_init__(self) -> None:
        for name in ("expert", "device", "communication"):
            if getattr(self, name) < 0:
                raise ValueError(f"balance coefficient {name!r} must be >= 0, got {getattr(self, name)}")


def selection_fraction(indices_BSK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f_i of eq. 24 per sequence: (N_r / (K_r T)) * #tokens selecting expert i -> (B, E), no gradient."""
    B, S, K = indices_BSK.shape
    counts_BE = torch.zeros(B, n_experts, device=indices_BSK.device)
    counts_BE.scatter_add_(1, indices_BSK.reshape(B, S * K), torch.ones(B, S * K, device=indices_BSK.device))
    return counts_BE * (n_experts / (K * S))


def mean_affinity(scores_BSE: torch.Tensor) -> torch.Tensor:
    """P_i of eq. 25 per sequence: (1/T) sum_t s_{i,t} -> (B, E), differentiable."""
    return scores_BSE.mean(dim=1)


def expert_balance(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i (eq. 23 without α1), averaged over sequences."""
    f_BE = selection_fraction(indices_BSK, scores_BSE.shape[-1])
    return (f_BE * mean_affinity(scores_BSE)).sum(-1).mean()


def device_balance(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, n_devices: int) -> torch.Tensor:
    """sum_i f'_i P'_i (eq. 26 without α2): f'_i = mean of f_j over E_i (eq. 27), P'_i = sum of P_j (eq. 28)."""
    B, _, E = scores_BSE.shape
    f_BDG = selection_fraction(indices_BSK, E).view(B, n_devices, E // n_devices)
    P_BDG = mean_affinity(scores_BSE).view(B, n_devices, E // n_devices)
    return (f_BDG.mean(-1) * P_BDG.sum(-1)).sum(-1).mean()


def communication_balance(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, n_devices: int,
                          max_devices: int) -> torch.Tensor:
    """sum_i f''_i P''_i (eq. 29 without α3): f''_i = (D / (M T)) * #tokens sent to device i (eq. 30), where a
    token is sent to a device once however many of its experts live there; P''_i = sum of P_j over E_i (eq. 31)."""
    B, S, E = scores_BSE.shape
    device_BSK = indices_BSK // (E // n_devices)
    sent_BSD = torch.zeros(B, S, n_devices, device=scores_BSE.device)
    sent_BSD.scatter_(2, device_BSK, 1.0)  # scatter of ones: a device hit twice still counts once
    f_BD = sent_BSD.sum(1) * (n_devices / (max_devices * S))
    P_BD = mean_affinity(scores_BSE).view(B, n_devices, E // n_devices).sum(-1)
    return (f_BD * P_BD).sum(-1).mean()


def balance_losses(routings: list[Routing], batch_size: int, coeffs: BalanceCoefficients, n_devices: int,
                   max_devices: int) -> dict[str, torch.Tensor]:
    """α-weighted balance losses summed over MoE layers; a coefficient of 0 leaves its loss out (not computed).

    routings: one Routing per MoE layer, tokens flattened batch-major over `batch_size` sequences.
    """
    terms = {
        "expert_balance": (coeffs.expert, lambda s, i: expert_balance(s, i)),
        "device_balance": (coeffs.device, lambda s, i: device_balance(s, i, n_devices)),
        "communication_balance": (coeffs.communication,
                                  lambda s, i: communication_balance(s, i, n_devices, max_devices)),
    }
    if routings:
        _check_devices(routings[0].scores.shape[-1], n_devices, max_devices)
    out: dict[str, torch.Tensor] = {}
    for name, (alpha, fn) in terms.items():
        if alpha > 0 and routings:
            out[name] = alpha * sum(fn(*_per_sequence(r, batch_size)) for r in routings)
    return out


def _per_sequence(routing: Routing, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = routing.scores.shape
    if T % batch_size:
        raise ValueError(f"{T} routed tokens do not split into {batch_size} sequences")
    S = T // batch_size
    return routing.scores.view(batch_size, S, E), routing.indices.view(batch_size, S, -1)


def _check_devices(n_experts: int, n_devices: int, max_devices: int) -> None:
    if n_devices <= 0 or n_experts % n_devices:
        raise ValueError(f"{n_experts} experts cannot be split over n_devices={n_devices}")
    if not 1 <= max_devices <= n_devices:
        raise ValueError(f"max_devices must be in [1, n_devices={n_devices}], got {max_devices}")
