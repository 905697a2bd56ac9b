"""Inference-only weight forms (dsv2.kernels.prepare): the absorbed decode's blocks attend like the weight's own
views, the fp32 router scores the same bits, and the engine applies them only to a model it owns."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize_, small_config
from dsv2.checkpoint import save
from dsv2.infer import LLM, SamplingParams
from dsv2.kernels import prepare
from dsv2.model import Transformer
from dsv2.model.mla import KVUp


def _attend(model: Transformer, dtype: torch.dtype) -> torch.Tensor:
    attn = model.layers[0].attn
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(2, 3, attn.n_heads, attn.nope_dim, generator=g).to(dtype)
    q_pe = torch.randn(2, 3, attn.n_heads, attn.rope_dim, generator=g).to(dtype)
    latent = torch.randn(2, 7, attn.kv_rank + attn.rope_dim, generator=g).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.bool).tril(4)
    with torch.no_grad():
        return attn.attend_absorbed(q_nope, q_pe, latent, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_blocks_attend_like_the_weights_views(dtype: torch.dtype) -> None:
    model = randomize_(Transformer(small_config()), seed=3, std=0.1).to(dtype).eval()
    keys = set(model.state_dict())
    before = _attend(model, dtype)
    router = next(b.ffn.gate for b in model.layers if hasattr(b.ffn, "gate"))
    x = torch.randn(5, model.cfg.hidden_size).to(dtype)
    with torch.no_grad():
        routing = router(x)
    reference = _attend(model.float(), torch.float32).to(dtype)  # the views in fp32: what the blocks compute
    model.to(dtype)
    added = prepare.prepare_(model)
    cfg = model.cfg
    assert added == prepare.planned_bytes(cfg, dtype) > 0
    assert all(isinstance(b.attn.wkv_b, prepare.PreparedKVUp) for b in model.layers)
    routers = [b.ffn.gate for b in model.layers if hasattr(b.ffn, "gate")]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)
    with torch.no_grad():
        again = router(x)
    assert torch.equal(again.indices, routing.indices) and torch.equal(again.weights, routing.weights)
    assert set(model.state_dict()) == keys  # the blocks are not checkpoint tensors
    after = _attend(model, dtype)
    assert after.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    else:  # bf16 weights, products in fp32: the fp32 result rounded once
        torch.testing.assert_close(after, reference, rtol=1e-2, atol=1e-2)
        assert (after.float() - reference.float()).abs().max() <= (before.float() - reference.float()).abs().max()


def test_engine_prepares_only_a_model_it_owns(tmp_path) -> None:
    model = randomize_(Transformer(small_config()), seed=4, std=0.05).eval()
    save(model, tmp_path)
    params = SamplingParams(max_tokens=5, temperature=0)
    owned = LLM(tmp_path, max_cache_tokens=128)
    lent = LLM(model, max_cache_tokens=128)  # a model passed in may go on training: its wkv_b stays as it was
    assert isinstance(owned.model.layers[0].attn.wkv_b, prepare.PreparedKVUp)
    assert type(lent.model.layers[0].attn.wkv_b) is KVUp
    prompt = [3, 4, 5, 6]
    assert owned.generate([prompt], params)[0].outputs[0].token_ids == \
        lent.generate([prompt], params)[0].outputs[0].token_ids
