"""The paged latent cache: per layer one (num_blocks, block_size, kv_lora_rank + qk_rope_head_dim) tensor.

Each token's entry is [RMSNorm(c_kv) | RoPE(k_pe)], 576 values for the official configs, shared by all
heads. Storage is the model dtype, or fp8 e4m3 with one fp32 scale per token for each of the two parts
(the normed latent and the rotated key differ in range), dequantized when read.
"""

from __future__ import annotations

import os

import torch

from dsv2.config import ModelConfig

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.kv_rank, self.width = cfg.kv_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.fp8 = dtype == FP8
        shape = (num_blocks * block_size, self.width)  # flat slots; a block is block_size consecutive slots
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.scales = ([torch.ones(num_blocks * block_size, 2, device=device) for _ in self.layers]
                       if self.fp8 else None)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        scales = 2 * 4 if dtype == FP8 else 0
        return cfg.num_hidden_layers * ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize + scales)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """latent (N, width) into flat slots (N,)."""
        if not self.fp8:
            self.layers[layer][slots] = latent.to(self.dtype)
            return
        parts = (latent[:, : self.kv_rank].float(), latent[:, self.kv_rank :].float())
        scales = torch.stack([p.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX for p in parts], dim=-1)  # (N, 2)
        self.layers[layer][slots] = torch.cat([parts[0] / scales[:, :1], parts[1] / scales[:, 1:]], -1).to(FP8)
        self.scales[layer][slots] = scales

    def slots_of(self, block_tables: torch.Tensor) -> torch.Tensor:
        """block_tables (B, max_blocks) -> the flat slots (B, max_blocks * block_size) they cover, in order."""
        B, nb = block_tables.shape
        return (block_tables[:, :, None] * self.block_size
                + torch.arange(self.block_size, device=block_tables.device)).reshape(B, nb * self.block_size)

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """slots (B, S) from slots_of -> latents (B, S, width) in `dtype`."""
        flat = slots.flatten()  # index_select on flat rows: a leaner kernel than advanced indexing with (B, S)
        latent = self.layers[layer].index_select(0, flat).view(*slots.shape, self.width)
        if not self.fp8:
            return latent if latent.dtype == dtype else latent.to(dtype)
        scale = self.scales[layer].index_select(0, flat).view(*slots.shape, 2)  # (B, S, 2)
        c, pe = latent[..., : self.kv_rank].float(), latent[..., self.kv_rank :].float()
        return torch.cat([c * scale[..., :1], pe * scale[..., 1:]], dim=-1).to(dtype)


def available_memory(device: torch.device) -> int:
    """Bytes free for the cache now: the CUDA allocator's view on a GPU, MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
