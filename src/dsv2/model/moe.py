"""DeepSeekMoE (DeepSeek-V2 §2.2): fine-grained routed experts plus always-on shared experts.

y = sum_k w_k * Expert_{i_k}(x) + Shared(x), with the router exactly as the official `MoEGate`:
fp32 logits and softmax over all routed experts, `greedy` top-K or `group_limited_greedy` (keep the
topk_group groups with the highest *max* expert score, then top-K inside them), and the K weights either
renormalised (norm_topk_prob) or multiplied by routed_scaling_factor -- never both.

`group_limited_greedy` *is* the paper's device-limited routing (§2.2.2) when the groups are the devices:
with n_group = D contiguous expert blocks and topk_group = M, each token first picks the M devices holding
its highest-affinity experts (max rule), then its top-K experts among them. V2's released config (8 groups,
keep 3) is exactly D = 8, M = 3. Training selects it by building the model with those two fields.

Device-level token dropping (§2.2.4) is a training-time policy passed with each forward (`Dropping`, the
policy and the step's protected sequences); it marks assignments in `Routing.kept`, and the experts skip the
dropped ones. A forward without it never drops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.norm import MLP


class Routing(NamedTuple):
    weights: torch.Tensor  # (T, K) fp32, what multiplies each chosen expert's output
    indices: torch.Tensor  # (T, K) int64 expert ids
    scores: torch.Tensor  # (T, E) fp32 softmax over all routed experts (balance losses read these)
    kept: torch.Tensor | None = None  # (T, K) bool, False where token dropping removed the assignment


class DropPolicy(Protocol):
    def keep(self, routing: Routing, protected_T: torch.Tensor | None) -> torch.Tensor:
        """(T, K) bool: which of the router's assignments are computed."""
        ...


@dataclass(frozen=True)
class Dropping:
    """Token dropping for one forward: the policy, and the (B,) bool mask of the batch's sequences that must never
    be dropped (or None). An argument rather than module state, so that activation checkpointing's recompute in
    backward gets the same mask and so the same drops."""

    policy: DropPolicy
    protected_B: torch.Tensor | None = None

    def protected_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask per token of x (B, S, H), flattened as the router sees them."""
        p = self.protected_B
        if p is None:
            return None
        if x.dim() != 3 or p.shape != x.shape[:1]:
            raise ValueError(f"protected mask of shape {tuple(p.shape)} does not match a batch of shape "
                             f"{tuple(x.shape[:-1])}")
        return p.to(x.device)[:, None].expand(x.shape[:2]).flatten()


@dataclass(frozen=True)
class DeviceCapacity:
    """Device-level token dropping (DeepSeek-V2 §2.2.4): every device (a contiguous block of E / n_devices
    experts) processes at most ceil(capacity_factor * T * K / n_devices) assignments -- the average budget
    times the factor -- and drops its lowest-affinity ones beyond that. Assignments of protected tokens are
    never dropped; they are served first, so a device's load exceeds capacity only if its protected load does.
    """

    n_devices: int
    capacity_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.n_devices <= 0:
            raise ValueError(f"n_devices must be positive, got {self.n_devices}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")

    def capacity(self, n_tokens: int, top_k: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens * top_k / self.n_devices)

    def keep(self, routing: Routing, protected_T: torch.Tensor | None) -> torch.Tensor:
        n_experts = routing.scores.shape[-1]
        if n_experts % self.n_devices:
            raise ValueError(f"{n_experts} experts cannot be split over n_devices={self.n_devices}")
        device_TK = routing.indices // (n_experts // self.n_devices)
        affinity_TK = routing.scores.detach().gather(1, routing.indices)
        return self.keep_assignments(affinity_TK, device_TK, protected_T)

    def keep_assignments(self, affinity_TK: torch.Tensor, device_TK: torch.Tensor,
                         protected_T: torch.Tensor | None) -> torch.Tensor:
        """The rule on bare assignments (token affinity for the chosen expert, its device), so that expert
        parallelism can apply it to the assignments of all ranks at once."""
        T, K = device_TK.shape
        # Protected assignments rank above all others (affinities are softmax probabilities, <= 1).
        key_TK = affinity_TK if protected_T is None else affinity_TK.masked_fill(protected_T[:, None], 2.0)
        rank = rank_within_groups(device_TK.flatten(), key_TK.flatten(), self.n_devices)
        kept = rank < self.capacity(T, K)
        if protected_T is not None:
            kept |= protected_T[:, None].expand(T, K).flatten()
        return kept.view(T, K)


def rank_within_groups(group_N: torch.Tensor, key_N: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Each item's 0-based rank by descending key among the items of its group (ties: lower index first)."""
    by_key = torch.argsort(key_N, descending=True, stable=True)
    order = by_key[torch.argsort(group_N[by_key], stable=True)]  # group-major, key-descending inside
    counts = torch.bincount(group_N, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group_N)
    rank[order] = torch.arange(group_N.numel(), device=group_N.device) - starts[group_N[order]]
    return rank


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


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (..., K), w (N, K)) -> x @ w.T


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights: w13 (E, 2I, H) gate rows then up rows, w2 (E, H, I).

    `linear` is the bias-free product the experts multiply with: F.linear here; a subclass applied from outside
    (dsv2.kernels.onednn) overrides it with a faster library's product."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def expert(self, e: int, x_NH: torch.Tensor) -> torch.Tensor:
        return swiglu(x_NH, self.w13[e], self.w2[e], self.linear)

    def grouped(self, x_NH: torch.Tensor, counts: list[int], every_expert: bool = False) -> torch.Tensor:
        """Rows of x_NH sorted by expert, counts[e] of them for expert e -> the experts' outputs, same order.

        every_expert: run idle experts on zero rows too, so the output is always in the autograd graph of x_NH
        and of every weight (expert parallelism needs each rank to join every backward collective).
        """
        # unbind once: indexing w13[e] per expert would make backward build a zero-filled (E, 2I, H) gradient
        # for every expert used (E^2 work per layer); unbind's backward stacks the E slices once.
        return _grouped(x_NH, counts, self.w13.unbind(0), self.w2.unbind(0), every_expert, self.linear)

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Inference: matrix-vector chains for decode-sized batches, else grouped (see inference_experts);
        training (autograd or dropping): grouped over the kept pairs."""
        if routing.kept is None and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # In the engine's compiled decode graph: one token's experts as tensor ops that inductor fuses;
                # more tokens through one opaque op running the eager paths, whose per-expert counts are data
                # that would otherwise break the graph.
                if x_TH.shape[0] == 1:
                    return self._forward_gathered(x_TH, routing)
                return routed_experts(x_TH, routing.indices, routing.weights, self.w13, self.w2)
            return inference_experts(x_TH, routing.indices, routing.weights, self.w13, self.w2, self.linear)
        return _sorted_experts(x_TH, routing.indices, routing.weights, kept_pairs(routing), self.w13.unbind(0),
                               self.w2.unbind(0), self.linear)

    def _forward_gathered(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The matrix-vector path as pure tensor ops, for torch.compile: each assignment indexes its expert's
        weights by the routing tensor, with no .tolist() to break the graph. Run eagerly, the indexing would
        copy every chosen expert's weights; compiled, inductor reads them in place."""
        T, K = routing.indices.shape
        chosen = routing.indices.flatten()
        x = x_TH.repeat_interleave(K, dim=0)[:, :, None]  # (T*K, H, 1)
        gate, up = torch.bmm(self.w13[chosen], x)[..., 0].chunk(2, dim=-1)
        out = torch.bmm(self.w2[chosen], (F.silu(gate) * up)[:, :, None])[..., 0]  # (T*K, H)
        y_TH = (out.float().view(T, K, -1) * routing.weights[..., None]).sum(dim=1)
        return y_TH.to(x_TH.dtype)

    def forward_loop(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Reference path: every expert over a boolean mask of its (token, slot) pairs."""
        y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        kept = torch.ones_like(routing.indices, dtype=torch.bool) if routing.kept is None else routing.kept
        for e in range(self.n_experts):
            token, slot = torch.where((routing.indices == e) & kept)
            if token.numel():
                out = self.expert(e, x_TH[token]).float() * routing.weights[token, slot, None]
                y_TH.index_add_(0, token, out)
        return y_TH.to(x_TH.dtype)


def _grouped(x_NH: torch.Tensor, counts: list[int], w13: Sequence[torch.Tensor], w2: Sequence[torch.Tensor],
             every_expert: bool = False, linear: Linear = F.linear) -> torch.Tensor:
    # split, not a slice per expert: each slice's backward would zero-fill a gradient as large as x_NH (E of them
    # per layer, a third of a profiled CPU training step of the 135M benchmark model); split's backward is one cat.
    pieces = enumerate(zip(counts, x_NH.split(counts), strict=True))
    outs = [swiglu(x_n, w13[e], w2[e], linear) for e, (n, x_n) in pieces if n or every_expert]
    return torch.cat(outs) if outs else x_NH.new_zeros(0, x_NH.shape[-1])


def _sorted_experts(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, pair: torch.Tensor,
                    w13: Sequence[torch.Tensor], w2: Sequence[torch.Tensor], linear: Linear = F.linear
                    ) -> torch.Tensor:
    """Grouped: sort the (token, slot) pairs to compute by expert, one matmul chain per active expert."""
    K = indices_TK.shape[1]
    expert = indices_TK.flatten()[pair]
    order = pair[expert.argsort(stable=True)]  # flat (token, slot) ids, contiguous per expert
    token = order // K
    counts = torch.bincount(expert, minlength=len(w13)).tolist()
    # index_select, not x_TH[token]: advanced indexing's backward is an accumulating index_put, which on CPU was
    # 32x slower than index_select's index_add_ (2.7 ms against 0.09 ms for 4,096 rows of 256, ad hoc).
    w_sorted = weights_TK.flatten().index_select(0, order)[:, None]
    out = _grouped(x_TH.index_select(0, token), counts, w13, w2, linear=linear).float() * w_sorted
    # The weighted sum is fp32 as in the official code, cast back once.
    y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    return y_TH.index_add_(0, token, out).to(x_TH.dtype)


def inference_experts(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                      w13: Sequence[torch.Tensor], w2: Sequence[torch.Tensor], linear: Linear = F.linear
                      ) -> torch.Tensor:
    """Without autograd or dropping; w13[e], w2[e] are expert e's weights (stacked, or packed ones in a list).
    Decode-sized batches (at most one assignment per expert on average): each assignment is one matrix-vector
    chain on its expert's weights, with none of the sorting, counting and regrouping that pays off for many tokens. The K outputs of a token are summed in ascending expert order,
    the order the grouped path's index_add_ uses, so for one token (batch-1 decode) both give the same bits."""
    T, K = indices_TK.shape
    if T * K > len(w13):
        return _sorted_experts(x_TH, indices_TK, weights_TK, torch.arange(T * K, device=x_TH.device), w13, w2,
                               linear)
    y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    for t, (experts, weights) in enumerate(zip(indices_TK.tolist(), weights_TK.unbind(0))):
        for k in sorted(range(len(experts)), key=experts.__getitem__):
            e = experts[k]
            y_TH[t:t + 1].add_(swiglu(x_TH[t:t + 1], w13[e], w2[e], linear).float() * weights[k])
    return y_TH.to(x_TH.dtype)


@torch.library.custom_op("dsv2::routed_experts", mutates_args=())
def routed_experts(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """inference_experts as one op that torch.compile treats as opaque (its shape function is below)."""
    return inference_experts(x_TH, indices_TK, weights_TK, w13, w2)


@routed_experts.register_fake
def _(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, w13: torch.Tensor,
      w2: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x_TH)


def swiglu(x_NH: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
    gate, up = linear(x_NH, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2)


def kept_pairs(routing: Routing) -> torch.Tensor:
    """Flat (token * K + slot) ids of the assignments to compute."""
    n = routing.indices.numel()
    if routing.kept is None:
        return torch.arange(n, device=routing.indices.device)
    return routing.kept.flatten().nonzero().squeeze(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        # The shared experts are one SwiGLU of n_shared_experts times the expert width, with no gate.
        n_shared = cfg.n_shared_experts
        self.shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor, reference: bool = False, routing_out: list[Routing] | None = None,
                dropping: Dropping | None = None) -> torch.Tensor:
        """reference: use the loop path; routing_out: if given, this layer's Routing is appended to it;
        dropping: drop assignments by this policy (training passes it; nothing else does)."""
        x_TH = x.flatten(0, -2)
        routing = self.gate(x_TH)
        if dropping is not None:
            routing = routing._replace(kept=dropping.policy.keep(routing, dropping.protected_tokens(x)))
        if routing_out is not None:
            routing_out.append(routing)
        y_TH = (self.experts.forward_loop if reference else self.experts)(x_TH, routing)
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)  # dropped tokens still get the shared experts (and the residual)
        return y_TH.view(x.shape)
