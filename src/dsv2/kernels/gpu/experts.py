"""The routed experts through the grouped-GEMM kernel (dsv2.kernels.gpu.moe), applied to a built model from outside.

`TritonExperts` keeps Experts' parameters (same state_dict, same optimizer state) and changes only inference: with
no autograd and no dropping, the T x K assignments run as two grouped GEMMs over tokens sorted by expert, with no
host sync, in place of Experts' per-expert Python loop (its .tolist() of the routing and, for small batches, one
matrix-vector chain per assignment: about 26 syncs and thousands of launches per V2-Lite decode step). Training
and dropping keep Experts' autograd paths.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv2.kernels.gpu.moe import fused_moe
from dsv2.model.moe import Experts, Routing


class TritonExperts(Experts):
    def __init__(self, src: Experts) -> None:
        nn.Module.__init__(self)
        self.n_experts, self.hidden = src.n_experts, src.hidden
        self.w13, self.w2 = src.w13, src.w2  # the same Parameters

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        if routing.kept is None and not torch.is_grad_enabled():
            return fused_moe(x_TH, routing.indices, routing.weights, self.w13, self.w2)
        return super().forward(x_TH, routing)


def use_triton_experts_(model: nn.Module) -> int:
    """Swap every plain Experts of the model for a TritonExperts on the same parameters; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Experts and child.w13.dtype in (torch.float32, torch.bfloat16):
                setattr(parent, name, TritonExperts(child))
                swapped += 1
    return swapped
