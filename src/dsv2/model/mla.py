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

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.norm import RMSNorm
from dsv2.model.rope import apply_rope


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
        self.wkv_b = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, H) at positions start..start+T-1 -> (B, T, H).

        mask: optional (B, 1, T, T) bool, True = may attend (padding); causal when None.
        kv_cache: optional (B, S_max, kv_rank + rope_dim) latent cache; this call writes rows
        start..start+T-1 and attends over rows 0..start+T-1 with the absorbed weights.
        """
        B, T, _ = x.shape
        q_in, c_kv, k_pe = self.wqkv_a(x).split([self.q_in_dim, self.kv_rank, self.rope_dim], dim=-1)
        q = self.wq_b(self.q_norm(q_in)) if self.q_lora else q_in
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[..., None, :], sin[..., None, :])  # (B, T, nh, dr)
        c_kv = self.kv_norm(c_kv)  # (B, T, dc)
        k_pe = apply_rope(k_pe, cos, sin)  # (B, T, dr): one rotated key shared by all heads
        if kv_cache is None:
            return self._naive(q_nope, q_pe, c_kv, k_pe, mask)
        kv_cache[:, start:start + T] = torch.cat([c_kv, k_pe], dim=-1)
        return self._absorbed(q_nope, q_pe, kv_cache[:, :start + T].to(q.dtype), start)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        B, T, nh, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, T, nh, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, nh, T, dq)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, nh, self.rope_dim)], dim=-1).transpose(1, 2)
        dq = q.shape[-1]
        # The fused (flash) SDPA kernels need one head dim for q, k and v; with dv < dq torch falls back to
        # the unfused math path (2-3x slower on CPU), so pad v with zeros and drop the padding afterwards.
        if self.v_dim < dq:
            v = F.pad(v, (0, dq - self.v_dim))
        o = F.scaled_dot_product_attention(
            q, k, v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
        )  # (B, nh, T, max(dq, dv))
        return self.wo(o[..., : self.v_dim].transpose(1, 2).flatten(2))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, start: int) -> torch.Tensor:
        B, T, nh, _ = q_nope.shape
        S = latent.shape[1]
        w = self.wkv_b.weight.view(nh, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (nh, dn, dc), (nh, dv, dc)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, nh, dc)
        # Every (token, head) pair is one query row of a single-head attention over the latents.
        q = torch.cat([q_lat, q_pe], dim=-1).view(B, 1, T * nh, self.kv_rank + self.rope_dim)
        k = latent[:, None]  # (B, 1, S, dc + dr)
        v = latent[:, None, :, : self.kv_rank]  # (B, 1, S, dc): the normed latent is the value
        mask = None
        if T > 1:  # row (t, h) sees keys 0..start+t
            q_pos = torch.arange(start, start + T, device=latent.device).repeat_interleave(nh)
            mask = torch.arange(S, device=latent.device)[None, :] <= q_pos[:, None]  # (T*nh, S)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        o = torch.einsum("bthc,hdc->bthd", o.view(B, T, nh, self.kv_rank), w_uv)  # (B, T, nh, dv)
        return self.wo(o.flatten(2))
