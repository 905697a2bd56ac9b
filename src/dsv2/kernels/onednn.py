"""Projections through oneDNN instead of torch's default CPU GEMM.

On x86 CPUs torch runs fp32 `F.linear` through MKL, whose kernels are chosen for Intel processors; on an AMD
EPYC with AVX-512 (Zen 5) oneDNN ran the same training-sized products 1.4-2.3x faster, and the few-row products
of batched decode, with its weights packed once (reordered into its blocked layout), 1.6-3.9x faster
(`benchmarks/gemm_library.py`; one-row products of small matrices are the exception, slower by a fixed
~15 us per call). oneDNN ships inside torch's CPU build (it is what inductor's CPU backend packs weights for),
so this adds no dependency.

Two uses, both applied to a built model from outside (the model code itself keeps plain `nn.Linear`):
- training: `use_for_training_(model)` makes every projection and routed expert multiply through `linear`, an
  autograd function whose forward and backward products are oneDNN calls on the ordinary (trainable) weights;
- inference: `pack_for_inference_(model)` replaces projections and routed experts by packed copies
  (`PackedLinear`, `PackedExperts`) and drops the dense weights, so the model does not hold both.
Only fp32 goes this way: bf16 CPU products already run in oneDNN.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.model.moe import Experts, Routing, inference_experts, swiglu

# _reorder_linear_weight's batch-size hint picks the blocked layout. In an ad-hoc timing of three of
# benchmarks/gemm_library.py's shapes (512 x 512, 512 x 16,384, 512 x 32,000) at 1-256 rows, 32 was as fast as
# the best hint everywhere; a hint of 1 was up to 4x slower for 4 or more rows.
_PACK_ROWS = 32

CHOICES = ("auto", "onednn", "torch")  # the `gemm` option of the engine, the commands and the recipes


def available(device: torch.device | str = "cpu") -> bool:
    """oneDNN fp32 products on this device: an x86 CPU with torch's oneDNN built in."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and platform.machine().lower() in ("x86_64", "amd64"))


def wanted(choice: str, device: torch.device | str = "cpu") -> bool:
    """A `gemm` option ('auto', 'onednn' or 'torch') -> whether to multiply through oneDNN here."""
    if choice not in CHOICES:
        raise ValueError(f"gemm must be one of {CHOICES}, got {choice!r}")
    if choice == "onednn" and not available(device):
        raise ValueError(f"gemm='onednn' needs an x86 CPU with torch's oneDNN; this is {platform.machine()} / "
                         f"{torch.device(device)}")
    return choice == "onednn" or (choice == "auto" and available(device))


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w.T for w (N, K), dense or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN205 -- torch's Function API
        return mm(x, w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:  # noqa: ANN401
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN401
        x, w = ctx.saved_tensors
        # Both gradients are products of the same shape family, so they go through oneDNN too:
        # dL/dx = g @ w = linear(g, w.T); dL/dw = g.T @ x = linear(g.T, x.T).
        grad_x = mm(grad, w.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g_MN, x_MK = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            # oneDNN has no primitive for an empty contraction (an idle expert's zero rows)
            grad_w = mm(g_MN.t(), x_MK.t()) if len(x_MK) else torch.zeros_like(w)
        return grad_x, grad_w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias, through oneDNN for fp32 outside autocast (anything else: F.linear)."""
    if x.dtype != torch.float32 or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or x.is_cuda:
        return F.linear(x, w)
    return _Linear.apply(x, w)


class Linear(nn.Linear):
    """nn.Linear (same parameter, same state_dict) that multiplies through `linear`. `product` is what the
    model's chunked head loss multiplies with (it reads the head's weight directly)."""

    product = staticmethod(mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class TrainingExperts(Experts):
    """Experts (same parameters, same state_dict) whose products go through `linear`."""

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return linear(x, w)


def pack(w: torch.Tensor) -> torch.Tensor:
    """A weight (N, K) reordered into oneDNN's blocked layout: an opaque tensor only `mm` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().float().contiguous(), _PACK_ROWS)


class PackedLinear(nn.Module):
    """An inference-only bias-free projection holding only its packed weight. load_state_dict repacks
    `weight`; state_dict gives it back dense."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mm(x, self.packed)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed.to_dense()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any,  # noqa: ANN401
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        w = _checked(state_dict, prefix + "weight", (self.out_features, self.in_features), missing_keys, error_msgs)
        if w is not None:
            self.packed = pack(w)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class PackedExperts(nn.Module):
    """Inference-only routed experts holding packed per-expert weights; same state_dict keys as Experts
    (w13 (E, 2I, H), w2 (E, H, I)) and the same eager inference paths, multiplying through oneDNN."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.n_experts, self.hidden = experts.n_experts, experts.hidden
        self.shapes = {"w13": tuple(experts.w13.shape), "w2": tuple(experts.w2.shape)}
        self.w13 = [pack(w) for w in experts.w13.unbind(0)]
        self.w2 = [pack(w) for w in experts.w2.unbind(0)]

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        if routing.kept is not None or torch.is_grad_enabled():
            raise RuntimeError("packed experts are for inference only (no autograd, no token dropping)")
        return inference_experts(x_TH, routing.indices, routing.weights, self.w13, self.w2, linear=mm)

    def expert(self, e: int, x_NH: torch.Tensor) -> torch.Tensor:
        return swiglu(x_NH, self.w13[e], self.w2[e], mm)

    forward_loop = Experts.forward_loop

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name in self.shapes:
            destination[prefix + name] = torch.stack([w.to_dense() for w in getattr(self, name)])

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any,  # noqa: ANN401
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        for name, shape in self.shapes.items():
            w = _checked(state_dict, prefix + name, shape, missing_keys, error_msgs)
            if w is not None:
                setattr(self, name, [pack(w_e) for w_e in w.unbind(0)])


def _checked(state_dict: Mapping[str, Any], key: str, shape: tuple[int, ...], missing_keys: list[str],
             error_msgs: list[str]) -> torch.Tensor | None:
    """state_dict[key] if present with this shape, else None with the miss or mismatch recorded as
    nn.Module.load_state_dict reports them."""
    if key not in state_dict:
        missing_keys.append(key)
        return None
    if tuple(state_dict[key].shape) != tuple(shape):
        error_msgs.append(f"size mismatch for {key}: got {tuple(state_dict[key].shape)}, expected {tuple(shape)}")
        return None
    return state_dict[key]


def _replace(model: nn.Module, swap: Any) -> None:  # noqa: ANN401
    """Replace every submodule for which swap(name, module) returns a module."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = swap(name, child)
            if new is not None:
                setattr(parent, child_name, new)


def pack_for_inference_(model: nn.Module) -> None:
    """Pack every fp32 bias-free projection but the attention's wkv_b (the absorbed decode views it per head)
    and every routed-expert stack; the model becomes inference-only."""

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.Linear) and m.bias is None and m.weight.dtype == torch.float32 \
                and not name.endswith("wkv_b"):
            return PackedLinear(m.weight)
        if isinstance(m, Experts) and m.w13.dtype == torch.float32:
            return PackedExperts(m)
        return None

    with torch.no_grad():
        _replace(model, swap)


def use_for_training_(model: nn.Module) -> None:
    """Make every projection and routed expert multiply through `linear`; parameters (and so state_dict,
    optimizer state, FSDP sharding) stay exactly as they are."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear  # the same object, parameters and hooks; only forward changes
        elif type(m) is Experts:
            m.__class__ = TrainingExperts
