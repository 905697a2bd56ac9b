"""DeepSeekMoE (DeepSeek-V2 §2.2): fine-grained routed experts plus always-on shared experts.

y = sum_k w_k * Expert_{i_k}(x) + Shared(x), with the router exactly as the official `MoEGate`:
fp32 logits and softmax over all routed experts, `greedy` top-K or `group_limited_greedy` (keep the
topk_group groups with the highest *max* expert score, then top-K inside them), and the K weights either
renormalised (norm_topk_prob) or multiplied by routed_scaling_factor -- never both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.norm import MLP


class Routing(NamedTuple):
    weights: torch.Tensor  # (T, K) fp32, what multiplies each chosen expert's output
    indices: torch.Tensor  # (T, K) int64 expert ids
    scores: torch.Tensor  # (T, E) fp32 softmax over all routed experts (balance losses read these)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.method = cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, x_TH: torch.Tensor) -> Routing:
        scores_TE = F.linear(x_TH.float(), self.weight.float()).softmax(dim=-1)
        if self.method == "group_limited_greedy":
            masked_TE = limit_to_groups(scores_TE, self.n_group, self.topk_group)
        else:
            masked_TE = scores_TE
        weights_TK, indices_TK = torch.topk(masked_TE, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights_TK = weights_TK * self.scaling
        return Routing(weights_TK, indices_TK, scores_TE)


def limit_to_groups(scores_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask the scores outside each token's topk_group best groups (group score = its max expert score;
    groups are contiguous blocks of E / n_group experts).

    The official code masks with 0.0; we use -inf. The outputs are identical (a masked expert could only win
    a tie against in-group probabilities that underflowed to exactly 0, and both then carry weight 0), but
    -inf guarantees the chosen experts always lie inside the kept groups, which the load statistics rely on.
    """
    T, E = scores_TE.shape
    group_TG = scores_TE.view(T, n_group, E // n_group).amax(dim=-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, torch.topk(group_TG, topk_group, dim=-1, sorted=False).indices, True)
    keep_TE = keep_TG[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    return scores_TE.masked_fill(~keep_TE, float("-inf"))


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights: w13 (E, 2I, H) gate rows then up rows, w2 (E, H, I)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def expert(self, e: int, x_NH: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x_NH, self.w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Grouped: sort the T*K (token, slot) pairs by expert, one matmul chain per active expert."""
        T, K = routing.indices.shape
        flat = routing.indices.flatten()
        order = flat.argsort(stable=True)
        token = order // K  # token of each sorted pair
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        x_sorted = x_TH[token]  # (T*K, H), contiguous per expert
        outs, begin = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.expert(e, x_sorted[begin:begin + n]))
                begin += n
        out = torch.cat(outs).float() * routing.weights.flatten()[order, None]
        # The weighted sum is fp32 as in the official code, cast back once.
        y_TH = torch.zeros(T, x_TH.shape[-1], dtype=torch.float32, device=x_TH.device)
        return y_TH.index_add_(0, token, out).to(x_TH.dtype)

    def forward_loop(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Reference path: every expert over a boolean mask of its (token, slot) pairs."""
        y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        for e in range(self.n_experts):
            token, slot = torch.where(routing.indices == e)
            if token.numel():
                out = self.expert(e, x_TH[token]).float() * routing.weights[token, slot, None]
                y_TH.index_add_(0, token, out)
        return y_TH.to(x_TH.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        # The shared experts are one SwiGLU of n_shared_experts times the expert width, with no gate.
        n_shared = cfg.n_shared_experts
        self.shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor, reference: bool = False, routing_out: list[Routing] | None = None
                ) -> torch.Tensor:
        """reference: use the loop path; routing_out: if given, this layer's Routing is appended to it."""
        x_TH = x.flatten(0, -2)
        routing = self.gate(x_TH)
        if routing_out is not None:
            routing_out.append(routing)
        y_TH = (self.experts.forward_loop if reference else self.experts)(x_TH, routing)
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)
        return y_TH.view(x.shape)
