"""The DeepSeek-V2 decoder: pre-norm blocks of MLA + (dense SwiGLU | DeepSeekMoE), fp32 logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.loss import IGNORE_INDEX, head_cross_entropy
from dsv2.model.mla import MLA, AttentionCache
from dsv2.model.moe import Dropping, MoE, Routing
from dsv2.model.norm import MLP, RMSNorm
from dsv2.model.rope import Rotary


class LatentCache:
    """A contiguous per-sequence latent cache: one (B, max_len, kv_lora_rank + qk_rope_head_dim) tensor per
    layer holding [RMSNorm(c_kv) | RoPE(k_pe)] -- everything MLA needs to attend to a past token.
    All B sequences advance together; the engine's paged cache (dsv2.infer) handles mixed lengths."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.layers = [torch.zeros(batch_size, max_len, width, dtype=dtype, device=device)
                       for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens cached; advanced by Transformer after all layers have written
        self.max_len = max_len

    def attend(self, layer: int, attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor:
        T, end = c_kv.shape[1], self.length + c_kv.shape[1]
        buf = self.layers[layer]
        buf[:, self.length:end] = torch.cat([c_kv, k_pe], dim=-1)
        mask = None
        if T > 1:  # new token t sees cached tokens 0..length+t
            q_pos = torch.arange(self.length, end, device=buf.device)
            mask = torch.arange(end, device=buf.device)[None, :] <= q_pos[:, None]  # (T, S)
        return attn.attend_absorbed(q_nope, q_pe, buf[:, :end].to(q_nope.dtype), mask)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: AttentionCache | None, layer: int, routing_out: list[Routing] | None = None,
                dropping: Dropping | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            return x + self.ffn(h, routing_out=routing_out, dropping=dropping)
        return x + self.ffn(h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.init_weights(cfg.initializer_range)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """N(0, std) for every matrix, ones for the norms (a no-op on the meta device)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        routing_out: list[Routing] | None = None,
        labels: torch.Tensor | None = None,
        dropping: Dropping | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in fp32; with labels, the mean cross-entropy instead.

        positions: (B, T) or (T,); default start..start+T-1 where start is the cache length (or 0).
        attention_mask: (B, T) with 1 for real tokens and 0 for padding (left or right), as in transformers.
        cache: a LatentCache (the new tokens' latents are appended and attention runs absorbed) or another
        AttentionCache, such as the engine's paged cache, which then also needs explicit positions.
        routing_out: if given, each MoE layer appends its Routing (scores, chosen experts, weights) in
        layer order -- what the balance losses and load statistics read.
        labels: (B, T) the token each position should predict (already shifted; -100 = no loss there): returns
        the mean next-token cross-entropy (0-dim fp32), computed with lm_head in chunks of positions so that the
        (B, T, vocab) logits and their gradient are never held whole (dsv2.model.loss).
        dropping: token dropping for a training step (the policy and the protected sequences), applied in every
        MoE layer.
        """
        hidden = self.hidden_states(input_ids, positions, attention_mask, cache, routing_out, dropping)
        if labels is None:
            return self.logits(hidden)
        if not isinstance(self.head, nn.Linear):  # a packed head (an inference model) has no dense weight
            return F.cross_entropy(self.logits(hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        # Under autocast the head's products go through F.linear, so autocast picks their dtype as it would for
        # the unchunked head; dsv2.model.loss keeps the softmax and the gradient sums in fp32.
        # A head swapped from outside for a faster library's nn.Linear subclass names its product `product`.
        autocast = torch.is_autocast_enabled(hidden.device.type)
        mm = F.linear if autocast else getattr(self.head, "product", F.linear)
        return head_cross_entropy(hidden, self.head.weight, labels, mm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on (..., H) final hidden states -> fp32 logits (prefill needs only the last position's)."""
        return self.head(hidden).float()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        routing_out: list[Routing] | None = None,
        dropping: Dropping | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, H), before lm_head."""
        T = input_ids.shape[1]
        if isinstance(cache, LatentCache):
            if attention_mask is not None:
                raise ValueError("LatentCache holds equal-length sequences; attention_mask is not supported with it")
            if cache.length + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} tokens; {cache.length} cached + {T} new do not fit")
        if positions is None:
            start = cache.length if isinstance(cache, LatentCache) else 0
            positions = torch.arange(start, start + T, device=input_ids.device)
        cos, sin = self.rotary(positions)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, routing_out, dropping)
        if isinstance(cache, LatentCache):
            cache.length += T
        return self.norm(x)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 -> (B, 1, T, T) bool: causal, never attending to padding. Each position may always see
    itself, so the rows of padding queries are not empty (their outputs are unused, but must not be NaN)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    return (causal & keys) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)
