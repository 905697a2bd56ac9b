"""Inference-only forms of the dense weights a CPU decode step reads: the absorbed attention's per-head blocks
of wkv_b, contiguous in fp32, and the router's weight in fp32. The engine applies them to a model it owns.

The absorbed blocks:
`KVUp.blocks` returns views of the checkpoint's (nh * (dn + dv), dc) weight: W_UK with a batch stride twice its
size and W_UV transposed. torch's CPU bmm copies such operands to contiguous ones on every call, and in bf16 is
slow even without the copy: on V2-Lite the two products cost ~4.8 ms per layer and step (an ad hoc torch.profiler
run of int4 decode: ~130 ms of a ~300 ms token), against ~0.16 ms from contiguous fp32 blocks (an ad hoc timing of
the two bmms). The blocks are fp32 copies of 57M parameters (0.4% of V2-Lite's; 0.21 GiB); the weight itself
stays for the naive (prefill) path.

The router: it scores in fp32 (as the reference does), so a bf16 router weight was cast to fp32 on every call:
26 copies of 64 x 2048 per V2-Lite token (~4.5 ms in the same profile). Held in fp32 once, the cast is a no-op and the scores are
the same bits.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.mla import KVUp
from dsv2.model.moe import Router


class PreparedKVUp(KVUp):
    """A KVUp whose blocks are fixed contiguous fp32 copies: inference-only (the weight must not change). Other
    forms of the blocks (dsv2.kernels.quant.Int8KVUp) subclass it: each holds its blocks as non-persistent
    buffers (so .to() moves them and the state_dict stays the checkpoint's) and plans their bytes."""

    def __init__(self, src: KVUp) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = src.in_features, src.out_features
        self.n_heads, self.nope_dim, self.v_dim = src.n_heads, src.nope_dim, src.v_dim
        self.weight = src.weight
        self.register_parameter("bias", None)
        with torch.no_grad():
            self._hold(*KVUp.blocks(src))

    def _hold(self, w_uk: torch.Tensor, w_uv_t: torch.Tensor) -> None:
        """Keep the blocks W_UK (nh, dn, dc) and W_UV^T (nh, dc, dv) in this form."""
        self.register_buffer("w_uk", w_uk.float().contiguous(), persistent=False)
        self.register_buffer("w_uv_t", w_uv_t.float().contiguous(), persistent=False)

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_uk, self.w_uv_t

    @property
    def block_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers(recurse=False))

    @staticmethod
    def planned_block_bytes(cfg: ModelConfig) -> int:
        """block_bytes summed over a model of this config."""
        return 4 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
            * cfg.kv_lora_rank


def planned_bytes(cfg: ModelConfig, dtype: torch.dtype, form: type[PreparedKVUp] = PreparedKVUp) -> int:
    """What prepare_ adds to a model of this config whose weights are in dtype."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return form.planned_block_bytes(cfg) + moe_layers * cfg.n_routed_experts * cfg.hidden_size * (4 - dtype.itemsize)


def prepare_(model: nn.Module, form: type[PreparedKVUp] = PreparedKVUp) -> int:
    """Swap every KVUp of a model for the form (a PreparedKVUp by default) and put its routers in fp32, in place;
    the bytes added."""
    total = 0
    for name, m in list(model.named_modules()):
        if type(m) is KVUp:
            parent, _, child = name.rpartition(".")
            prepared = form(m)
            setattr(model.get_submodule(parent), child, prepared)
            total += prepared.block_bytes
        elif isinstance(m, Router) and m.weight.dtype != torch.float32:
            total += m.weight.numel() * (4 - m.weight.element_size())
            m.weight.data = m.weight.data.float()
    return total
