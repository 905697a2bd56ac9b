"""DeepSeekMoE's routed experts as a grouped GEMM in Triton (a fused-MoE kernel in the manner of vLLM's).

y[t] = sum_k w[t, k] * w2[e] @ (silu(g) * u),  [g; u] = w13[e] @ x[t],  e = indices[t, k]: the same sum as
dsv2.model.moe.inference_experts, with the weighting and the sum over the K choices in fp32 and one cast back.

The layout: the T*K (token, slot) assignments, flat ids t*K + k, are sorted by expert and each expert's run is
padded to a multiple of BLOCK_M with the sentinel T*K (`align_by_expert`), so that every block of BLOCK_M sorted
rows belongs to one expert. A program of the first kernel takes one such block and one BLOCK_N column block,
gathers its tokens' rows of x and multiplies them by the gate rows n and the up rows I + n of that expert's w13,
so the SwiGLU is applied in the epilogue and only silu(g) * u, (T*K, I), reaches memory, stored at each row's
assignment id. The second kernel is the same program over those rows and w2, scaling each row by its routing
weight in fp32 before it writes the (T*K, H) fp32 outputs; torch then sums the K outputs of each token. Compared
with dsv2.model.moe's grouped path (one matmul chain per active expert, sizes from bincount().tolist()), this is
two launches whatever the routing, and an expert's weights are read once per block of its rows rather than once
per row as in the matrix-vector path.

Why no host sync: the padding, the block-to-expert map and the grid come from device tensor ops and a static
upper bound on the padded rows, T*K + min(E, T*K) * (BLOCK_M - 1), with the blocks past the real end marked
expert -1 so their programs exit at once. Nothing waits for the routing to reach the host, so a decode step can
be captured in a CUDA graph (whose replays could not re-read per-expert counts) and the CPU keeps queuing the
next layer's launches while the GPU routes this one. The price is a few idle programs: at most min(E, T*K)
blocks beyond the real ones.

torch._grouped_mm exists in this torch (2.13) and even runs on CPU tensors (fp32, and bf16 when strides are
16-byte multiples), but it takes the rows already gathered and grouped, with offsets from the counts, and a
separate SwiGLU and weighting; it is a private API whose contract has changed between releases, so nothing here
depends on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles for an H100/H200 at V2-Lite's sizes (H 2048, I 1408, E 64, K 6), in bf16. BLOCK_M follows the rows per
# expert (see default_block_m); N and K at 64 keep the first kernel's three tiles (x, gate, up) within 24 KiB a stage.
BLOCK_N = 64
BLOCK_K = 64
GROUP_M = 8  # column blocks of GROUP_M row blocks are scheduled together, so a B tile is reused from L2
NUM_WARPS = 4
NUM_STAGES = 3
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


def default_block_m(n_assignments: int, n_experts: int) -> int:
    """Rows per block from shapes alone: decode (about one row per expert) wastes least at 16, tl.dot's smallest
    M on NVIDIA; prefill's long runs per expert amortise the weight tiles better over 64 rows."""
    per_expert = n_assignments / max(n_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


def max_padded_rows(n_assignments: int, n_experts: int, block_m: int) -> int:
    """The static bound on the padded rows: each non-empty expert (at most min(E, T*K)) adds under block_m of
    padding, and the total is a multiple of block_m."""
    bound = n_assignments + min(n_experts, n_assignments) * (block_m - 1)
    return bound // block_m * block_m


def align_by_expert(indices_TK: torch.Tensor, n_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, K) expert ids -> sorted_ids (R,) int32, block_expert (R // block_m,) int32, num_padded (1,) int32.

    sorted_ids holds the flat assignment ids t*K + k ordered by expert (stable: ascending ids within an expert),
    each expert's run padded to a multiple of block_m with the sentinel T*K; R = max_padded_rows(T*K, E, block_m)
    and rows past the real end are sentinels too. block_expert is the expert of each block, -1 past the end;
    empty experts get no blocks. num_padded is the real padded length. All device ops: no host sync."""
    device = indices_TK.device
    flat = indices_TK.flatten().long()
    n = flat.numel()
    rows = max_padded_rows(n, n_experts, block_m)
    # scatter_add_, not bincount: CUDA's bincount reads the max id back to size its output (a sync).
    counts = torch.zeros(n_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat.index_select(0, order)
    # index_select and scatter_ rather than indexing: plain gathers and scatters, sync-free on CUDA whatever the
    # deterministic-algorithms setting.
    rank = torch.arange(n, device=device) - start.index_select(0, expert_sorted)
    position = padded_start.index_select(0, expert_sorted) + rank
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, position, order.to(torch.int32))
    # A block's expert is the first whose padded run ends beyond the block's first row; empty experts' runs end
    # where they start, so right=True steps over them, and blocks past the last run land on E.
    block_start = torch.arange(0, rows, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert, padded_end[-1:].to(torch.int32)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ids_ptr, block_expert_ptr,
    N, K_DIM, num_valid, up_offset, num_m_blocks,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[id] = A[id // A_ROW_DIV] @ B[e].T for the BLOCK_M sorted ids of one block of expert e, one column block.
    SWIGLU: C = silu(A @ B[e, n].T) * (A @ B[e, up_offset + n].T); MUL_WEIGHT: C *= weight[id] (fp32)."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # past the real end of the padded rows (the grid is sized from a static bound)
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_ok = ids < num_valid  # padding carries the sentinel num_valid
    # int64 offsets: V2's stacked w13 (160 x 3072 x 5120) and a long prefill's rows pass 2**31 elements.
    a_rows = (ids // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    # B[e] is (N, K) row-major; its tile is read transposed, (BLOCK_K, BLOCK_N), for A @ B.T.
    b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
              + offs_k[:, None] * stride_bk)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # only SWIGLU uses it; the compiler drops it otherwise
    for k in range(0, tl.cdiv(K_DIM, BLOCK_K)):
        k_ok = offs_k < K_DIM - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = a.to(DOT)  # a no-op on a GPU (DOT is the operands' dtype); fp32 under the interpreter
        acc = tl.dot(a, b.to(DOT), acc, input_precision=PRECISION)
        if SWIGLU:
            # The up rows of the same output columns, so silu(gate) * up needs no second pass over memory.
            u = tl.load(b_ptrs + up_offset * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, u.to(DOT), acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + ids, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
                  sorted_ids: torch.Tensor, block_expert: torch.Tensor, n_out: int, a_row_div: int, swiglu: bool,
                  mul_weight: bool, dot: tl.dtype, precision: str, block_m: int, block_n: int, block_k: int,
                  group_m: int, num_warps: int, num_stages: int) -> None:
    num_m_blocks = block_expert.numel()
    grid = (num_m_blocks * triton.cdiv(n_out, block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_expert,
        n_out, a.shape[1], c.shape[0], n_out, num_m_blocks,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, SWIGLU=swiglu, MUL_WEIGHT=mul_weight, DOT=dot, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )


def fused_moe(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, *, block_m: int | None = None, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
              group_m: int = GROUP_M, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
              allow_tf32: bool = False) -> torch.Tensor:
    """x (T, H) fp32 or bf16, indices (T, K) expert ids, weights (T, K), w13 (E, 2I, H) gate rows then up rows,
    w2 (E, H, I), both in x's dtype -> (T, H) in x's dtype: the routed experts' weighted sum, as
    inference_experts computes it. Products accumulate in fp32; the intermediate silu(g) * u is stored in x's
    dtype (as the reference's is); the weighted outputs and their sum over K stay fp32.

    Tiles must be powers of two, at least 16 (tl.dot's minimum on NVIDIA). allow_tf32: let fp32 inputs use
    tf32 tensor cores (about 1e-3 relative error) instead of exact fp32 products."""
    T, H = x_TH.shape
    E, two_i, H13 = w13.shape
    inter = two_i // 2
    K = indices_TK.shape[1]
    if H13 != H or two_i != 2 * inter or w2.shape != (E, H, inter) or indices_TK.shape != weights_TK.shape:
        raise ValueError(f"shapes do not fit: x {tuple(x_TH.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, indices {tuple(indices_TK.shape)}, weights {tuple(weights_TK.shape)}")
    if x_TH.dtype not in (torch.float32, torch.bfloat16) or w13.dtype != x_TH.dtype or w2.dtype != x_TH.dtype:
        raise ValueError(f"x, w13 and w2 must share one dtype, fp32 or bf16: got {x_TH.dtype}, {w13.dtype}, "
                         f"{w2.dtype}")
    if T == 0 or K == 0:
        return torch.zeros_like(x_TH)
    if block_m is None:
        block_m = default_block_m(T * K, E)
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    # The products run in x's dtype: bf16 on tensor cores, fp32 exactly ("ieee", not tf32) unless allowed. Under
    # the interpreter (CPU tensors) they run in fp32: its tl.dot multiplies bf16's raw uint16 storage (triton 3.9).
    dot = tl.float32 if x_TH.device.type == "cpu" else _DOT_DTYPES[x_TH.dtype]
    precision = "tf32" if dot != tl.float32 or allow_tf32 else "ieee"  # tf32 means nothing for 16-bit operands
    sorted_ids, block_expert, _ = align_by_expert(indices_TK, E, block_m)
    weights = weights_TK.float().flatten().contiguous()
    tiles = dict(dot=dot, precision=precision, block_m=block_m, block_n=block_n, block_k=block_k, group_m=group_m,
                 num_warps=num_warps, num_stages=num_stages)

    hidden = torch.empty(T * K, inter, dtype=x_TH.dtype, device=x_TH.device)
    _grouped_gemm(x_TH, w13, hidden, weights, sorted_ids, block_expert, inter, K, swiglu=True, mul_weight=False,
                  **tiles)
    out = torch.empty(T * K, H, dtype=torch.float32, device=x_TH.device)
    _grouped_gemm(hidden, w2, out, weights, sorted_ids, block_expert, H, 1, swiglu=False, mul_weight=True,
                  **tiles)
    return out.view(T, K, H).sum(dim=1).to(x_TH.dtype)
