"""Absorbed MLA decode over the paged latent cache: one query token per sequence, all heads, in latent space.

Each sequence b has H query rows q = [W_UK^T q_nope | q_pe] (kv_rank + rope_dim values, the width W of a cache
entry) and attends over its first ctx_lens[b] cached latents [c_kv | k_pe], found through its block table (token i
lives in slot block_table[b, i // block_size] * block_size + i % block_size of the flat (num_slots, W) layer tensor of
dsv2.infer.cache); the keys are the whole latent, the values its first kv_rank columns, and the result is the softmax
average of the values (B, H, kv_rank) in fp32, before W_UV (which stays in torch). The kernel is flash-decoding:
every program takes one sequence, BLOCK_H heads and one of `num_splits` slices of that sequence's context, gathers
the slice's latents through the block table, runs an online softmax in fp32, and a second small kernel merges the
slices by log-sum-exp. Why this shape: all heads share one latent per token, so decode is a stream over the cache
and a program that serves BLOCK_H heads reads each latent once for all of them, turning H matrix-vector products
into one (BLOCK_H, W) x (W, BLOCK_N) tile product; reading through the block table touches only the tokens a
sequence has, where the torch path (dsv2.infer.runner.PagedAttention) gathers every sequence's whole padded
context first; and splitting the context keeps the GPU busy when few sequences decode. fp8 latents are read as
stored and their per-token scales applied to the scores and probabilities (q . (s k) = s (q . k)), which costs
one multiply per score instead of one per latent value. The launcher reads no tensor on the host (no sync): the
split count and the grid come from shapes alone, and each sequence's length is read in-kernel.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_H = 16  # heads per program: tl.dot's smallest M on NVIDIA GPUs (fewer heads are padded by masking)
BLOCK_N = 32  # context tokens per loop step
MIN_SPLIT_TOKENS = 128  # a split shorter than this costs more in partial outputs and merging than it gains
MAX_SPLITS = 64
LOG2E = math.log2(math.e)  # the kernel works in base 2: exp2 is the fast exponential


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(programs: int, max_ctx: int, device: torch.device) -> int:
    """Context splits per sequence from shapes alone: about two programs per SM, no split below MIN_SPLIT_TOKENS
    of the longest context the block tables can describe."""
    if device.type != "cuda":  # the interpreter runs programs one by one: splitting only adds work
        return 1
    want = triton.cdiv(2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()),
                       programs)
    return max(1, min(want, triton.cdiv(max_ctx, MIN_SPLIT_TOKENS), MAX_SPLITS))


def mla_decode_reference(q_BHD: torch.Tensor, cache_SW: torch.Tensor, scales_S2: torch.Tensor | None,
                         block_tables_BN: torch.Tensor, ctx_lens_B: torch.Tensor, block_size: int, kv_rank: int,
                         softmax_scale: float) -> torch.Tensor:
    """q (B, H, W) over each sequence's first ctx_lens[b] >= 1 cached latents -> (B, H, kv_rank) fp32.

    Plain torch, one sequence at a time, reading only the table entries a sequence's length covers (entries
    beyond may be anything, out of range included). scales (num_slots, 2) fp32 dequantize an fp8 cache:
    column 0 the first kv_rank values of a token, column 1 the rest."""
    B, H, W = q_BHD.shape
    out = torch.empty(B, H, kv_rank, dtype=torch.float32, device=q_BHD.device)
    for b, n in enumerate(ctx_lens_B.tolist()):
        pos = torch.arange(n, device=cache_SW.device)
        slots = block_tables_BN[b].to(cache_SW.device, torch.long)[pos // block_size] * block_size + pos % block_size
        latent = cache_SW[slots].float()  # (n, W)
        if scales_S2 is not None:
            s = scales_S2[slots].float()
            latent = torch.cat([latent[:, :kv_rank] * s[:, :1], latent[:, kv_rank:] * s[:, 1:]], dim=-1)
        scores = q_BHD[b].float() @ latent.T * softmax_scale  # (H, n)
        out[b] = scores.softmax(dim=-1) @ latent[:, :kv_rank]
    return out


@triton.jit
def _mla_decode_split(
    q_ptr, cache_ptr, scales_ptr, bt_ptr, lens_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_cs, stride_ss, stride_btb,
    H, max_ctx, qk_scale,
    BLOCK_SIZE: tl.constexpr, KV_RANK: tl.constexpr, ROPE_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_SCALES: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    h_ok = heads < H
    # The width W = KV_RANK + ROPE_DIM is rarely a power of two (512 + 64): the latent part and the rope part
    # are separate power-of-two tiles, each masked to its true size.
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < KV_RANK
    r_ok = offs_r < ROPE_DIM
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_c = tl.load(q_rows + offs_c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0).to(DOT)
    q_r = tl.load(q_rows + KV_RANK + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(DOT)

    # This sequence's context, cut into NUM_SPLITS slices of whole BLOCK_N steps; short contexts leave the last
    # splits empty (they store lse = -inf and drop out of the merge).
    ctx = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), max_ctx)
    # (tl.cdiv written out: the interpreter cannot call it.)
    split_len = ((ctx + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the base-2 scores
    l = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        # Masked loads: table entries and slots past the sequence's end are never dereferenced, whatever they hold.
        block = tl.load(bt_ptr + b * stride_btb + pos // BLOCK_SIZE, mask=ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # int64: slot * W can pass 2**31
        rows = cache_ptr + slot[:, None] * stride_cs
        k_c = tl.load(rows + offs_c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0).to(DOT)  # (N, C)
        k_r = tl.load(rows + KV_RANK + offs_r[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0).to(DOT)
        s_c = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)  # (BLOCK_H, BLOCK_N)
        s_r = tl.dot(q_r, tl.trans(k_r), input_precision=PRECISION)
        if HAS_SCALES:
            sc = tl.load(scales_ptr + slot * stride_ss, mask=ok, other=0.0)
            sr = tl.load(scales_ptr + slot * stride_ss + 1, mask=ok, other=0.0)
            s = s_c * sc[None, :] + s_r * sr[None, :]
        else:
            s = s_c + s_r
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: the step's first position is always in range
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if HAS_SCALES:
            p = p * sc[None, :]  # the values are the scaled latents: sum_t p_t (s_t c_t) = sum_t (p_t s_t) c_t
        # The latent tile just read as keys is the value tile too: the first KV_RANK columns of each key.
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), k_c, input_precision=PRECISION)
        m = m_new

    nonempty = l > 0
    acc = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
    row = (b * H + heads) * NUM_SPLITS + split  # partials (B, H, NUM_SPLITS, KV_RANK)
    tl.store(part_lse_ptr + row, lse, mask=h_ok)
    tl.store(part_o_ptr + row[:, None] * KV_RANK + offs_c[None, :], acc, mask=h_ok[:, None] & c_ok[None, :])


@triton.jit
def _mla_decode_merge(part_o_ptr, part_lse_ptr, out_ptr, KV_RANK: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    bh = tl.program_id(0)  # one (sequence, head) row
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    s_ok = offs_s < NUM_SPLITS
    c_ok = offs_c < KV_RANK
    lse = tl.load(part_lse_ptr + bh * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # empty splits (-inf) weigh 0; split 0 is never empty for ctx >= 1
    o = tl.load(part_o_ptr + (bh * NUM_SPLITS + offs_s[:, None]) * KV_RANK + offs_c[None, :],
                mask=s_ok[:, None] & c_ok[None, :], other=0.0)
    tl.store(out_ptr + bh * KV_RANK + offs_c, tl.sum(w[:, None] * o, 0) / tl.sum(w, 0), mask=c_ok)


_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def mla_decode(q_BHD: torch.Tensor, cache_SW: torch.Tensor, scales_S2: torch.Tensor | None,
               block_tables_BN: torch.Tensor, ctx_lens_B: torch.Tensor, block_size: int, kv_rank: int,
               softmax_scale: float, *, num_splits: int | None = None) -> torch.Tensor:
    """mla_decode_reference through Triton -> (B, H, kv_rank) fp32; ctx_lens >= 1 (and at most the tokens the block
    tables describe). num_splits: context slices per sequence (default: from the shapes and the GPU's SM count)."""
    B, H, W = q_BHD.shape
    if cache_SW.shape[1] != W or not 0 < kv_rank < W:
        raise ValueError(f"q width {W}, cache width {cache_SW.shape[1]} and kv_rank {kv_rank} do not match")
    if cache_SW.stride(1) != 1 or (scales_S2 is not None and scales_S2.stride(1) != 1):
        raise ValueError("the cache's and the scales' rows must be contiguous")
    rope_dim = W - kv_rank
    q = q_BHD if q_BHD.stride(2) == 1 else q_BHD.contiguous()
    tables = block_tables_BN if block_tables_BN.stride(1) == 1 else block_tables_BN.contiguous()
    lens = ctx_lens_B.contiguous()
    head_groups = triton.cdiv(H, BLOCK_H)
    max_ctx = tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _num_splits(B * head_groups, max_ctx, q.device)
    # The products run in q's dtype: bf16 (or fp16) on tensor cores, fp32 exactly ("ieee", not tf32) for an fp32 q.
    # Under the interpreter (CPU tensors) they run in fp32: its tl.dot multiplies bf16's raw uint16 storage.
    dot = tl.float32 if q.device.type == "cpu" else _DOT_DTYPES[q.dtype]
    precision = "ieee" if dot == tl.float32 else "tf32"  # tf32, the default, means nothing for 16-bit operands
    part_o = torch.empty(B, H, num_splits, kv_rank, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, kv_rank, dtype=torch.float32, device=q.device)
    has_scales = scales_S2 is not None
    scales = scales_S2 if has_scales else part_lse  # any pointer: unread without scales
    block_c = max(16, triton.next_power_of_2(kv_rank))
    _mla_decode_split[(B, head_groups, num_splits)](
        q, cache_SW, scales, tables, lens, part_o, part_lse,
        q.stride(0), q.stride(1), cache_SW.stride(0), scales.stride(0) if has_scales else 0, tables.stride(0),
        H, max_ctx, softmax_scale * LOG2E,
        BLOCK_SIZE=block_size, KV_RANK=kv_rank, ROPE_DIM=rope_dim, NUM_SPLITS=num_splits,
        HAS_SCALES=has_scales, DOT=dot, PRECISION=precision,
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        num_warps=8 if dot == tl.float32 and block_c >= 256 else 4, num_stages=2,  # fp32 tiles: twice the registers
    )
    _mla_decode_merge[(B * H,)](part_o, part_lse, out, KV_RANK=kv_rank, NUM_SPLITS=num_splits,
                                BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_C=block_c,
                                num_warps=4 if block_c >= 256 else 1)
    return out

