"""Prefill attention of one chunk over a long context, in key blocks, merged by log-sum-exp (flash attention's
online softmax).

A prefill chunk's n queries are the last n of its ctx tokens: query i, at position ctx - n + i, sees keys
0 .. ctx - n + i. The single-shot path (MLA.attend_naive) decompresses keys and values of the whole context at
once, (ctx, nh, dn + dr) and (ctx, nh, dv), and masks with an (n, ctx) mask: for V2 (128 heads) at 32K tokens
that is over 5 GB of fp32 K/V per layer. Here the context goes through in blocks of `key_block` keys; each block's
latents are read from the cache, decompressed with the layer's own wkv_b, attended, and merged into the
running output with the block's log-sum-exp:

    lse = logaddexp(lse_a, lse_b),    o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b

so no more than one block's K/V (and, off the CPU, its (nh, n, block) scores) exists at a time. Blocks that
every query sees fully run unmasked; only those crossing the causal diagonal take a mask, and queries before a
block's first key skip it (their part of the block is all masked).

Shape suffixes: T queries, S keys of a block, H heads, D the q/k head dim, V the value head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv2.model.mla import MLA

# Keys per block. Equal to the engine's default max_num_batched_tokens, so that a default engine's first chunk
# of a prompt (ctx <= 2,048) stays on the single-shot path and short contexts run exactly as before. Per block the
# merge costs O(n * nh * dv) against O(n * block * nh * (dq + dv)) of attention, well under 1% at this size;
# one block's decompressed K/V is (2,048, nh, 2 * dq) values (v padded to dq): 12 MiB in fp32 for the 135M
# benchmark shape, 384 MiB for V2's 128 heads, against 6 GiB for a whole 32K context.
KEY_BLOCK = 2048


def chunk_attention(attn: MLA, q_nope_THD: torch.Tensor, q_pe_THD: torch.Tensor,
                    latents: Callable[[int, int], torch.Tensor], ctx: int, key_block: int = KEY_BLOCK,
                    fused: bool | None = None) -> torch.Tensor:
    """The chunk's T queries (the last T of ctx tokens) over keys 0 .. ctx - 1 -> (T, nh, dv).

    latents(k0, k1) -> (k1 - k0, kv_rank + rope_dim): the cached [c_kv | k_pe] of tokens k0 .. k1 - 1, read
    block by block so that the whole context's latents need not be gathered either. fused: attend each block
    with torch's fused CPU kernel (default on the CPU) or with the written-out scores (elsewhere).
    """
    T = q_nope_THD.shape[0]
    start = ctx - T  # position of the first query
    fused = q_nope_THD.device.type == "cpu" if fused is None else fused
    q_HTD = torch.cat([q_nope_THD, q_pe_THD], dim=-1).transpose(0, 1)  # (nh, T, dq)
    q_pos = torch.arange(start, ctx, device=q_HTD.device)
    out_HTV = lse_HT = None
    for k0 in range(0, ctx, key_block):
        k1 = min(k0 + key_block, ctx)
        r0 = max(0, k0 - start)  # queries before r0 precede every key of the block
        k_HSD, v_HSV = _decompress(attn, latents(k0, k1))
        mask_TS = None
        if k1 - 1 > start + r0:  # the block reaches past the first attending query's diagonal
            mask_TS = torch.arange(k0, k1, device=q_HTD.device)[None, :] <= q_pos[r0:, None]
        o_HTV, lse_b_HT = _attend_block(q_HTD[:, r0:], k_HSD, v_HSV, mask_TS, attn.softmax_scale, fused)
        if out_HTV is None:  # the first block (k0 = 0) covers every query: r0 = 0
            out_HTV, lse_HT = o_HTV.float(), lse_b_HT.float()
            continue
        _merge_(out_HTV[:, r0:], lse_HT[:, r0:], o_HTV, lse_b_HT)
    return out_HTV.transpose(0, 1).to(q_nope_THD.dtype)


def _decompress(attn: MLA, latent_SW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents (S, dc + dr) -> keys (nh, S, dn + dr), values (nh, S, dv), as MLA.attend_naive builds them."""
    S = latent_SW.shape[0]
    c_kv, k_pe = latent_SW.split([attn.kv_rank, attn.rope_dim], dim=-1)
    kv = attn.wkv_b(c_kv).view(S, attn.n_heads, attn.nope_dim + attn.v_dim)
    k_nope, v = kv.split([attn.nope_dim, attn.v_dim], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None].expand(S, attn.n_heads, attn.rope_dim)], dim=-1)
    return k.transpose(0, 1), v.transpose(0, 1)


def _attend_block(q_HTD: torch.Tensor, k_HSD: torch.Tensor, v_HSV: torch.Tensor, mask_TS: torch.Tensor | None,
                  scale: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one key block -> output (nh, T, dv) and log-sum-exp of the scaled scores (nh, T).

    mask_TS: bool, True = may attend; every row must see at least one key (chunk_attention skips the others).
    """
    dq, dv = q_HTD.shape[-1], v_HSV.shape[-1]
    if fused:
        # The flash kernel behind F.scaled_dot_product_attention on the CPU (an aten op in every torch this project
        # allows), called directly because it also returns the log-sum-exp; the written-out scores below take ~1.8x
        # its time. It wants one head dim for q, k and v (pad v, as attend_naive does) and an additive mask in the
        # query's dtype.
        v = F.pad(v_HSV, (0, dq - dv)) if dv < dq else v_HSV
        bias = None
        if mask_TS is not None:
            bias = torch.zeros(mask_TS.shape, dtype=q_HTD.dtype, device=q_HTD.device)
            bias.masked_fill_(~mask_TS, float("-inf"))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_HTD[None], k_HSD[None], v[None], attn_mask=bias, scale=scale)  # (1, nh, T, dq), (1, nh, T)
        return o[0, ..., :dv], lse[0]
    scores_HTS = torch.matmul(q_HTD, k_HSD.transpose(-1, -2)).float().mul_(scale)
    if mask_TS is not None:
        scores_HTS.masked_fill_(~mask_TS, float("-inf"))
    lse = scores_HTS.logsumexp(dim=-1)  # (nh, T)
    p_HTS = scores_HTS.sub_(lse[..., None]).exp_()
    return torch.matmul(p_HTS.to(v_HSV.dtype), v_HSV), lse


def _merge_(out_HTV: torch.Tensor, lse_HT: torch.Tensor, o_HTV: torch.Tensor, lse_b_HT: torch.Tensor) -> None:
    """Fold one block's normalized output and log-sum-exp into the running fp32 ones, in place (views allowed)."""
    new = torch.logaddexp(lse_HT, lse_b_HT)
    out_HTV.mul_((lse_HT - new).exp_()[..., None]).add_(o_HTV.float() * (lse_b_HT - new).exp_()[..., None])
    lse_HT.copy_(new)
