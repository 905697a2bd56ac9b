"""lm_head and next-token cross-entropy together, in chunks of rows.

Computing all (N, V) logits, then log-softmax, then its backward materialises three N x V fp32 tensors (131 MB
each for 1,024 tokens of a 32,000-token vocabulary) and walks each of them in memory several times: in an
ad-hoc torch.profiler run of two training steps of benchmarks/train.py's 135M model the log-softmax backward
alone took 9% of the time. Here each chunk's logits are made, turned into the loss and, while still in cache, into their gradient
softmax - onehot, which goes straight into the hidden states' and the head's gradients (as Liger-Kernel's fused
linear cross-entropy does on GPUs). Backward then only scales the saved gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logits per chunk: 32 MB in fp32. Smaller chunks make the head's products short and wide and stream its weight
# once per chunk: on benchmarks/train.py's 135M model (vocabulary 32,000, 1,024 tokens) an ad-hoc sweep of the
# training step gave 559 tok/s at 2**21 elements, 624 at 2**23, 620 at 2**26 (one chunk), 602 unchunked.
_CHUNK_ELEMENTS = 1 << 23

# a @ b.T for a (M, K) and b (N, K): F.linear or a faster library's product (dsv2.kernels.onednn.mm)
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _chunks(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // vocab)
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _loss_and_grads(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, mm: Product, grads: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    valid_N = labels_N != IGNORE_INDEX
    n_valid = valid_N.sum().clamp(min=1)
    safe_N = labels_N.clamp(min=0)  # ignored rows point at token 0 and are masked out below
    total = torch.zeros((), dtype=torch.float32, device=h_NH.device)
    grad_h = torch.empty_like(h_NH) if grads else None
    grad_w = None
    for rows in _chunks(h_NH.shape[0], w_VH.shape[0]):
        h_CH, y_C, keep_C = h_NH[rows], safe_N[rows], valid_N[rows]
        logits_CV = mm(h_CH, w_VH).float()
        target_C = logits_CV.gather(1, y_C[:, None])[:, 0]
        # logsumexp by hand, so that exp(logits - max) is computed once, in place, and serves the softmax too
        # (torch.logsumexp makes its own shifted copy: a fresh chunk-sized tensor and one more pass over it)
        max_C = logits_CV.amax(dim=-1)
        exp_CV = logits_CV.sub_(max_C[:, None]).exp_()
        sum_C = exp_CV.sum(dim=-1)
        lse_C = max_C + sum_C.log()
        total += ((lse_C - target_C) * keep_C).sum()
        if grads:
            # d(mean CE)/d logits = (softmax - onehot) / n_valid on the rows that count
            scale_C = keep_C / n_valid
            p_CV = exp_CV.mul_((scale_C / sum_C)[:, None])
            p_CV[torch.arange(len(y_C), device=p_CV.device), y_C] -= scale_C
            p_CV = p_CV.to(h_NH.dtype)
            grad_h[rows] = mm(p_CV, w_VH.t())  # p @ W
            grad_w_chunk = mm(p_CV.t(), h_CH.t())  # p.T @ h
            # summed in fp32 whatever the products' dtype (bf16 under autocast or for a bf16 model)
            grad_w = grad_w_chunk.float() if grad_w is None else grad_w.add_(grad_w_chunk)
    if grads and grad_w is None:  # no rows at all
        grad_w = torch.zeros_like(w_VH)
    return total / n_valid, grad_h, grad_w


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, mm: Product  # noqa: ANN401
                ) -> torch.Tensor:
        loss, grad_h, grad_w = _loss_and_grads(h_NH, w_VH, labels_N, mm, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # noqa: ANN401
        grad_h, grad_w = ctx.saved_tensors
        # An unscaled loss (no accumulation, no loss weight) needs no scaling: for the 135M model of
        # benchmarks/train.py the head's (V, H) gradient times 1 was 84 ms of a 1.4 s CPU step (a fresh 65 MB
        # written). On an accelerator the check would cost a sync and the products little, so it always multiplies.
        if grad.device.type == "cpu" and grad.item() == 1.0:
            return grad_h, grad_w, None, None
        return grad_h * grad, grad_w * grad, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mm: Product = F.linear
                       ) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T against labels (IGNORE_INDEX rows skipped), the
    logits never held whole. hidden (..., H), weight (V, H), labels (...) -> 0-dim fp32."""
    h_NH, labels_N = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadCrossEntropy.apply(h_NH, weight, labels_N, mm)
    return _loss_and_grads(h_NH, weight, labels_N, mm, grads=False)[0]
