"""Weight-only int8 / int4: the formats against their definitions, each fast path against its dequantize +
F.linear reference, quantize-as-it-loads against quantizing a loaded model, quantized checkpoints, and the
engine's memory accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import randomize_, small_config
from dsv2 import cli
from dsv2.checkpoint import CheckpointError, load, planned_weight_bytes, quantize_checkpoint, save
from dsv2.infer import LLM, SamplingParams
from dsv2.kernels import native, prepare, quant
from dsv2.kernels.quant import Scheme
from dsv2.model import Transformer
from dsv2.model.mla import KVUp
from dsv2.model.moe import MoE, Routing

SCHEMES = [Scheme("int8"), Scheme("int4", 32), Scheme("int4", 64, symmetric=False), Scheme("int4", 128)]
# hidden 128 and expert width 64: int4's kernel shapes (N % 16, K % group) hold for every matrix
CFG = small_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, q_lora_rank=64,
                   kv_lora_rank=64, vocab_size=512)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_formats_follow_their_definition(scheme: Scheme) -> None:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    qt = quant.quantize(w, scheme)
    back = quant.dequantize(qt, scheme)
    if scheme.method == "int8":
        assert qt.weight.dtype == torch.int8 and qt.weight.abs().max() <= 127
        # each value within half a step of its row's scale; the row's largest magnitude exact
        assert ((back - w).abs() <= qt.scale[:, None] / 2 + 1e-6).all()
        assert torch.allclose(back.abs().amax(1), w.abs().amax(1))
        assert _rel(back, w) < 0.01
    else:
        assert qt.weight.dtype == torch.uint8 and qt.weight.shape == (96, 128)
        values = quant.unpack_int4(qt.weight)
        assert values.max() <= 15 and torch.equal(values[:, 0::2], qt.weight & 15)
        groups_w = w.view(96, -1, scheme.group_size)
        groups_back = back.view(96, -1, scheme.group_size)
        if scheme.symmetric:  # Q4_0's rule: the largest magnitude is represented exactly (as -8 * scale)
            i = groups_w.abs().argmax(-1, keepdim=True)
            assert torch.allclose(groups_back.gather(-1, i), groups_w.gather(-1, i), atol=1e-6)
        else:  # both ends of every group exact
            assert torch.allclose(groups_back.amin(-1), groups_w.amin(-1), atol=1e-5)
            assert torch.allclose(groups_back.amax(-1), groups_w.amax(-1), atol=1e-5)
        assert _rel(back, w) < {32: 0.11, 64: 0.12, 128: 0.13}[scheme.group_size]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, quant.KERNEL_MAX_ROWS, 40])
def test_fast_products_match_dequantized_reference(scheme: Scheme, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(128, 256, generator=g) * 0.05
    qt = quant.quantize(w, scheme)
    weight = quant.runtime_weights(qt, scheme)
    # the runtime form holds its scales in bf16, as the kernels take them; the reference does the same
    reference_w = quant.dequantize(quant.QuantizedTensor(qt.weight, qt.scale.bfloat16().float(),
                                                         None if qt.zero is None else qt.zero.bfloat16().float()),
                                   scheme)
    assert torch.allclose(weight.dequantize(), reference_w, atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, 256, generator=g).to(dtype)
        y = weight.mm(x)
        assert y.dtype == dtype and y.shape == (rows, 128)
        ref = F.linear(x.bfloat16().float(), reference_w)  # the kernels read bf16 activations
        assert _rel(y, ref) < 0.01


@pytest.mark.parametrize("stack", [(), (3,)])
def test_int4_packing_is_torchs(stack: tuple[int, ...]) -> None:
    # int4_layout writes torch's CPU packing itself where a probe says it knows it (else it calls torch's
    # converter): either way the bytes must be what torch's own converter produces for every matrix
    qt = quant.quantize(torch.randn(*stack, 128, 256, generator=torch.Generator().manual_seed(5)), Scheme("int4"))
    packed, _ = quant.int4_layout(qt)
    values = quant.unpack_int4(qt.weight).to(torch.int32).reshape(-1, 128, 256)
    expected = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(m, 1) for m in values])
    assert torch.equal(packed.reshape(expected.shape), expected)


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 32)], ids=str)
def test_quantized_experts_match_their_loop_reference(scheme: Scheme) -> None:
    moe = randomize_(MoE(CFG), seed=3).eval()
    quant.quantize_(moe, scheme)
    assert isinstance(moe.experts, quant.QuantExperts)
    for n_tokens in (1, 2, 30):  # one native call per layer where built (<= 16 tokens), else the grouped path
        x = torch.randn(n_tokens, CFG.hidden_size, generator=torch.Generator().manual_seed(n_tokens))
        with torch.no_grad():
            routing = moe.gate(x)
            fast, ref = moe.experts(x, routing), moe.experts.forward_loop(x, routing)
        assert _rel(fast, ref) < 1e-5


@pytest.mark.skipif(not native.available(), reason="dsv2's kernels are not built here")
def test_larger_decode_steps_take_the_one_call_unless_an_expert_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past native.MAX_ROWS tokens the one native call still runs while no expert has more than MAX_ROWS of
    them (up to FUSED_MAX_TOKENS); a busier expert sends the step to the expert-by-expert path. Both match the
    loop reference."""
    moe = randomize_(MoE(CFG), seed=4).eval()
    quant.quantize_(moe, Scheme("int8"))
    calls = []
    real = native.experts
    monkeypatch.setattr(native, "experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    t, k, e = 40, CFG.num_experts_per_tok, CFG.n_routed_experts
    spread = (torch.arange(t)[:, None] + torch.arange(k)[None]) % e  # every expert chosen t * k / e = 15 times
    busy = spread.clone()
    busy[:, 0] = 0  # expert 0 chosen by all 40 tokens
    x = torch.randn(t, CFG.hidden_size, generator=torch.Generator().manual_seed(9))
    weights = torch.rand(t, k, generator=torch.Generator().manual_seed(10))
    for indices, fused in ((spread, True), (busy, False)):
        assert t * k // e <= native.MAX_ROWS < t <= quant.FUSED_MAX_TOKENS
        routing = Routing(weights, indices, torch.empty(0))
        calls.clear()
        with torch.no_grad():
            fast, ref = moe.experts(x, routing), moe.experts.forward_loop(x, routing)
        assert bool(calls) == fused and _rel(fast, ref) < 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer]:
    model = randomize_(Transformer(CFG), seed=1, std=0.05).eval()
    path = tmp_path_factory.mktemp("ckpt")
    save(model, path, max_shard_size="300KB")  # many shards: parameters straddle files
    return path, model


def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantize_as_it_loads_equals_quantizing_the_loaded_model(checkpoint: tuple[Path, Transformer],
                                                                 scheme: Scheme) -> None:
    path, dense = checkpoint
    streamed = load(path, quantization=scheme)
    after = quant.quantize_(load(path), scheme)
    assert torch.equal(_logits(streamed, IDS), _logits(after, IDS))
    head = scheme if scheme.method == "int8" else Scheme("int8")
    assert isinstance(streamed.head.qweight, quant.Int8Weight) and quant.targets(dense, scheme)["head"] == head
    assert type(streamed.layers[0].attn.wkv_b) is KVUp  # dense: read per head by the absorbed decode
    ref = _logits(dense, IDS)
    # random weights amplify rounding layer after layer; a loose sanity bound (measured: 2.5% int8, 22-26% int4)
    assert _rel(_logits(streamed, IDS), ref) < (0.05 if scheme.method == "int8" else 0.4)


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 64, symmetric=False)], ids=str)
def test_quantized_checkpoint_loads_without_the_original(checkpoint: tuple[Path, Transformer], scheme: Scheme,
                                                         tmp_path: Path) -> None:
    path, _ = checkpoint
    out = tmp_path / "q"
    quantize_checkpoint(path, out, scheme, max_shard_size="200KB")
    config = json.loads((out / "config.json").read_text())
    assert Scheme.from_config(config["quantization_config"]) == scheme
    loaded = load(out)
    assert torch.equal(_logits(loaded, IDS), _logits(load(path, quantization=scheme), IDS))
    with pytest.raises(CheckpointError, match="cannot be requantized"):
        load(out, quantization="int4" if scheme.method == "int8" else "int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", scheme)


def test_quantized_checkpoint_with_a_missing_scale_is_refused(checkpoint: tuple[Path, Transformer],
                                                              tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    quantize_checkpoint(checkpoint[0], out, "int8", max_shard_size="100MB")
    (shard,) = out.glob("model-*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="o_proj.weight_scale"):
        load(out)


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_planned_bytes_are_the_loaded_bytes(checkpoint: tuple[Path, Transformer], quantization: str | None
                                            ) -> None:
    path, _ = checkpoint
    need, peak, _ = planned_weight_bytes(path, None, quantization)
    model = load(path, quantization=quantization)
    assert need == quant.model_weight_bytes(model)
    assert peak > need if quantization else peak == need


def test_engine_generates_on_quantized_weights_and_refuses_what_cannot_fit(
        checkpoint: tuple[Path, Transformer], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = checkpoint
    params = SamplingParams(max_tokens=6, temperature=0)
    llm = LLM(path, quantization="int8", max_cache_tokens=256)
    reference = LLM(quant.quantize_(load(path), "int8"), max_cache_tokens=256)
    prompt = [5, 6, 7, 8]
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == \
        reference.generate([prompt], params)[0].outputs[0].token_ids
    # the weights as loaded, and the absorbed decode's fp32 blocks that the engine adds on a CPU
    assert llm.weight_bytes == planned_weight_bytes(path, None, "int8")[0] + \
        prepare.planned_bytes(llm.cfg, llm.dtype, quant.kv_up_form(llm.cfg, True))
    with pytest.raises(ValueError, match="compile=True is not supported with quantized"):
        LLM(path, quantization="int8", compile=True, max_cache_tokens=256)
    need = planned_weight_bytes(path)[0]
    monkeypatch.setattr("dsv2.infer.engine.available_memory", lambda device: need // 2)
    with pytest.raises(ValueError, match=r"GiB available; try --quantization int8"):
        LLM(path, max_cache_tokens=256)


def test_quantize_command(checkpoint: tuple[Path, Transformer], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = checkpoint
    assert cli.main(["quantize", str(path), str(tmp_path / "q"), "--method", "int4", "--group-size", "32"]) == 0
    assert Scheme.from_config(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]) \
        == Scheme("int4", 32)
    assert cli.main(["quantize", str(path), str(tmp_path / "r"), "--method", "int8", "--asymmetric"]) == 2
    assert "int4 only" in capsys.readouterr().err
