"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Per token, one projection of the hidden state gives the query input and the KV latent:
    x -> wqkv_a -> [ q input | c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim) ]
(q input is the q_lora_rank-dim c_Q, normed and expanded by wq_b; or, without q_lora_rank, the full
queries). Keys and values are *decompressed* from the normed latent by wkv_b. Only
[RMSNorm(c_kv) | RoPE(k_pe)] needs caching: kv_lora_rank + qk_rope_head_dim values per token per layer.

Two equivalent ways to attend:
- naive: materialise k_nope and v for every head (training and prefill, compute-bound);
- absorbed: fold wkv_b into the query and the output (decode, bandwidth-bound). With W_UK, W_UV the
  per-head key and value blocks of wkv_b, q_nope . (W_UK c) = (W_UK^T q_nope) . c and
  sum_t p_t W_UV c_t = W_UV sum_t p_t c_t, so attention runs as MQA directly over the cached latents.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.norm import RMSNorm
from dsv2.model.rope import apply_rope


class KVUp(nn.Linear):
    """wkv_b: the latent's up-projection to per-head [k_nope | v] (kv_b_proj in the checkpoint). The naive path
    calls it as a Linear; the absorbed one multiplies its per-head blocks, which `blocks` gives."""

    def __init__(self, kv_rank: int, n_heads: int, nope_dim: int, v_dim: int) -> None:
        super().__init__(kv_rank, n_heads * (nope_dim + v_dim), bias=False)
        self.n_heads, self.nope_dim, self.v_dim = n_heads, nope_dim, v_dim

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (nh, dn, dc) and W_UV^T (nh, dc, dv), as views of the weight (the inference engine swaps in a
        module that holds them contiguous: see dsv2.kernels.prepare)."""
        w = self.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.in_features)
        return w[:, : self.nope_dim], w[:, self.nope_dim :].transpose(1, 2)

    def absorb_query(self, q_HRD: torch.Tensor) -> torch.Tensor:
        """Per-head queries (nh, R, dn) -> W_UK^T q (nh, R, dc), in the blocks' dtype."""
        w_uk, _ = self.blocks()
        return torch.bmm(q_HRD.to(w_uk.dtype), w_uk)

    def absorb_output(self, o_HRC: torch.Tensor) -> torch.Tensor:
        """Per-head outputs in latent space (nh, R, dc) -> W_UV o (nh, R, dv), in the blocks' dtype."""
        _, w_uv_t = self.blocks()
        return torch.bmm(o_HRC.to(w_uv_t.dtype), w_uv_t)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.q_lora = cfg.q_lora_rank is not None
        self.q_in_dim = cfg.q_lora_rank if self.q_lora else self.n_heads * cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.dropout = cfg.attention_dropout
        # q_a_proj (or q_proj) and kv_a_proj_with_mqa read the same input: one matmul for both.
        self.wqkv_a = nn.Linear(cfg.hidden_size, self.q_in_dim + self.kv_rank + self.rope_dim, bias=False)
        if self.q_lora:
            self.q_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank)
        self.wkv_b = KVUp(self.kv_rank, self.n_heads, self.nope_dim, self.v_dim)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); cos/sin (..., T, rope_dim/2) for the tokens' positions.

        Without a cache, naive causal attention among the T tokens; mask (B, 1, T, T) bool (True = may
        attend) replaces the causal mask, e.g. for padding. With a cache, the cache stores this layer's
        latents and decides how to attend (see LatentCache and the engine's paged cache).
        """
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if cache is None:
            o = self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            o = cache.attend(layer, self, q_nope, q_pe, c_kv, k_pe)
        return self.wo(o.flatten(-2))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q_nope (B, T, nh, dn), rotated q_pe (B, T, nh, dr), normed c_kv (B, T, dc) and
        rotated k_pe (B, T, dr): [c_kv | k_pe] is exactly what a latent cache stores."""
        B, T, _ = x.shape
        q_in, c_kv, k_pe = self.wqkv_a(x).split([self.q_in_dim, self.kv_rank, self.rope_dim], dim=-1)
        q = self.wq_b(self.q_norm(q_in)) if self.q_lora else q_in
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[..., None, :], sin[..., None, :])
        return q_nope, q_pe, self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)

    def attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decompress keys and values of S tokens and attend from T queries -> (B, T, nh, dv).

        mask: bool (B or 1, 1, T, S), True = may attend; None means causal with S == T.
        """
        B, T, nh, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, S, nh, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, nh, T, dq)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, nh, self.rope_dim)], dim=-1).transpose(1, 2)
        dq = q.shape[-1]
        # The fused (flash) SDPA kernels need one head dim for q, k and v; with dv < dq torch falls back to
        # the unfused math path (2-3x slower on CPU), so pad v with zeros and drop the padding afterwards.
        if self.v_dim < dq:
            v = F.pad(v, (0, dq - self.v_dim))
        o = F.scaled_dot_product_attention(
            q, k, v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
        )  # (B, nh, T, max(dq, dv))
        return o[..., : self.v_dim].transpose(1, 2)

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from T queries straight over S cached latents [c_kv | k_pe] (B, S, dc + dr) -> (B, T, nh, dv).

        mask: bool (..., T, S) broadcastable over the batch, True = may attend; None = every key visible.
        """
        B, T, nh, _ = q_nope.shape
        # Every (token, head) pair is one query row of a single-head attention over the latents.
        q = torch.cat([self.absorb_query(q_nope), q_pe], dim=-1).view(B, 1, T * nh, self.kv_rank + self.rope_dim)
        k = latent[:, None]  # (B, 1, S, dc + dr)
        v = latent[:, None, :, : self.kv_rank]  # (B, 1, S, dc): the normed latent is the value
        # Written out rather than SDPA: q, k (dc + dr) and v (dc) differ in head dim, so SDPA would take its
        # unfused math path, which costs several times these few ops for the handful of query rows of decode.
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.softmax_scale)  # (B, 1, T * nh, S)
        if mask is not None:  # a token's mask row applies to its nh query rows
            S = scores.shape[-1]
            scores.view(B, 1, T, nh, S).masked_fill_(~mask[..., None, :], float("-inf"))
        o = torch.matmul(scores.softmax(dim=-1), v)  # (B, 1, T * nh, dc)
        return self.absorb_output(o.view(B, T, nh, self.kv_rank)).to(q_nope.dtype)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, nh, dn) -> W_UK^T q_nope (B, T, nh, dc): the query in latent space, q_nope's dtype."""
        B, T, nh, _ = q_nope.shape
        # Head-batched products over (nh, B*T, .) (einsum would plan the same bmm on every call), by wkv_b, whose
        # inference forms (dsv2.kernels.prepare) hold the blocks in other layouts and formats.
        q_lat = self.wkv_b.absorb_query(q_nope.permute(2, 0, 1, 3).reshape(nh, B * T, -1))  # (nh, B*T, dc)
        return q_lat.to(q_nope.dtype).view(nh, B, T, self.kv_rank).permute(1, 2, 0, 3)

    def absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space (B, T, nh, dc) -> per-head values W_UV o (B, T, nh, dv), in the
        dtype wkv_b's product gives (its blocks')."""
        B, T, nh, _ = o_lat.shape
        o = self.wkv_b.absorb_output(o_lat.reshape(B * T, nh, self.kv_rank).transpose(0, 1))  # (nh, B*T, dv)
        return o.view(nh, B, T, self.v_dim).permute(1, 2, 0, 3)  # (B, T, nh, dv)


class AttentionCache(Protocol):
    """Where latents go and how cached tokens are attended: the contiguous LatentCache here, the
    engine's paged cache in dsv2.infer."""

    def attend(self, layer: int, attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor: ...
