"""dsv2.gguf: llama.cpp GGUF files of DeepSeek-V2 -> HF config, tensors and tokenizer.

The GGUF files are written by tests/gguf_writer.py, an independent transcription of llama.cpp's converter;
test_layout_facts_of_llama_cpp checks that writer against the converter's and the loader's own statements.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs llama.cpp's gguf package (pip install gguf)")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from dsv2 import checkpoint  # noqa: E402
from dsv2.config import ModelConfig, YarnScaling  # noqa: E402
from dsv2.gguf import GGUFError, _PRE_REGEXES, is_gguf, iter_tensors, read_config, write_tokenizer  # noqa: E402
from dsv2.model import Transformer  # noqa: E402
from dsv2.tokenizer import Tokenizer as DsTokenizer  # noqa: E402
from dsv2.tokenizer import BOS_TOKEN, EOS_TOKEN, named_tokenizer_dir, train_bpe  # noqa: E402
from tests.conftest import YARN_0707, randomize_, small_config  # noqa: E402
from tests.gguf_writer import (  # noqa: E402
    relative_error, tokenizer_metadata, write_deepseek2_gguf, write_tokenizer_only,
)

# hidden 256 so most rows fit K-quant super-blocks; the 32-wide latent rows exercise llama-quantize's fallbacks
V2_LIKE = small_config(  # q compression, group-limited routing, normalized top-k, scaled experts
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
    topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
)
LITE_LIKE = small_config(  # V2-Lite's shape: plain q_proj, greedy routing
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
    q_lora_rank=None, rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=320,
                                               mscale=1.0, mscale_all_dim=1.0), rms_norm_eps=1e-5,
)
SEEDS = {"v2": 3, "lite": 4}
# what a GGUF does not carry: training-only knobs and the dtype of the original safetensors
NOT_IN_GGUF = {"torch_dtype", "aux_loss_alpha", "seq_aux", "initializer_range", "ep_size", "pad_token_id",
               "attention_dropout", "extra"}

# measured relative errors (per tensor, over weights ~ N(0, 0.15)): BF16 0.0017, Q8_0 0.0054, Q6_K 0.019,
# Q5_1 0.038, Q5_K 0.038, Q5_0 0.043, Q4_K 0.078, Q4_0 0.087 -- bounds a little above those
ERROR_BOUND = {Q.F16: 0.001, Q.BF16: 0.003, Q.Q8_0: 0.008, Q.Q6_K: 0.025, Q.Q5_1: 0.05, Q.Q5_K: 0.05, Q.Q5_0: 0.055,
               Q.Q4_K: 0.095, Q.Q4_0: 0.105}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelConfig, dict[str, torch.Tensor]]]:
    """Random models saved by dsv2 in the official layout, read back as HF-named state dicts."""
    out = {}
    for name, cfg in (("v2", V2_LIKE), ("lite", LITE_LIKE)):
        root = tmp_path_factory.mktemp(name)
        checkpoint.save(randomize_(Transformer(cfg), seed=SEEDS[name]), root)
        out[name] = (cfg, load_file(root / "model.safetensors"))
    return out


def _write(path: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], **kw: Any) -> Path:  # noqa: ANN401
    write_deepseek2_gguf(path, sd, cfg.to_hf(), **kw)
    return path


def _core(cfg: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_GGUF}


# ---------------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("name, mla", [("v2", True), ("lite", False), ("lite", True)])
def test_f32_round_trip_is_exact(models: dict, tmp_path: Path, name: str, mla: bool) -> None:
    cfg, sd = models[name]
    path = _write(tmp_path / "m.gguf", cfg, sd, mla=mla, tokenizer=_first_512_v2_tokens())
    assert is_gguf(path)
    got = dict(iter_tensors(path))
    assert set(got) == set(sd)
    for key, want in sd.items():
        assert got[key].shape == want.shape, key
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], want), key
    hf = read_config(path)
    back = ModelConfig.from_hf(hf)
    assert _core(back) == _core(cfg)
    assert hf["architectures"] == ["DeepseekV2ForCausalLM"] and hf["model_type"] == "deepseek_v2"
    assert hf["num_key_value_heads"] == cfg.num_attention_heads
    assert hf["torch_dtype"] == "bfloat16" and hf["tie_word_embeddings"] is False and hf["moe_layer_freq"] == 1
    # float32 metadata comes back as the decimals of the original config, not float32 noise
    assert hf["rms_norm_eps"] == cfg.rms_norm_eps
    assert hf["rope_scaling"]["mscale_all_dim"] == cfg.rope_scaling.mscale_all_dim
    assert hf["rope_scaling"]["mscale"] == cfg.rope_scaling.mscale


def test_bfloat16_output_and_views(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["v2"]
    path = _write(tmp_path / "m.gguf", cfg, sd, qtype=Q.BF16)
    got = dict(iter_tensors(path, dtype=torch.bfloat16))
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    # a BF16 file read as bfloat16 is the original rounded to bfloat16, exactly
    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    assert torch.equal(got[key], sd[key].to(torch.bfloat16))


def test_layout_facts_of_llama_cpp(models: dict, tmp_path: Path) -> None:
    """The writer against llama.cpp itself: metadata from DeepseekV2Model.set_gguf_parameters, shapes from the
    loader's create_tensor calls (src/models/deepseek2.cpp), kv_b split from DeepseekV2Model.modify_tensors."""
    cfg, sd = models["v2"]
    H, nh, E, M = cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts, cfg.moe_intermediate_size
    nope, rope, vd, kv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    reader = gguf.GGUFReader(_write(tmp_path / "mla.gguf", cfg, sd))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "deepseek2"
    # "deepseek2 using MLA converts into MQA (ie: GQA with 1 group)"
    assert meta["deepseek2.attention.head_count_kv"] == 1
    # add_key_length(kv_lora_rank + qk_rope_head_dim), add_value_length(kv_lora_rank)
    assert meta["deepseek2.attention.key_length"] == kv + rope
    assert meta["deepseek2.attention.value_length"] == kv
    assert meta["deepseek2.attention.key_length_mla"] == nope + rope
    assert meta["deepseek2.attention.value_length_mla"] == vd
    # add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)
    assert meta["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * 0.707, rel=1e-6)
    assert meta["deepseek2.expert_weights_scale"] == 2.5
    assert meta["deepseek2.leading_dense_block_count"] == 1
    tensors = {t.name: t for t in reader.tensors}
    ne = {name: [int(d) for d in t.shape] for name, t in tensors.items()}
    assert ne["token_embd.weight"] == [H, cfg.vocab_size]
    assert ne["blk.0.attn_kv_a_mqa.weight"] == [H, kv + rope]
    assert ne["blk.0.attn_k_b.weight"] == [nope, kv, nh]  # {n_embd_head_qk_nope, kv_lora_rank, n_head}
    assert ne["blk.0.attn_v_b.weight"] == [kv, vd, nh]  # {kv_lora_rank, n_embd_head_v_mla, n_head}
    assert ne["blk.1.ffn_gate_exps.weight"] == [H, M, E]  # {n_embd, n_ff_exp, n_expert}
    assert ne["blk.1.ffn_down_exps.weight"] == [M, H, E]  # {n_ff_exp, n_embd, n_expert}
    assert ne["blk.1.ffn_gate_inp.weight"] == [H, E]
    assert "blk.0.attn_kv_b.weight" not in tensors and "output.weight" in tensors
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == Q.F32
    # element by element: attn_k_b[h, c, j] = kv_b[h * (nope + v) + j, c]; attn_v_b[h, j, c] = kv_b[.. + nope + j, c]
    kv_b = sd["model.layers.0.self_attn.kv_b_proj.weight"].numpy()
    k_b, v_b = tensors["blk.0.attn_k_b.weight"].data, tensors["blk.0.attn_v_b.weight"].data
    assert k_b.shape == (nh, kv, nope) and v_b.shape == (nh, vd, kv)  # numpy order: ne reversed
    for h, c, j in ((0, 0, 0), (1, 5, 3), (nh - 1, kv - 1, nope - 1)):
        assert k_b[h, c, j] == kv_b[h * (nope + vd) + j, c]
    for h, j, c in ((0, 0, 0), (2, 7, 9), (nh - 1, vd - 1, kv - 1)):
        assert v_b[h, j, c] == kv_b[h * (nope + vd) + nope + j, c]
    # expert e of the stacked tensor is mlp.experts.e
    up_exps = tensors["blk.1.ffn_up_exps.weight"].data
    assert np.array_equal(up_exps[5], sd["model.layers.1.mlp.experts.5.up_proj.weight"])
    # the pre-MLA layout keeps kv_b_proj whole: {kv_lora_rank, n_head * (qk_nope + v_head)}
    legacy = gguf.GGUFReader(_write(tmp_path / "legacy.gguf", cfg, sd, mla=False))
    t = next(t for t in legacy.tensors if t.name == "blk.0.attn_kv_b.weight")
    assert [int(d) for d in t.shape] == [kv, nh * (nope + vd)]
    assert legacy.fields["deepseek2.attention.head_count_kv"].contents() == nh
    assert "deepseek2.attention.key_length_mla" not in legacy.fields


# ---------------------------------------------------------------------------------------------- quantized
def _to_checkpoint(path: Path, out: Path) -> Path:
    out.mkdir()
    save_file({k: v.clone() for k, v in iter_tensors(path)}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(read_config(path)))
    return out


def _logits(model: Transformer) -> torch.Tensor:
    ids = torch.tensor([[3, 17, 99, 250, 7, 7, 480, 1, 64, 128, 300, 2]])
    with torch.no_grad():
        return model(ids).float()


def _stored_types(key: str, types: dict[str, Q], n_layers: int) -> list[Q]:
    """The GGUF type(s) an HF tensor was written with (kv_b_proj: its two halves)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layers)
    key = re.sub(r"\.experts\.\d+\.", ".experts.", key)
    keys = [key.replace("kv_b_proj", "k_b_proj"), key.replace("kv_b_proj", "v_b_proj")] if "kv_b_proj" in key else [key]
    return [types[name_map.get_name(k, try_suffixes=(".weight",))] for k in keys]


MEASURED: dict[Q, float] = {}  # worst relative error per stored type, over the parametrized runs
# The random test model amplifies weight noise about 6x into its logits, and a Gaussian perturbation of the same
# per-tensor size does the same; measured logits errors: Q8_0 0.036, Q6_K 0.12, Q5_K 0.20, Q4_K 0.39, Q4_0 0.47.
LOGITS_BOUND = {Q.Q8_0: 0.06, Q.Q6_K: 0.18, Q.Q5_K: 0.3, Q.Q4_K: 0.55, Q.Q4_0: 0.65}


def _noisy(sd: dict[str, torch.Tensor], errors: dict[str, float], cfg: ModelConfig, out: Path) -> Path:
    """The original checkpoint with Gaussian noise of each tensor's measured quantization error."""
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + torch.randn(v.shape, generator=g) * (v.norm() / v.numel() ** 0.5) * errors.get(k, 0.0)
             for k, v in sd.items()}
    out.mkdir()
    save_file(noisy, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    return out


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_quantized_values_and_logits(models: dict, tmp_path: Path, qtype: Q) -> None:
    cfg, sd = models["v2"]
    path = tmp_path / "m.gguf"
    types = write_deepseek2_gguf(path, sd, cfg.to_hf(), qtype=qtype)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        assert types["blk.1.ffn_gate_exps.weight"] == qtype  # rows of 256
        assert types["blk.0.attn_k_b.weight"] != qtype  # rows of 16: llama-quantize's fallback type
    got = dict(iter_tensors(path))
    errors = {}
    for key, want in sd.items():
        stored = _stored_types(key, types, cfg.num_hidden_layers)
        errors[key] = err = relative_error(got[key], want)
        if stored == [Q.F32]:
            assert err == 0.0, key  # norms and the router stay F32
            continue
        worst = max(stored, key=ERROR_BOUND.__getitem__)
        MEASURED[worst] = max(MEASURED.get(worst, 0.0), err)
        assert 0.0 < err < ERROR_BOUND[worst], (key, worst.name, err)
    print("worst relative error per type:", {q.name: round(e, 4) for q, e in sorted(MEASURED.items())})
    reference = _logits(randomize_(Transformer(cfg), seed=SEEDS["v2"]).eval())
    quantized = _logits(checkpoint.load(_to_checkpoint(path, tmp_path / "ckpt"), dtype=torch.float32))
    noisy = _logits(checkpoint.load(_noisy(sd, errors, cfg, tmp_path / "noisy"), dtype=torch.float32))
    rel, rel_noise = relative_error(quantized, reference), relative_error(noisy, reference)
    print(f"{qtype.name}: logits relative error {rel:.4f} (same-size Gaussian noise: {rel_noise:.4f})")
    assert rel < LOGITS_BOUND[qtype] and rel < 2 * rel_noise, (rel, rel_noise)


# ---------------------------------------------------------------------------------------------- errors
def test_unsupported_type_names_tensor_and_type(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["v2"]
    sd = dict(sd)
    del sd["model.layers.0.self_attn.o_proj.weight"]  # [256, 64]: IQ4_NL blocks are 32 values in 18 bytes
    raw = np.random.default_rng(0).integers(0, 256, size=(cfg.hidden_size, 64 // 32 * 18), dtype=np.uint8)
    path = _write(tmp_path / "m.gguf", cfg, sd, extra_tensors={"blk.0.attn_output.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_output\.weight.*IQ4_NL.*readable types: F32.*Q6_K"):
        next(iter_tensors(path))


def test_not_a_deepseek2_gguf(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["v2"]
    path = _write(tmp_path / "llama.gguf", cfg, sd, arch="llama")
    for fn in (read_config, lambda p: next(iter_tensors(p))):
        with pytest.raises(GGUFError, match=r"llama\.gguf: architecture 'llama', not 'deepseek2'"):
            fn(path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 64)
    assert not is_gguf(other) and not is_gguf(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_config(other)


@pytest.mark.parametrize("keep", [0.6, 0.002])  # in the tensor data; in the metadata
def test_truncated_file(models: dict, tmp_path: Path, keep: float) -> None:
    cfg, sd = models["lite"]
    data = _write(tmp_path / "m.gguf", cfg, sd).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf: corrupt or truncated GGUF file"):
        list(iter_tensors(cut))


def test_v3_router_bias_is_refused(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["v2"]
    sd = {**sd, "model.layers.1.mlp.gate.e_score_correction.bias": torch.zeros(cfg.n_routed_experts)}
    path = _write(tmp_path / "m.gguf", cfg, sd)
    with pytest.raises(GGUFError, match=r"blk\.1\.exp_probs_b\.bias.*DeepSeek-V3"):
        next(iter_tensors(path))


def test_unknown_and_missing_tensors(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["v2"]
    extra = {"blk.0.attn_q.weight": (np.zeros((64, 256), dtype=np.float32), None)}  # q_proj next to q_a_proj
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_q\.weight' has no place"):
        next(iter_tensors(_write(tmp_path / "a.gguf", cfg, sd, extra_tensors=extra)))
    partial = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.shared_experts.up_proj.weight"}
    with pytest.raises(GGUFError, match=r"1 tensors missing.*blk\.1\.ffn_up_shexp\.weight"):
        next(iter_tensors(_write(tmp_path / "b.gguf", cfg, partial)))
    wrong = {"blk.0.attn_output.weight": (np.zeros((cfg.hidden_size, 63), dtype=np.float32), None)}
    partial = {k: v for k, v in sd.items() if k != "model.layers.0.self_attn.o_proj.weight"}
    with pytest.raises(GGUFError, match=r"attn_output\.weight' has shape \(63, 256\).*implies \(64, 256\)"):
        next(iter_tensors(_write(tmp_path / "c.gguf", cfg, partial, extra_tensors=wrong)))


def test_sigmoid_gating_is_refused(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["v2"]
    hf = {**cfg.to_hf(), "scoring_func": "sigmoid"}
    write_deepseek2_gguf(tmp_path / "m.gguf", sd, hf)
    with pytest.raises(GGUFError, match="SIGMOID.*DeepSeek-V3"):
        read_config(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------------------------- variants
def test_tied_embeddings_yield_lm_head_from_token_embd(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["lite"]
    hf = {**cfg.to_hf(), "tie_word_embeddings": True}
    write_deepseek2_gguf(tmp_path / "m.gguf", sd, hf)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    got = dict(iter_tensors(tmp_path / "m.gguf"))
    assert torch.equal(got["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert set(got) == set(sd)


def test_split_gguf(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["lite"]
    _write(tmp_path / "m.gguf", cfg, sd, split_max_tensors=12, tokenizer=_first_512_v2_tokens())
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 2
    got = dict(iter_tensors(shards[0]))
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assert _core(ModelConfig.from_hf(read_config(shards[0]))) == _core(cfg)
    with pytest.raises(GGUFError, match="pass the first shard"):
        read_config(shards[1])
    shards[-1].unlink()
    with pytest.raises(GGUFError, match="does not exist"):
        read_config(shards[0])


# ---------------------------------------------------------------------------------------------- tokenizer
SAMPLES = [
    "Hello, world! DeepSeek-V2 costs $1,234.56 (about 42%).\n\nNew line\r\n\ttab  spaces   ",
    "中文分词测试：深度求索。 日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return x ** 2  # comment ÀÉÎõü ∑ 🙂",
    "<｜begin▁of▁sentence｜>User: 12345678\n\nAssistant:<｜end▁of▁sentence｜>",
]


def _v2_dir() -> Path:
    return named_tokenizer_dir("deepseek-v2")


@functools.lru_cache(maxsize=1)
def _v2_metadata() -> dict[str, Any]:
    config = json.loads((_v2_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    return tokenizer_metadata(_v2_dir() / "tokenizer.json", config, vocab_size=102400)


def _first_512_v2_tokens() -> dict[str, Any]:
    """Enough of V2's vocabulary for a 512-token test model: BOS and EOS are ids 0 and 1 as in small_config."""
    meta = _v2_metadata()
    return {**meta, "tokens": meta["tokens"][:512], "types": meta["types"][:512], "merges": [], "bos": 0, "eos": 1}


def _v2_gguf(tmp_path: Path) -> Path:
    write_tokenizer_only(tmp_path / "tok.gguf", _v2_metadata(), vocab_size=102400)
    return tmp_path / "tok.gguf"


def test_pre_tokenizer_regexes_are_v2s() -> None:
    data = json.loads((_v2_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    splits = [p["pattern"]["Regex"] for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
    assert _PRE_REGEXES["deepseek-llm"][:5] == splits


def test_v2_vocabulary_copies_the_real_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _v2_gguf(tmp_path)
    assert write_tokenizer(path, tmp_path / "copied")
    assert (tmp_path / "copied" / "tokenizer.json").read_bytes() == (_v2_dir() / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "copied" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["bos_token"], config["eos_token"]) == (BOS_TOKEN, EOS_TOKEN)
    # the GGUF says add_bos_token false, as the converter reads V2's post-processor; the copy keeps V2's true
    assert _v2_metadata()["add_bos"] is False
    assert config["add_bos_token"] is True and config["chat_template"].startswith("{% if not add_generation_prompt")
    ours, theirs = DsTokenizer.from_dir(tmp_path / "copied"), DsTokenizer.from_dir(_v2_dir())
    messages = [{"role": "user", "content": SAMPLES[0]}]
    assert ours.encode(SAMPLES[3]) == theirs.encode(SAMPLES[3]) and ours.encode(SAMPLES[3])[0] == 100000
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages)
    # without the package, the tokenizer built from the GGUF with llama.cpp's regexes encodes as V2's own
    monkeypatch.setattr("dsv2.gguf._v2_tokenizer_file", lambda: None)
    assert write_tokenizer(path, tmp_path / "built")
    original = HFTokenizer.from_file(str(_v2_dir() / "tokenizer.json"))
    copied = HFTokenizer.from_file(str(tmp_path / "copied" / "tokenizer.json"))
    built = HFTokenizer.from_file(str(tmp_path / "built" / "tokenizer.json"))
    for text in SAMPLES:
        want = original.encode(text, add_special_tokens=False).ids
        assert copied.encode(text, add_special_tokens=False).ids == want
        assert built.encode(text, add_special_tokens=False).ids == want, text
        assert built.decode(want, skip_special_tokens=False) == original.decode(want, skip_special_tokens=False)


def test_small_vocabulary_builds_a_bpe(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SAMPLES[:3] * 20) + "\nthe quick brown fox jumps over the lazy dog 2024\n" * 20,
                      encoding="utf-8")
    train_bpe([corpus], vocab_size=400, out_dir=tmp_path / "orig", show_progress=False)
    config = json.loads((tmp_path / "orig" / "tokenizer_config.json").read_text(encoding="utf-8"))
    meta = tokenizer_metadata(tmp_path / "orig" / "tokenizer.json", config, vocab_size=512)  # padded, as V2's is
    write_tokenizer_only(tmp_path / "tok.gguf", meta, vocab_size=512)
    assert write_tokenizer(tmp_path / "tok.gguf", tmp_path / "out")
    original = HFTokenizer.from_file(str(tmp_path / "orig" / "tokenizer.json"))
    built = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert built.get_vocab_size() == original.get_vocab_size() < 512
    for text in SAMPLES + ["the quick brown fox 2024"]:
        assert built.encode(text, add_special_tokens=False).ids == original.encode(text, add_special_tokens=False).ids
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS_TOKEN and built.token_to_id(BOS_TOKEN) == 0
    assert config["add_bos_token"] is True  # train_bpe's post-processor adds the BOS
    ours, theirs = DsTokenizer.from_dir(tmp_path / "out"), DsTokenizer.from_dir(tmp_path / "orig")
    assert ours.encode("the fox") == theirs.encode("the fox") and ours.encode("the fox")[0] == 0  # BOS


def test_no_tokenizer_writes_nothing(models: dict, tmp_path: Path) -> None:
    cfg, sd = models["lite"]
    path = _write(tmp_path / "m.gguf", cfg, sd)
    assert write_tokenizer(path, tmp_path / "out") is False
    assert not (tmp_path / "out").exists()
    assert read_config(path)["bos_token_id"] is None


def test_yarn_defaults(models: dict, tmp_path: Path) -> None:
    """The pre-MLA converter wrote no yarn betas: the remote code's 32 / 1 stand in."""
    cfg, sd = models["lite"]
    cfg = cfg.replace(rope_scaling=YARN_0707)
    hf = read_config(_write(tmp_path / "m.gguf", cfg, sd, mla=False))
    assert hf["rope_scaling"] == {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


# ---------------------------------------------------------------------------------------------- real llama.cpp
LLAMA_CPP = os.environ.get("DSV2_LLAMA_CPP")  # a llama.cpp checkout (convert_hf_to_gguf.py at its root)
LLAMA_CPP_PYTHON = os.environ.get("DSV2_LLAMA_CPP_PYTHON")  # a Python with the converter's deps (+ llama_cpp)
_LLAMA_LOGITS = """
import sys, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, logits_all=True, verbose=False, n_threads=1)
ids = [int(i) for i in sys.argv[3].split(",")]
llm.eval(ids)
np.save(sys.argv[2], np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (LLAMA_CPP and LLAMA_CPP_PYTHON),
                    reason="set DSV2_LLAMA_CPP and DSV2_LLAMA_CPP_PYTHON to check against llama.cpp itself")
def test_real_llama_cpp_converter(tmp_path: Path) -> None:
    """llama.cpp's own convert_hf_to_gguf.py on a dsv2 checkpoint: read back exactly, and (with llama_cpp
    installed there) llama.cpp's logits for that file match dsv2's for what iter_tensors and read_config give.

    Greedy routing without norm_topk_prob: llama.cpp scores expert groups as V3 does (sum of the top two, not
    V2's max) and applies routed_scaling_factor after normalizing (V2 applies it only when not normalizing),
    so only there do the two implementations compute the same function."""
    cfg = V2_LIKE.replace(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False)
    hf = tmp_path / "hf"
    checkpoint.save(randomize_(Transformer(cfg), seed=5, std=0.06), hf)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SAMPLES * 20), encoding="utf-8")
    train_bpe([corpus], vocab_size=400, out_dir=hf, show_progress=False)
    path = tmp_path / "llama.gguf"
    subprocess.run([LLAMA_CPP_PYTHON, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), str(hf), "--outfile",
                    str(path), "--outtype", "f32"], check=True, capture_output=True)
    sd = load_file(hf / "model.safetensors")
    got = dict(iter_tensors(path))
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assert _core(ModelConfig.from_hf(read_config(path))) == _core(cfg)
    assert write_tokenizer(path, tmp_path / "tok")
    original, built = (HFTokenizer.from_file(str(d / "tokenizer.json")) for d in (hf, tmp_path / "tok"))
    for text in SAMPLES:
        assert built.encode(text, add_special_tokens=False).ids == original.encode(text, add_special_tokens=False).ids
    has_llama = subprocess.run([LLAMA_CPP_PYTHON, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not has_llama:
        return
    ids = [0, 17, 99, 250, 7, 7, 380, 1, 64, 128, 300, 2, 55, 90, 12, 13]
    subprocess.run([LLAMA_CPP_PYTHON, "-c", _LLAMA_LOGITS, str(path), str(tmp_path / "logits.npy"),
                    ",".join(map(str, ids))], check=True, capture_output=True)
    theirs = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    model = checkpoint.load(_to_checkpoint(path, tmp_path / "ckpt"), dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float()
    print(f"llama.cpp vs dsv2 logits: relative error {relative_error(ours, theirs):.2e}")
    assert relative_error(ours, theirs) < 2e-3


# ---------------------------------------------------------------------------------------------- into dsv2
def test_load_engine_and_convert_read_a_gguf(models: dict, tmp_path: Path) -> None:
    from dsv2 import cli
    from dsv2.infer import LLM, SamplingParams
    from dsv2.kernels import quant

    cfg, sd = models["lite"]
    # dense: a F32 GGUF loads to exactly the model it was written from
    f32 = _write(tmp_path / "f32.gguf", cfg, sd)
    reference = randomize_(Transformer(cfg), seed=SEEDS["lite"]).eval()
    assert torch.equal(_logits(checkpoint.load(f32, dtype=torch.float32)), _logits(reference))
    # quantized: the engine picks int8 for a Q8_0 file, takes the tokenizer from its metadata and generates
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog 2024\n" * 40, encoding="utf-8")
    train_bpe([corpus], vocab_size=400, out_dir=tmp_path / "tok", show_progress=False)
    tok_config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text(encoding="utf-8"))
    meta = tokenizer_metadata(tmp_path / "tok" / "tokenizer.json", tok_config, vocab_size=cfg.vocab_size)
    q8 = _write(tmp_path / "q8.gguf", cfg, sd, qtype=Q.Q8_0, tokenizer=meta)
    llm = LLM(q8, max_cache_tokens=256)
    assert isinstance(llm.model.head, quant.QuantLinear) and isinstance(llm.model.head.qweight, quant.Int8Weight)
    assert llm.tokenizer is not None and llm.tokenizer.encode("the fox") == DsTokenizer.from_dir(
        tmp_path / "tok").encode("the fox")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    tokens = llm.generate(["the quick fox"], params)[0].outputs[0].token_ids
    assert len(tokens) == 5
    # convert writes what the engine read: the same tokens from the directory, with no flag
    assert cli.main(["convert", str(q8), str(tmp_path / "conv")]) == 0
    written = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert written["quantization_config"]["method"] == "int8"
    assert (tmp_path / "conv" / "tokenizer.json").is_file()
    again = LLM(tmp_path / "conv", max_cache_tokens=256)
    assert again.generate(["the quick fox"], params)[0].outputs[0].token_ids == tokens
    assert cli.main(["convert", str(tmp_path / "corpus.txt"), str(tmp_path / "x")]) == 2  # not a GGUF
