"""YaRN rotary embedding for the 64 (qk_rope_head_dim) rotated dims of MLA.

Two facts from the official code that ports get wrong (model-spec §6-7):
- the checkpoint's rope dims rotate *interleaved* pairs (x[2i], x[2i+1]) with frequency inv_freq[i];
  a Llama-style rotate_half on the raw layout gives garbage;
- YaRN scales cos/sin by mscale(mscale)/mscale(mscale_all_dim) (1.0 for every official config) and the
  *softmax* by mscale(mscale_all_dim)**2 (see ModelConfig.softmax_scale).
"""

from __future__ import annotations

import math

import torch

from dsv2.config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq[i] for the dim/2 rotation pairs, fp32, YaRN-blended when rope_scaling is set."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    y = cfg.rope_scaling
    if y is None:
        return freq_extra
    freq_inter = freq_extra / y.factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp, as the official code does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate by `factor`
    return freq_inter * (1 - keep) + freq_extra * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Scale on cos/sin; equals 1.0 whenever mscale == mscale_all_dim (all official configs)."""
    y = cfg.rope_scaling
    if y is None:
        return 1.0
    return yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)


class Rotary:
    """cos/sin for arbitrary positions. inv_freq is a plain fp32 tensor, not a module buffer: casting the
    model to bf16 must not round it (transformers' buffers do get rounded by .to(bfloat16))."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(cfg)
        self.factor = rope_attention_factor(cfg)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) int -> cos, sin of shape (..., T, dim/2), fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.cos(angles) * self.factor, torch.sin(angles) * self.factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., T, [heads,] dim) in fp32; cos/sin broadcast as (..., T, 1?, dim/2).

    The output keeps the interleaved layout, like DeepSeek's own inference code and transformers; the
    remote code's de-interleaved layout differs only by a fixed permutation shared by q and k.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (..., dim/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
