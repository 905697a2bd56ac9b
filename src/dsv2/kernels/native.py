"""dsv2's own CPU kernels, built at first use with the system C++ compiler for this machine's CPU and loaded
with ctypes: cpu/gemv.cpp, few-row products with int8 and int4 weights that read each weight once for all rows;
cpu/mla_decode.cpp, the absorbed decode attention read straight from the paged latent cache.

Why they exist: torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` stream the whole weight again for
every activation row, and the int4 one is compute-bound well below the memory bandwidth at one row
(benchmarks/quant.py). A decode step multiplies 1 to 16 rows by each weight, which is exactly the case they
lose.

The build: `c++ -O3 -march=native -fopenmp -shared`, cached under `$DSV2_CACHE_DIR` (default
`~/.cache/dsv2/kernels`) by a hash of the source, the compiler's version and the CPU's model and flags, so a
machine with another CPU builds its own. OpenMP comes from the libgomp that torch has already loaded (the same
soname), so both share one thread pool; each call passes torch's thread count. Without a compiler, or with
`DSV2_NATIVE=0`, nothing is built and the quantized weights use torch's kernels: slower, the same results to
rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_DIR = Path(__file__).with_name("cpu")
SOURCES = (CPU_DIR / "gemv.cpp", CPU_DIR / "mla_decode.cpp")
HEADERS = (CPU_DIR / "simd.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Each code path of the kernels (cpu/simd.h) by the flags that select it, for tests and benchmarks to build
# side by side: this CPU's (AVX-512 where it has it), AVX2, portable.
BUILDS = {
    "native": FLAGS,
    "avx2": ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"),
    "scalar": ("-O2", "-fopenmp", "-shared", "-fPIC", "-std=c++17"),
}
# Rows up to which the kernels run: past that, dequantize + the dense GEMM is faster (benchmarks/quant.py).
MAX_ROWS = 16
# K must be a whole number of blocks of 32 (int8: the activations' quantization blocks; int4: the weights'
# packing), and int4 rows have at most INT4_MAX_BLOCKS blocks of 32 (cpu/gemv.cpp's MAX_GROUPS, the size of its
# per-block buffers): every DeepSeek-V2 projection qualifies.
INT8_K_MULTIPLE, INT4_BLOCK, INT4_MAX_BLOCKS = 32, 32, 1024
Q8_BLOCK = 32  # int8 products quantize each activation row per block of this many values (`q8_activations`)


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep))  # one copy of each line, not one per core


def _cache_dir() -> Path:
    root = os.environ.get("DSV2_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsv2"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library built from SOURCES with these flags (cached); RuntimeError if it cannot be."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++; or set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(flags), _cpu_identity()]).encode())
    out = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (tests, servers) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i, c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dsv2_int8_mm.argtypes = [p, p, p, c, p, c, i, i, i, c]
    lib.dsv2_int8_bmm.argtypes = [p, p, p, c, p, c, i, i, i, i, c]
    lib.dsv2_int4_mm.argtypes = [p, p, p, p, c, p, c, i, i, i, i, c]
    lib.dsv2_int8_dequant.argtypes = [p, p, p, i, i, ctypes.c_int]
    lib.dsv2_int4_dequant.argtypes = [p, p, p, p, i, i, i, ctypes.c_int]
    lib.dsv2_mla_decode.argtypes = [p, p, c, p, p, p, p, i, i, i, i, i, i, ctypes.c_float, i, p, c]
    lib.dsv2_experts.argtypes = [c, p, i, i, i, i, p, c, p, p, i, i, p, c, c]
    for f in (lib.dsv2_int8_mm, lib.dsv2_int8_bmm, lib.dsv2_int4_mm, lib.dsv2_int8_dequant, lib.dsv2_int4_dequant, lib.dsv2_mla_decode,
              lib.dsv2_experts):
        f.restype = None
    lib.dsv2_vector_width.argtypes, lib.dsv2_vector_width.restype = [], ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels built for this machine, or None (no compiler, a failed build, DSV2_NATIVE=0)."""
    if os.environ.get("DSV2_NATIVE", "1") == "0":
        return None
    try:
        return open_library(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("dsv2's CPU kernels are not available (%s); quantized weights use torch's kernels", e)
        return None


def available() -> bool:
    return library() is not None


def int4_preferred() -> bool:
    """Whether int4 weights should use these kernels rather than torch's: on the AVX-512 builds, which also run
    a MoE layer's routed experts as one call (`experts`). The AVX2 code, timed on AVX-512 machines
    (benchmarks/quant.py --build avx2, a 2816 x 2048 product), stayed slower than torch's int4 kernel: 0.34
    against 0.23 ms at one row on a Sapphire Rapids with its fp32 dot products, 0.135 against 0.102 at one row
    and 0.26 against 0.15 at four on a Zen 5 with int8 activations (maddubs); no AVX2-only machine has measured
    both yet. int8 uses these kernels on every build: its AVX2 code beat torch's (0.159 against 0.216 ms at one
    row on the Zen 5)."""
    lib = library()
    return lib is not None and lib.dsv2_vector_width() >= 16


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as contiguous (R, K) rows in a dtype the kernels read (bf16 or fp32)."""
    x = x.reshape(-1, k)
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    return x.contiguous()


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """What the int8 products multiply in place of x (..., K): each row quantized per block of Q8_BLOCK values by
    llama.cpp's Q8_0 rule (d = max|x| / 127, q = round(x * (1 / d)), ties to even, in fp32), dequantized. The
    kernels' reference; their integer dot products are exact, so only the fp32 sums of blocks differ."""
    xb = x.float().unflatten(-1, (-1, Q8_BLOCK))
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(xb * inv) * d).flatten(-2)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL | None = None
            ) -> torch.Tensor:
    """q8_activations(x) (R, K) @ (q * scale[:, None]).T, in x's dtype when that is bf16 or fp32 (fp32 otherwise;
    accumulated in fp32 either way): integer dot products per block of 32, as llama.cpp's Q8_0 x Q8_0; q (N, K)
    int8, scale (N,) bf16, R <= MAX_ROWS."""
    n, k = q.shape
    xr = _rows(x, k)
    bf = xr.dtype == torch.bfloat16
    y = torch.empty(xr.shape[0], n, dtype=xr.dtype)
    (lib or library()).dsv2_int8_mm(q.data_ptr(), scale.data_ptr(), xr.data_ptr(), bf, y.data_ptr(), bf,
                                    xr.shape[0], n, k, torch.get_num_threads())
    return y


def int8_bmm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL | None = None
             ) -> torch.Tensor:
    """B products of one shape in one call: x (B, R, K) -> (B, R, N), product b as int8_mm(x[b], q[b], scale[b]);
    q (B, N, K) int8, scale (B, N) bf16, R <= MAX_ROWS. The threads share all B products' weight rows, so B small
    matrices (the absorbed attention's per-head blocks) cost one call, not B."""
    b, n, k = q.shape
    xr = x.reshape(b, -1, k)
    if xr.dtype not in (torch.bfloat16, torch.float32):
        xr = xr.float()
    xr = xr.contiguous()
    bf = xr.dtype == torch.bfloat16
    y = torch.empty(b, xr.shape[1], n, dtype=xr.dtype)
    (lib or library()).dsv2_int8_bmm(q.data_ptr(), scale.data_ptr(), xr.data_ptr(), bf, y.data_ptr(), bf, b,
                                     xr.shape[1], n, k, torch.get_num_threads())
    return y


def int4_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """q8_activations(x) (R, K) @ W.T as int8_mm (integer dot products of the nibbles and the quantized
    activations), W = (q - 8) * scale + zero by groups: q (N, K / 2) uint8 in the layout of `int4_blocks`, scale
    and zero (N, K / group) bf16."""
    n, k = q.shape[0], 2 * q.shape[1]
    xr = _rows(x, k)
    bf = xr.dtype == torch.bfloat16
    y = torch.empty(xr.shape[0], n, dtype=xr.dtype)
    (lib or library()).dsv2_int4_mm(q.data_ptr(), scale.data_ptr(), zero.data_ptr(), xr.data_ptr(), bf, y.data_ptr(),
                                    bf, xr.shape[0], n, k, group_size, torch.get_num_threads())
    return y


def expert_table(w13: list[tuple[torch.Tensor, ...]], w2: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The (E, 6) address table `experts` reads: per expert w13's (q, scale, zero) then w2's, zero absent (0) for
    int8. The caller keeps the tensors alive (and contiguous) for as long as the table is used."""
    def row(parts: tuple[torch.Tensor, ...]) -> list[int]:
        return [t.data_ptr() for t in parts] + [0] * (3 - len(parts))
    return torch.tensor([row(a) + row(b) for a, b in zip(w13, w2, strict=True)], dtype=torch.int64)


def experts(bits: int, table: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            hidden: int, group_size: int = 0, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The routed experts of a decode step in one native call: x (T, H) -> sum over each token's K choices
    (indices, weights (T, K), ids below E) of weight * W2_e(silu(gate) * up), [gate; up] = W13_e x, with the
    int8 (bits 8) or int4 (bits 4, `int4_blocks` layout, groups of group_size) weights of `expert_table`.
    hidden: the experts' intermediate size I. Intermediates are fp32 (each product's activations are
    q8_activations of them, as int8_mm's and int4_mm's); the result is in x's dtype when that is bf16 or fp32. Each expert's
    weights are read once for all the tokens that chose it."""
    t, h = x.shape
    xr = _rows(x, h)
    bf = xr.dtype == torch.bfloat16
    idx = indices.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    y = torch.empty(t, h, dtype=xr.dtype)
    (lib or library()).dsv2_experts(bits, table.data_ptr(), table.shape[0], h, hidden, group_size, xr.data_ptr(), bf,
                                    idx.data_ptr(), w.data_ptr(), t, idx.shape[1], y.data_ptr(), bf,
                                    torch.get_num_threads())
    return y


def int8_dequant(q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """q * scale[:, None] in bf16."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    (lib or library()).dsv2_int8_dequant(q.data_ptr(), scale.data_ptr(), out.data_ptr(), *q.shape,
                                         torch.get_num_threads())
    return out


def int4_dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The bf16 matrix of int4_mm's weight."""
    n, k = q.shape[0], 2 * q.shape[1]
    out = torch.empty(n, k, dtype=torch.bfloat16)
    (lib or library()).dsv2_int4_dequant(q.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), n, k,
                                         group_size, torch.get_num_threads())
    return out


def int4_blocks(values: torch.Tensor) -> torch.Tensor:
    """uint8 values (..., N, K) in [0, 15] -> the kernel's packing (..., N, K / 2): in each block of 32, byte i
    holds weight i in its low nibble and weight i + 16 in its high one."""
    b = values.unflatten(-1, (-1, 2, INT4_BLOCK // 2))
    return (b[..., 0, :] | (b[..., 1, :] << 4)).flatten(-2)


def int4_unblock(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of int4_blocks."""
    b = packed.unflatten(-1, (-1, INT4_BLOCK // 2))
    return torch.stack([b & 15, b >> 4], dim=-2).flatten(-3)


# The paged decode attention (cpu/mla_decode.cpp). Cache element types it reads, by its code for them.
MLA_CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}
# A context is split over threads in parts of at least this many tokens, so that a short one is not cut up for a
# part's fixed costs (its (H, kv_rank) partial output and the merge). A choice, not tuned: no other value measured.
MLA_MIN_PART_TOKENS = 256


@functools.cache
def _fp8_values() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


@torch.library.custom_op("dsv2::mla_decode_cpu", mutates_args=(), device_types="cpu")
def mla_decode(q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor | None, block_tables: torch.Tensor,
               ctx_lens: torch.Tensor, block_size: int, kv_rank: int, softmax_scale: float) -> torch.Tensor:
    """q (B, H, D) over each sequence's first ctx_lens[b] >= 1 latents of one layer's paged cache (slots, D), read
    through block_tables (B, max_blocks) -> (B, H, kv_rank) fp32: dsv2.kernels.gpu.mla_decode's contract
    (mla_decode_reference), on the CPU. A torch custom op so that a compiled decode graph calls it whole.
    scales (slots, 2) fp32 for an fp8 cache."""
    return mla_decode_with(library(), q, cache, scales, block_tables, ctx_lens, block_size, kv_rank, softmax_scale)


def mla_decode_with(lib: ctypes.CDLL, q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor | None,
                    block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int, kv_rank: int,
                    softmax_scale: float) -> torch.Tensor:
    """mla_decode on a given build of the kernels (the tests run each code path the source has)."""
    if cache.dtype not in MLA_CACHE_TYPES:
        raise ValueError(f"the CPU decode attention reads fp32, bf16 or fp8 e4m3 caches, not {cache.dtype}")
    if cache.dtype == torch.float8_e4m3fn and scales is None:
        raise ValueError("an fp8 cache needs its scales")
    B, H, D = q.shape
    qf = q.float().contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = ctx_lens.to(torch.int64).contiguous()
    fp8 = cache.dtype == torch.float8_e4m3fn
    cache = cache.contiguous()  # bound to names: the kernel reads through raw pointers, which must outlive the call
    scales = scales.float().contiguous() if fp8 else None
    out = torch.empty(B, H, kv_rank, dtype=torch.float32)
    lib.dsv2_mla_decode(
        qf.data_ptr(), cache.data_ptr(), MLA_CACHE_TYPES[cache.dtype], scales.data_ptr() if fp8 else None,
        _fp8_values().data_ptr() if fp8 else None, tables.data_ptr(), lens.data_ptr(), B, tables.shape[1],
        block_size, H, D, kv_rank, softmax_scale, MLA_MIN_PART_TOKENS, out.data_ptr(), torch.get_num_threads())
    return out


@mla_decode.register_fake
def _(q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor | None, block_tables: torch.Tensor,
      ctx_lens: torch.Tensor, block_size: int, kv_rank: int, softmax_scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], kv_rank, dtype=torch.float32)
