"""Inference-only weight forms (dsv2.kernels.prepare): the absorbed decode's blocks attend like the weight's own
views, the fp32 router scores the same bits, and the engine applies them only to a model it owns."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize_, small_config
from dsv2.checkpoint import save
from dsv2.infer import LLM, SamplingParams
from dsv2.kernels import native, prepare, quant
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


# the absorbed blocks' products need whole blocks of 32 in K (qk_nope_head_dim and kv_lora_rank)
INT8_BLOCKS = dict(qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=64)


@pytest.mark.skipif(not native.available(), reason="dsv2's kernels are not built here")
def test_int8_blocks_attend_like_the_fp32_blocks(tmp_path) -> None:
    """A quantized model's engine holds the absorbed blocks in int8 (quant.Int8KVUp): their products equal the
    bmm of the quantized activations and the dequantized blocks, which stay within int8's error of the weight's
    own; the engine plans their bytes."""
    cfg = small_config(**INT8_BLOCKS)
    model = randomize_(Transformer(cfg), seed=5, std=0.1).eval()
    attn = model.layers[0].attn
    fp32, int8 = prepare.PreparedKVUp(attn.wkv_b), quant.Int8KVUp(attn.wkv_b)
    for a, b in zip(fp32.blocks(), int8.blocks()):
        assert a.shape == b.shape and ((a - b).norm() / a.norm()).item() < 0.01
    g = torch.Generator().manual_seed(1)
    for rows in (1, 7, 40):
        q = torch.randn(attn.n_heads, rows, attn.nope_dim, generator=g)
        o = torch.randn(attn.n_heads, rows, attn.kv_rank, generator=g)
        w_uk, w_uv_t = int8.blocks()
        torch.testing.assert_close(int8.absorb_query(q), torch.bmm(native.q8_activations(q), w_uk),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(int8.absorb_output(o), torch.bmm(native.q8_activations(o), w_uv_t),
                                   rtol=1e-5, atol=1e-5)
    before = _attend(model, torch.float32)
    attn.wkv_b = int8
    after = _attend(model, torch.float32)
    assert ((after - before).norm() / before.norm()).item() < 0.02
    save(randomize_(Transformer(cfg), seed=6, std=0.05), tmp_path)
    llm = LLM(tmp_path, quantization="int8", max_cache_tokens=128)
    assert all(type(b.attn.wkv_b) is quant.Int8KVUp for b in llm.model.layers)
    assert prepare.planned_bytes(cfg, llm.dtype, quant.Int8KVUp) - prepare.planned_bytes(cfg, llm.dtype) == \
        sum(b.attn.wkv_b.block_bytes for b in llm.model.layers) - 4 * sum(
            b.attn.wkv_b.weight.numel() for b in llm.model.layers)
    dense = LLM(tmp_path, max_cache_tokens=128)  # unquantized weights keep the fp32 blocks
    assert all(type(b.attn.wkv_b) is prepare.PreparedKVUp for b in dense.model.layers)
    params = SamplingParams(max_tokens=5, temperature=0)
    assert len(llm.generate([[3, 4, 5, 6]], params)[0].outputs[0].token_ids) == 5
