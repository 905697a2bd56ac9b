"""dsv2's own CPU kernels (dsv2.kernels.native) against the dequantize + F.linear reference: every tile shape
(1 to 16 rows, row counts that are not a multiple of the tile, weight rows that are not a multiple of 4), both
formats, each group size, and each code path the source has (the build for this CPU, AVX2 where the CPU has it,
the portable scalar code)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from dsv2.kernels import native, quant
from dsv2.kernels.quant import Scheme
from tests.conftest import VARIANTS, cpu_has

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build dsv2's kernels")

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 16])
@pytest.mark.parametrize("n", [64, 70])
def test_int8_matches_reference(native_lib, rows: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * n)
    qt = quant.quantize(torch.randn(n, 96, generator=g), Scheme("int8"))
    scale = qt.scale.bfloat16()
    x = torch.randn(rows, 96, generator=g)
    w = qt.weight.double() * scale.double()[:, None]
    y = native.int8_mm(x, qt.weight, scale, native_lib)
    # exact integer dot products of the quantized activations: only the fp32 sums of blocks round
    assert _rel(y, F.linear(native.q8_activations(x).double(), w)) < 1e-6
    assert _rel(y, F.linear(x.double(), w)) < 1e-2  # what quantizing the activations costs


def test_q8_activations_follow_llama_cpps_rule() -> None:
    x = torch.tensor([[0.0] * 32 + [1.0, -2.54] + [0.01] * 30])  # a zero block: d = 0, all zeros
    q = native.q8_activations(x)
    assert torch.equal(q[0, :32], torch.zeros(32))
    d = 2.54 / 127  # the block's max |x| maps to 127
    assert q[0, 33].item() == pytest.approx(-2.54, rel=1e-6)
    assert q[0, 32].item() == pytest.approx(round(1.0 / d) * d, rel=1e-6)
    assert q[0, 34].item() == pytest.approx(round(0.01 / d) * d, rel=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_reference(native_lib, rows: int, group_size: int, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(rows + group_size)
    n, k = 68, 384  # a last partial block of weight rows; K of 3 groups of 128
    scheme = Scheme("int4", group_size, symmetric)
    qt = quant.quantize(torch.randn(n, k, generator=g), scheme)
    scale = qt.scale.bfloat16()
    zero = torch.zeros_like(scale) if qt.zero is None else qt.zero.bfloat16()
    w = quant.dequantize(quant.QuantizedTensor(qt.weight, scale.float(), zero.float()), scheme, torch.float64)
    x = torch.randn(rows, k, generator=g)
    packed = native.int4_blocks(quant.unpack_int4(qt.weight))
    y = native.int4_mm(x, packed, scale, zero, group_size, native_lib)
    assert _rel(y, F.linear(native.q8_activations(x).double(), w)) < 1e-5
    assert _rel(y, F.linear(x.double(), w)) < 1e-2


def test_bf16_rows_in_and_out(native_lib) -> None:
    """bf16 activations are widened and the fp32 result rounded once: the fp32 product of the same values."""
    g = torch.Generator().manual_seed(5)
    qt = quant.quantize(torch.randn(40, 128, generator=g), Scheme("int8"))
    scale = qt.scale.bfloat16()
    x = torch.randn(3, 128, generator=g).bfloat16()
    y = native.int8_mm(x, qt.weight, scale, native_lib)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, native.int8_mm(x.float(), qt.weight, scale, native_lib).bfloat16())
    q4 = quant.quantize(torch.randn(40, 128, generator=g), Scheme("int4", 32))
    packed, s4 = native.int4_blocks(quant.unpack_int4(q4.weight)), q4.scale.bfloat16()
    z4 = torch.zeros_like(s4)
    y4 = native.int4_mm(x, packed, s4, z4, 32, native_lib)
    assert y4.dtype == torch.bfloat16 and torch.equal(y4, native.int4_mm(x.float(), packed, s4, z4, 32, native_lib).bfloat16())


def test_dequantize_to_bf16_matches_reference(native_lib) -> None:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(36, 192, generator=g)
    qt = quant.quantize(w, Scheme("int8"))
    scale = qt.scale.bfloat16()
    ref8 = (qt.weight.float() * scale.float()[:, None]).bfloat16()  # exact in fp32, then rounded once
    assert torch.equal(native.int8_dequant(qt.weight, scale, native_lib), ref8)
    for scheme in (Scheme("int4", 64), Scheme("int4", 32, symmetric=False)):
        qt = quant.quantize(w, scheme)
        scale = qt.scale.bfloat16()
        zero = torch.zeros_like(scale) if qt.zero is None else qt.zero.bfloat16()
        ref = quant.dequantize(quant.QuantizedTensor(qt.weight, scale.float(), zero.float()), scheme)
        out = native.int4_dequant(native.int4_blocks(quant.unpack_int4(qt.weight)), scale, zero, scheme.group_size,
                                  native_lib)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding


def test_vector_width_names_the_build() -> None:
    assert native.open_library(native.build(VARIANTS["scalar"])).dsv2_vector_width() == 1
    if cpu_has("avx2") and cpu_has("fma"):
        assert native.open_library(native.build(VARIANTS["avx2"])).dsv2_vector_width() == 8
    assert native.library().dsv2_vector_width() == (16 if cpu_has("avx512f") else 8 if cpu_has("avx2") else 1)


def test_int4_block_layout_round_trips() -> None:
    values = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = native.int4_blocks(values)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(packed[0, 0, 0], values[0, 0, 0] | (values[0, 0, 16] << 4))  # weight i and i + 16
    assert torch.equal(native.int4_unblock(packed), values)


def test_weights_use_the_kernels_when_built_and_torchs_without() -> None:
    w = torch.randn(64, 128)
    assert quant.runtime_weights(quant.quantize(w, Scheme("int8")), Scheme("int8")).native
    int4 = quant.runtime_weights(quant.quantize(w, Scheme("int4")), Scheme("int4"))
    assert isinstance(int4, quant.Int4BlockWeight if native.int4_preferred() else quant.Int4Weight)
    code = ("import torch; from dsv2.kernels import native, quant; from dsv2.kernels.quant import Scheme;"
            "w = torch.randn(64, 128); s = Scheme('int4');"
            "print(native.available(), type(quant.runtime_weights(quant.quantize(w, s), s)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env={"DSV2_NATIVE": "0", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "Int4Weight"]


def _expert_stack(scheme: Scheme, e: int, n: int, k: int, g: torch.Generator
                  ) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """E quantized (n, k) matrices in the kernel's form, and their dequantized float64 stack."""
    qt = quant.quantize(torch.randn(e, n, k, generator=g), scheme)
    scale = qt.scale.bfloat16()
    if scheme.method == "int8":
        dense = qt.weight.double() * scale.double()[..., None]
        return list(zip(qt.weight.unbind(0), scale.unbind(0))), dense
    zero = torch.zeros_like(scale) if qt.zero is None else qt.zero.bfloat16()
    dense = quant.dequantize(quant.QuantizedTensor(qt.weight, scale.float(), zero.float()), scheme, torch.float64)
    packed = native.int4_blocks(quant.unpack_int4(qt.weight))
    return list(zip(packed.unbind(0), scale.unbind(0), zero.unbind(0))), dense


@pytest.fixture(params=[1, 3], ids=lambda n: f"{n}threads")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's thread count (which the kernels are given) for one test: the suite runs on one, and a parallel
    region's bugs show only on several (3: work that does not split evenly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 3, 6, 20])
def test_int8_bmm_matches_reference(native_lib, threads: int, rows: int) -> None:
    """Batched products (the absorbed attention's per-head blocks): each of B products against its float64
    reference on the quantized activations, at block sizes of 1 and 4 weight rows and past MAX_ROWS."""
    g = torch.Generator().manual_seed(rows)
    b, n, k = 5, 70, 96  # 70: a partial last block of 4 rows
    w, dense = _expert_stack(Scheme("int8"), b, n, k, g)
    q, scale = torch.stack([p[0] for p in w]), torch.stack([p[1] for p in w])
    x = torch.randn(b, rows, k, generator=g)
    ref = torch.bmm(native.q8_activations(x).double(), dense.transpose(1, 2))
    y = native.int8_bmm(x, q, scale, native_lib)
    assert y.shape == (b, rows, n) and y.dtype == torch.float32 and _rel(y, ref) < 1e-5
    yb = native.int8_bmm(x.bfloat16(), q, scale, native_lib)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, native.int8_bmm(x.bfloat16().float(), q, scale, native_lib).bfloat16())
    # a view in another order (absorb_output's transposed rows) multiplies the same values
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(native.int8_bmm(xt, q, scale, native_lib), y)


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 32), Scheme("int4", 64, symmetric=False)], ids=str)
def test_fused_experts_match_reference(native_lib, threads: int, scheme: Scheme, tokens: int) -> None:
    """The one-call MoE step against the expert-by-expert float64 reference: 8 experts, 6 chosen per token, so
    experts are shared between tokens (each reads its weights once for all of them) and some stay idle."""
    g = torch.Generator().manual_seed(tokens)
    n_exp, dim, hidden, k = 8, 128, 96 if scheme.method == "int8" else 128, 6
    w13, d13 = _expert_stack(scheme, n_exp, 2 * hidden, dim, g)
    w2, d2 = _expert_stack(scheme, n_exp, dim, hidden, g)
    table = native.expert_table(w13, w2)
    x = torch.randn(tokens, dim, generator=g)
    indices = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    act = native.q8_activations  # what the int8 and int4 products multiply
    ref = torch.zeros(tokens, dim, dtype=torch.float64)
    for t in range(tokens):
        for e, w in zip(indices[t].tolist(), weights[t].double()):
            gate, up = (d13[e] @ act(x[t]).double()).chunk(2)
            ref[t] += w * (d2[e] @ act(F.silu(gate) * up).double())
    bits = 8 if scheme.method == "int8" else 4
    y = native.experts(bits, table, x, indices, weights, hidden, scheme.group_size, native_lib)
    assert y.dtype == torch.float32 and _rel(y, ref) < 1e-5
    yb = native.experts(bits, table, x.bfloat16(), indices, weights, hidden, scheme.group_size, native_lib)
    ref_b = native.experts(bits, table, x.bfloat16().float(), indices, weights, hidden, scheme.group_size, native_lib)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, ref_b.bfloat16())  # widened in, rounded once out
