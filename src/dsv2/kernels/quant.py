"""Weight-only int8 and int4 for projections and stacked experts: the formats, their CPU products, and the
modules that replace a built model's dense ones.

Formats (row-local: every output row is quantized on its own, so the rows of a fused matrix -- gate and up,
q and kv -- can be quantized as separate tensors and concatenated):
- int8: symmetric, one scale per output row. w ~ q * scale, q in [-127, 127].
- int4: group-wise along the input dimension (group_size 32, 64 or 128), q in [0, 15],
  w ~ (q - 8) * scale + zero. Symmetric (zero = 0): llama.cpp Q4_0's rule, the group's largest-magnitude value
  maps to -8 exactly, so all 16 levels are used. Asymmetric: the group's [min, max] spans the 16 levels.

The portable form (`QuantizedTensor`: what `dsv2 quantize` writes and a quantized checkpoint holds) is plain:
int8 `weight` (N, K); or uint8 `weight` (N, K / 2), two values per byte, the even column in the low nibble,
with fp32 `weight_scale` (N,) or (N, K / group) and, for asymmetric int4, `weight_zero` (N, K / group).

Products (measured in benchmarks/quant.py): up to `native.MAX_ROWS` rows, dsv2's own kernels (kernels/native.py:
each weight read once for all rows) where they build -- for int4 only where they were measured faster
(`native.int4_preferred`), int4 then held in their block layout (`Int4BlockWeight`).
Otherwise torch's CPU kernels, `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`, on bf16
activations (fp32 ones were 10x slower); their cost grows linearly with the rows (each row streams the weight
again). Past `KERNEL_MAX_ROWS` rows (prefill, the busy experts of a large batch) the weight is dequantized once
into the activation dtype and multiplied by the dense GEMM. Each weight's `dequantize()` is the reference its
fast paths are tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.kernels import native, prepare
from dsv2.model.moe import Experts, Routing, inference_experts, swiglu

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)

# Rows up to which the quantized kernels beat dequantize + dense GEMM (benchmarks/quant.py, a 2816 x 2048
# expert projection on 2 cores: int8 1 row 0.32 ms, 16 rows 1.96 ms against 1.8 ms of dequantizing alone).
KERNEL_MAX_ROWS = 16
# torch's CPU int4 packing interleaves blocks of 64 output rows (checked at first use: `_int4_layout_known`).
_INT4_BLOCK_N = 64


@dataclass(frozen=True)
class Scheme:
    """How a model's weights are quantized. int4 keeps lm_head in int8: the head is one big matrix whose rounding
    every logit sees."""

    method: str
    group_size: int = 64  # int4 only
    symmetric: bool = True  # int4 only; int8 is always symmetric

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization must be one of {METHODS}, got {self.method!r}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {self.group_size}")

    def to_config(self) -> dict[str, Any]:
        """The `quantization_config` entry of a quantized checkpoint's config.json."""
        d: dict[str, Any] = {"quant_method": "dsv2", "method": self.method, "format": "weight-only",
                             "modules": "projections and experts except kv_b_proj; lm_head int8"}
        if self.method == "int4":
            d.update(group_size=self.group_size, symmetric=self.symmetric)
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> Scheme:
        if d.get("quant_method") != "dsv2":
            raise ValueError(f"quantization_config quant_method {d.get('quant_method')!r}: only 'dsv2' checkpoints "
                             "(written by `dsv2 quantize`) are read")
        return cls(d.get("method", ""), int(d.get("group_size", 64)), bool(d.get("symmetric", True)))

    def for_module(self, name: str) -> Scheme:
        return Scheme("int8") if name == "head" else self


def resolve(quantization: str | Scheme | None) -> Scheme | None:
    """'int8' / 'int4' / a Scheme / None -> a Scheme or None."""
    if quantization is None or isinstance(quantization, Scheme):
        return quantization
    return Scheme(quantization)


# ------------------------------------------------------------------------------------------- portable form
@dataclass
class QuantizedTensor:
    """One quantized matrix (or a stack of them on a leading expert axis) in the portable form."""

    weight: torch.Tensor  # int8 (..., N, K) or uint8 (..., N, K / 2)
    scale: torch.Tensor  # fp32 (..., N) for int8, (..., N, K / group) for int4
    zero: torch.Tensor | None = None  # fp32 like scale, asymmetric int4 only

    def parts(self) -> dict[str, torch.Tensor]:
        """Suffix -> tensor, as a checkpoint stores them beside the matrix's own name."""
        d = {"": self.weight, "_scale": self.scale}
        if self.zero is not None:
            d["_zero"] = self.zero
        return d


PART_SUFFIXES = ("", "_scale", "_zero")


def part_shapes(shape: Sequence[int], scheme: Scheme) -> dict[str, tuple[int, ...]]:
    """The portable parts' shapes for a dense matrix (or stack) of this shape."""
    *lead, n, k = shape
    if scheme.method == "int8":
        return {"": (*lead, n, k), "_scale": (*lead, n)}
    if k % scheme.group_size:
        raise ValueError(f"int4 with group_size {scheme.group_size} needs an input dimension divisible by it, "
                         f"got {k}")
    d = {"": (*lead, n, k // 2), "_scale": (*lead, n, k // scheme.group_size)}
    if not scheme.symmetric:
        d["_zero"] = d["_scale"]
    return d


def part_dtypes(scheme: Scheme) -> dict[str, torch.dtype]:
    return {"": torch.int8 if scheme.method == "int8" else torch.uint8, "_scale": torch.float32,
            "_zero": torch.float32}


# Weights quantized at a time: fp32 temporaries of 1 MB stay in the cache and in glibc's heap. Chunks of 64 MB
# were several times slower: every temporary was a fresh mmap whose pages faulted in one by one.
_CHUNK_ELEMENTS = 1 << 18


def quantize(w: torch.Tensor, scheme: Scheme) -> QuantizedTensor:
    """A dense (..., N, K) matrix -> its portable quantized form, row-chunked so that memory stays small."""
    lead, (n, k) = w.shape[:-2], w.shape[-2:]
    flat = w.reshape(-1, k)
    shapes = {s: (flat.shape[0], *shape[len(lead) + 1:]) for s, shape in part_shapes(w.shape, scheme).items()}
    out = {s: torch.empty(shape, dtype=part_dtypes(scheme)[s], device=w.device) for s, shape in shapes.items()}
    step = max(1, _CHUNK_ELEMENTS // k)
    for r in range(0, flat.shape[0], step):
        rows = slice(r, r + step)
        for s, t in _quantize_rows(flat[rows].to(torch.float32, copy=True), scheme).items():
            out[s][rows] = t
    full = {s: t.view(*lead, n, *t.shape[1:]) for s, t in out.items()}
    return QuantizedTensor(full[""], full["_scale"], full.get("_zero"))


def _quantize_rows(w: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """w: an fp32 (rows, K) scratch copy, overwritten."""
    if scheme.method == "int8":
        scale = w.abs().amax(dim=-1) / 127
        q = w.div_(scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).round_().clamp_(-127, 127)
        return {"": q.to(torch.int8), "_scale": scale}
    n, k = w.shape
    g = w.view(n, k // scheme.group_size, scheme.group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if scheme.symmetric:
        # The signed value of largest magnitude becomes -8 (llama.cpp's Q4_0 rule), so both ends of the range
        # are used; a scale of 0 (an all-zero group) would divide by zero, so such groups get 1 (any value works).
        scale = torch.where(hi >= -lo, hi, lo) / -8
        q = g.div_(torch.where(scale == 0, 1.0, scale)[..., None]).round_().add_(8).clamp_(0, 15)
        zero = None
    else:
        scale = (hi - lo) / 15
        q = g.sub_(lo[..., None]).div_(torch.where(scale == 0, 1.0, scale)[..., None]).round_().clamp_(0, 15)
        zero = lo + 8 * scale  # so that w = (q - 8) * scale + zero, torch's int4 convention
    q = q.to(torch.uint8).view(n, k)
    d = {"": q[:, 0::2] | (q[:, 1::2] << 4), "_scale": scale}
    if zero is not None:
        d["_zero"] = zero
    return d


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., N, K / 2) -> the uint8 values (..., N, K) in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize(qt: QuantizedTensor, scheme: Scheme, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The portable form back to a dense matrix: the reference every fast path is compared with."""
    if scheme.method == "int8":
        return (qt.weight.float() * qt.scale[..., None]).to(dtype)
    q = unpack_int4(qt.weight).float() - 8
    g = q.unflatten(-1, (-1, scheme.group_size)) * qt.scale[..., None]
    if qt.zero is not None:
        g = g + qt.zero[..., None]
    return g.flatten(-2).to(dtype)


# ----------------------------------------------------------------------------------------- runtime weights
class QuantWeight:
    """One matrix in the form its CPU kernel reads. `mm(x)` is x @ W.T; `dequantize()` is W."""

    shape: tuple[int, int]

    native: bool = False  # whether `_native` (dsv2's kernels, kernels/native.py) multiplies this weight

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.shape[1]
        if self.native and rows <= native.MAX_ROWS:
            y = self._native(x.reshape(-1, self.shape[1]))
        elif rows > KERNEL_MAX_ROWS:
            return F.linear(x, self.dequantize(x.dtype))
        else:
            y = self._kernel(x.reshape(-1, self.shape[1]).to(torch.bfloat16))
        return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])

    def _kernel(self, x_bf16: torch.Tensor) -> torch.Tensor:
        """torch's kernel."""
        raise NotImplementedError

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        """dsv2's kernel: bf16 or fp32 out (see native.int8_mm)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class Int8Weight(QuantWeight):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self.q = weight.contiguous()
        self.shape = tuple(self.q.shape)
        # torch's kernel takes scales in the activations' dtype; so does ours (contiguous: it reads raw pointers)
        self.scale = scale.to(torch.bfloat16).contiguous()
        self.native = native.available() and self.shape[1] % native.INT8_K_MULTIPLE == 0

    def _kernel(self, x_bf16: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x_bf16, self.q, self.scale)

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        return native.int8_mm(x, self.q, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.native and dtype == torch.bfloat16:  # the many-row path's: 5x faster than the torch ops
            return native.int8_dequant(self.q, self.scale)
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


class Int4Weight(QuantWeight):
    """Held only in torch's CPU int4 layout; dequantize reads that layout back (see `_int4_layout_known`)."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> None:
        """packed: (N, K / 2) uint8 in torch's CPU layout; scales_zeros: (K / group, N, 2) bf16 (`int4_layout`)."""
        n, half = packed.shape
        self.shape, self.group_size = (n, 2 * half), group_size
        self.packed, self.scales_zeros = packed, scales_zeros

    def _kernel(self, x_bf16: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, self.packed, self.group_size, self.scales_zeros)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        if n % _INT4_BLOCK_N or not _int4_layout_known():
            # An unknown layout: multiply the identity through the kernel (correct, K rows of work).
            eye = torch.eye(k, dtype=torch.bfloat16)
            return self._kernel(eye).t().to(dtype)
        # [N / 64, K, 32] bytes: the low nibble is row n of the block, the high nibble row n + 32
        p = self.packed.view(n // _INT4_BLOCK_N, k, _INT4_BLOCK_N // 2)
        q = torch.cat([p & 15, p >> 4], dim=-1).transpose(1, 2).reshape(n, k)
        s, z = self.scales_zeros.to(dtype).unbind(-1)  # (K / group, N)
        g = (q.to(dtype) - 8).view(n, k // self.group_size, self.group_size)
        return (g * s.t()[..., None] + z.t()[..., None]).view(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes


class Int4BlockWeight(QuantWeight):
    """int4 in dsv2's kernel layout (`native.int4_blocks`), used whenever that kernel is built: past its rows,
    dequantize + the dense GEMM, as for torch's layout."""

    native = True

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> None:
        """packed (N, K / 2) uint8; scale, zero (N, K / group) bf16, W = (q - 8) * scale + zero."""
        n, half = packed.shape
        if 2 * half // native.INT4_BLOCK > native.INT4_MAX_BLOCKS:
            raise ValueError(f"int4 rows of {2 * half} weights: more than the kernel's "
                             f"{native.INT4_MAX_BLOCKS * native.INT4_BLOCK}")
        self.shape, self.group_size = (n, 2 * half), group_size
        # contiguous: the kernel reads raw pointers
        self.packed, self.scale, self.zero = packed.contiguous(), scale.contiguous(), zero.contiguous()

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        return native.int4_mm(x, self.packed, self.scale, self.zero, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype == torch.bfloat16:  # the many-row path's (the torch ops below took 26 ms per 2816 x 2048)
            return native.int4_dequant(self.packed, self.scale, self.zero, self.group_size)
        n, k = self.shape
        g = (native.int4_unblock(self.packed).to(dtype) - 8).view(n, k // self.group_size, self.group_size)
        return (g * self.scale.to(dtype)[..., None] + self.zero.to(dtype)[..., None]).view(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes


@functools.cache
def _int4_layout_known() -> bool:
    """Whether this torch packs int4 for the CPU the way Int4Weight.dequantize reads it (a probe, once)."""
    values = torch.randint(0, 16, (_INT4_BLOCK_N * 2, 64), generator=torch.Generator().manual_seed(0),
                           dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    v = values.view(2, _INT4_BLOCK_N, 64)
    half = _INT4_BLOCK_N // 2
    expected = (v[:, :half] | (v[:, half:] << 4)).transpose(1, 2).to(torch.uint8)
    return packed.shape == (_INT4_BLOCK_N * 2, 32) and torch.equal(packed.flatten(), expected.flatten())


def int4_layout(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The portable int4 form of a matrix or a stack (..., N, K / 2) -> torch's CPU layout: packed (..., N, K / 2)
    uint8 and scales_zeros (..., K / group, N, 2) bf16. A whole stack at once: its few large temporaries go back
    to the OS when freed, where per-matrix ones left holes between the live weights (a load's peak memory grew by
    more than the weights)."""
    *lead, n, half = qt.weight.shape
    values = unpack_int4(qt.weight)
    if n % _INT4_BLOCK_N == 0 and _int4_layout_known():
        # torch's layout written directly: its own converter ran at 0.07 G weights/s (benchmarks/quant.py)
        v = values.view(*lead, n // _INT4_BLOCK_N, _INT4_BLOCK_N, 2 * half)
        split = _INT4_BLOCK_N // 2
        packed = (v[..., :split, :] | (v[..., split:, :] << 4)).transpose(-1, -2).contiguous().view(*lead, n, half)
    else:
        flat = values.reshape(-1, n, 2 * half).to(torch.int32)
        packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(m, 1) for m in flat])
        packed = packed.view(*lead, n, half)
    zero = qt.zero if qt.zero is not None else torch.zeros_like(qt.scale)
    scales_zeros = torch.stack([qt.scale.transpose(-1, -2), zero.transpose(-1, -2)], dim=-1)
    return packed, scales_zeros.to(torch.bfloat16).contiguous()


def runtime_weights(qt: QuantizedTensor, scheme: Scheme) -> Any:  # noqa: ANN401 -- one weight or a list of them
    """The kernel-ready weight of a matrix, or the list of them for a stack (E, N, K), converted stack-wise."""
    if scheme.method == "int8":
        weight, scale = qt.weight.contiguous(), qt.scale.to(torch.bfloat16)
        if weight.dim() == 2:
            return Int8Weight(weight, scale)
        return [Int8Weight(w, s) for w, s in zip(weight.unbind(0), scale.unbind(0))]
    if native.int4_preferred():
        packed = _kernel_packing(qt.weight)
        scale = qt.scale.to(torch.bfloat16)
        zero = torch.zeros_like(scale) if qt.zero is None else qt.zero.to(torch.bfloat16)
        if packed.dim() == 2:
            return Int4BlockWeight(packed, scale, zero, scheme.group_size)
        return [Int4BlockWeight(*t, scheme.group_size) for t in zip(packed.unbind(0), scale.unbind(0), zero.unbind(0))]
    packed, sz = int4_layout(qt)
    if packed.dim() == 2:
        return Int4Weight(packed, sz, scheme.group_size)
    return [Int4Weight(p, z, scheme.group_size) for p, z in zip(packed.unbind(0), sz.unbind(0))]


def _kernel_packing(portable: torch.Tensor) -> torch.Tensor:
    """The portable int4 packing (..., N, K / 2) -> native.int4_blocks', a slice of rows at a time: converted
    whole, a V2-Lite expert stack's unpacked temporaries were ~0.7 GB, the largest part of int4 loading's peak
    above the weights."""
    out = torch.empty_like(portable)
    src, dst = portable.reshape(-1, portable.shape[-1]), out.view(-1, portable.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // (2 * portable.shape[-1]))
    for r in range(0, src.shape[0], step):
        dst[r : r + step] = native.int4_blocks(unpack_int4(src[r : r + step]))
    return out


# ----------------------------------------------------------------------------------------------- modules
def _qmm(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    return w.mm(x)


class QuantLinear(nn.Module):
    """An inference-only bias-free projection on a quantized weight."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.mm(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {type(self.qweight).__name__}"


# Tokens up to which a MoE layer's routed experts run as one native call (`native.experts`) when no expert has
# more than native.MAX_ROWS of them: at 32 and 64 tokens (a step of 32 or 64 decodes) the call beat the
# expert-by-expert path on Zen 5 too, 1.1-1.3x int8 and 1.2-1.4x int4 (benchmarks/moe_step.py); past that, or
# with a busier expert, the per-expert path dequantizes the busy experts for the dense GEMM.
FUSED_MAX_TOKENS = 64


class QuantExperts(nn.Module):
    """Inference-only routed experts on quantized per-expert weights. Decode steps (up to native.MAX_ROWS
    tokens, or FUSED_MAX_TOKENS with no expert chosen more than MAX_ROWS times) run as one native call per layer
    where dsv2's kernels hold every expert (`native.experts`); otherwise Experts' eager inference paths, a
    product per expert matrix."""

    def __init__(self, w13: Sequence[QuantWeight], w2: Sequence[QuantWeight]) -> None:
        super().__init__()
        self.n_experts, self.hidden = len(w13), w2[0].shape[1]
        self.w13, self.w2 = list(w13), list(w2)
        self._native = _native_experts(self.w13, self.w2)

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        if routing.kept is not None or torch.is_grad_enabled():
            raise RuntimeError("quantized experts are for inference only (no autograd, no token dropping)")
        if self._native is not None and self._fused(routing.indices):
            bits, table, group_size = self._native
            y = native.experts(bits, table, x_TH, routing.indices, routing.weights, self.hidden, group_size)
            return y.to(x_TH.dtype)
        return inference_experts(x_TH, routing.indices, routing.weights, self.w13, self.w2, linear=_qmm)

    def _fused(self, indices_TK: torch.Tensor) -> bool:
        t = indices_TK.shape[0]
        if t <= native.MAX_ROWS:
            return True
        return t <= FUSED_MAX_TOKENS and \
            int(torch.bincount(indices_TK.flatten(), minlength=self.n_experts).max()) <= native.MAX_ROWS

    def expert(self, e: int, x_NH: torch.Tensor) -> torch.Tensor:
        return swiglu(x_NH, self.w13[e], self.w2[e], _qmm)

    forward_loop = Experts.forward_loop

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, {type(self.w13[0]).__name__}"


def _native_experts(w13: Sequence[QuantWeight], w2: Sequence[QuantWeight]
                    ) -> tuple[int, torch.Tensor, int] | None:
    """(bits, address table, group size) for native.experts when its kernels multiply every expert matrix, else
    None. The table points into the weights' tensors, which the QuantExperts holding both keeps alive."""
    every = [*w13, *w2]
    if all(isinstance(w, Int8Weight) and w.native for w in every):
        return 8, native.expert_table([(w.q, w.scale) for w in w13], [(w.q, w.scale) for w in w2]), 0
    if all(isinstance(w, Int4BlockWeight) for w in every) and len({w.group_size for w in every}) == 1:
        table = native.expert_table([(w.packed, w.scale, w.zero) for w in w13], [(w.packed, w.scale, w.zero) for w in w2])
        return 4, table, every[0].group_size
    return None


class Int8KVUp(prepare.PreparedKVUp):
    """The absorbed decode's per-head blocks in int8 (one scale per row, as Int8Weight) on dsv2's kernels: W_UK^T
    (nh, dc, dn) and W_UV (nh, dv, dc), each head's product one of native.int8_bmm's. A quantized model's decode
    reads them in place of the fp32 blocks: a quarter of the bytes (V2-Lite: 58 MB per token, not 0.23 GB; the
    fp32 bmm took ~7 of ~64 ms per int8 token on Zen 5). The checkpoint's weight stays, dense, for the naive
    (prefill) path, as for PreparedKVUp."""

    def _hold(self, w_uk: torch.Tensor, w_uv_t: torch.Tensor) -> None:
        for name, w in (("uk", w_uk.transpose(1, 2)), ("uv", w_uv_t.transpose(1, 2))):  # rows = outputs
            qt = quantize(w, Scheme("int8"))
            self.register_buffer(f"q_{name}", qt.weight.contiguous(), persistent=False)
            self.register_buffer(f"s_{name}", qt.scale.to(torch.bfloat16).contiguous(), persistent=False)

    @staticmethod
    def fits(cfg: ModelConfig) -> bool:
        """Whether the kernels multiply this config's blocks (each product's K a whole number of blocks)."""
        return native.available() and cfg.qk_nope_head_dim % native.INT8_K_MULTIPLE == 0 \
            and cfg.kv_lora_rank % native.INT8_K_MULTIPLE == 0

    @staticmethod
    def planned_block_bytes(cfg: ModelConfig) -> int:
        dn, dv, dc = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        return cfg.num_hidden_layers * cfg.num_attention_heads * ((dn + dv) * dc + 2 * (dc + dv))

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized blocks, as PreparedKVUp's (fp32): the reference of the products below."""
        w_uk_t = self.q_uk.float() * self.s_uk.float()[..., None]  # (nh, dc, dn)
        w_uv = self.q_uv.float() * self.s_uv.float()[..., None]  # (nh, dv, dc)
        return w_uk_t.transpose(1, 2), w_uv.transpose(1, 2)

    def absorb_query(self, q_HRD: torch.Tensor) -> torch.Tensor:
        return native.int8_bmm(q_HRD, self.q_uk, self.s_uk)

    def absorb_output(self, o_HRC: torch.Tensor) -> torch.Tensor:
        return native.int8_bmm(o_HRC, self.q_uv, self.s_uv)


def kv_up_form(cfg: ModelConfig, quantized: bool) -> type[prepare.PreparedKVUp]:
    """The form of the absorbed blocks an engine prepares: int8 on dsv2's kernels for quantized weights, fp32
    otherwise (a dense model's decode stays its own weight's numbers)."""
    return Int8KVUp if quantized and Int8KVUp.fits(cfg) else prepare.PreparedKVUp


def targets(model: nn.Module, scheme: Scheme) -> dict[str, Scheme]:
    """The modules to quantize and each one's scheme: every bias-free projection but the attention's wkv_b (the
    naive path multiplies its dense weight, the absorbed decode the per-head blocks the engine makes of it:
    Int8KVUp; 0.4% of V2-Lite's weights) and every
    routed-expert stack. The embedding, norms and router stay in the model dtype: the embedding is read one row
    per token, the router's few logits pick the experts."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None and not name.endswith("wkv_b") or isinstance(m, Experts):
            s = scheme.for_module(name)
            # torch's int4 kernel needs N divisible by 16 and K by the group size; other shapes (test-sized
            # models, not the published ones) fall back to int8.
            if s.method == "int4" and any(p.shape[-2] % 16 or p.shape[-1] % s.group_size
                                          for p in m.parameters(recurse=False)):
                s = Scheme("int8")
            out[name] = s
    return out


def build(module: nn.Module, parts: Mapping[str, QuantizedTensor], scheme: Scheme) -> nn.Module:
    """The quantized replacement of a dense module, from its parameters' portable forms (by parameter name)."""
    if isinstance(module, Experts):
        return QuantExperts(runtime_weights(parts["w13"], scheme), runtime_weights(parts["w2"], scheme))
    return QuantLinear(runtime_weights(parts["weight"], scheme))


def quantize_(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Replace a built dense model's projections and experts by quantized ones, in place; inference-only."""
    scheme = resolve(scheme)
    chosen = targets(model, scheme)
    with torch.no_grad():
        for name, s in chosen.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            module = getattr(parent, child)
            parts = {p: quantize(t.detach(), s) for p, t in module.named_parameters(recurse=False)}
            setattr(parent, child, build(module, parts, s))
    return model


def weight_bytes(model: nn.Module, scheme: Scheme | None, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in memory once loaded with this scheme (a meta-device model is enough):
    what the engine checks against the free memory before loading."""
    chosen = targets(model, scheme) if scheme is not None else {}
    total = 0
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            s = chosen.get(name)
            total += p.numel() * dtype.itemsize if s is None else _quantized_bytes(p.shape, s)
    return total


def _quantized_bytes(shape: Sequence[int], scheme: Scheme) -> int:
    *lead, n, k = shape
    count = 1
    for d in lead:
        count *= d
    if scheme.method == "int8":
        return count * n * (k + 2)  # int8 values + a bf16 scale per row
    return count * n * (k // 2 + 4 * (k // scheme.group_size))  # packed nibbles + bf16 scale and zero per group


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of a loaded model's weights: dense parameters, quantized weights, and the absorbed decode's
    fp32 blocks where the engine holds them (kernels.prepare)."""
    total = sum(p.nbytes for p in model.parameters())
    total += sum(m.block_bytes for m in model.modules() if isinstance(m, prepare.PreparedKVUp))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes
        elif isinstance(m, QuantExperts):
            total += sum(w.nbytes for w in m.w13 + m.w2)
    return total
