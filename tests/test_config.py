"""ModelConfig: published presets, HF config.json in every dialect, and the errors it must raise."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV2Config

from dsv2 import ModelConfig, Transformer
from dsv2.config import PRESETS

# A DeepSeek-V2-Lite-Chat config.json as published (transformers 4.39 era, remote code).
V2_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_preset_parameter_counts_match_the_spec() -> None:
    assert ModelConfig.preset("v2").num_params() == pytest.approx(235.74e9, rel=1e-3)
    assert ModelConfig.preset("v2-lite").num_params() == pytest.approx(15.71e9, rel=1e-3)
    assert ModelConfig.preset("v2-lite").num_params() == 15_706_484_224  # a real checkpoint's tensor listing
    assert ModelConfig.preset("v2").num_active_params() == pytest.approx(21.38e9, rel=1e-3)
    v2 = ModelConfig.preset("v2")
    assert v2.num_params(include_embeddings=False) == v2.num_params() - 2 * 102400 * 5120
    assert 1e6 < ModelConfig.preset("tiny").num_params() < 1e7


def test_v2_preset_builds_on_meta_in_seconds() -> None:
    cfg = ModelConfig.preset("v2")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    elapsed = time.perf_counter() - t0
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert elapsed < 30  # a functional bound (no weights allocated), not a benchmark


def test_kv_cache_bytes_per_token() -> None:
    assert ModelConfig.preset("v2").kv_cache_bytes_per_token(torch.bfloat16) == 69_120
    assert ModelConfig.preset("v2").kv_cache_bytes_per_token("bfloat16") == 69_120
    assert ModelConfig.preset("v2-lite").kv_cache_bytes_per_token(torch.bfloat16) == 31_104
    assert ModelConfig.preset("v2-lite").kv_cache_bytes_per_token(torch.float32) == 62_208
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelConfig.preset("v2").kv_cache_bytes_per_token("int3")


def test_softmax_scale_carries_yarn_mscale_squared() -> None:
    assert ModelConfig.preset("v2").softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert ModelConfig.preset("v2.5").softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert ModelConfig.preset("v2").replace(rope_scaling=None).softmax_scale == pytest.approx(192**-0.5)


def test_from_hf_reads_the_official_v2_lite_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE_JSON))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.preset("v2-lite")
    assert ModelConfig.from_hf(tmp_path / "config.json") == ModelConfig.preset("v2-lite")
    assert ModelConfig.from_hf(V2_LITE_JSON) == ModelConfig.preset("v2-lite")


def test_from_hf_accepts_gready_and_null_groups() -> None:
    cfg = ModelConfig.from_hf({**V2_LITE_JSON, "topk_method": "gready", "n_group": None, "topk_group": None})
    assert cfg.topk_method == "greedy" and cfg.n_group == 1 and cfg.topk_group == 1


def test_from_hf_reads_transformers5_rope_parameters() -> None:
    raw = {k: v for k, v in V2_LITE_JSON.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                              "original_max_position_embeddings": 4096}
    assert ModelConfig.from_hf(raw) == ModelConfig.preset("v2-lite")
    no_scaling = ModelConfig.from_hf({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert no_scaling.rope_scaling is None and no_scaling.rope_theta == 5e5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_loads_in_transformers_and_round_trips(name: str) -> None:
    cfg = ModelConfig.preset(name)
    hf = DeepseekV2Config(**cfg.to_hf())
    assert hf.hidden_size == cfg.hidden_size and hf.n_routed_experts == cfg.n_routed_experts
    assert hf.rope_parameters["rope_type"] == "yarn"
    assert hf.rope_parameters["mscale_all_dim"] == cfg.rope_scaling.mscale_all_dim
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_hf(hf.to_dict()) == cfg  # transformers 5's own serialisation


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"topk_method": "noaux_tc"}, "topk_method", "unknown routing method"),
        ({"n_group": 3}, "n_routed_experts", "cannot be split into n_group=3"),
        ({"n_group": 4, "topk_group": 5}, "topk_group", "only n_group=4"),
        ({"topk_method": "group_limited_greedy", "n_group": 32, "topk_group": 1, "num_experts_per_tok": 6},
         "num_experts_per_tok", "hold only 2"),
        ({"num_experts_per_tok": 65}, "num_experts_per_tok", "only 64 routed experts"),
        ({"hidden_size": 0}, "hidden_size", "positive integer"),
        ({"num_hidden_layers": -1}, "num_hidden_layers", "positive integer"),
        ({"kv_lora_rank": 1.5}, "kv_lora_rank", "positive integer"),
        ({"q_lora_rank": 0}, "q_lora_rank", "null or positive"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim", "odd"),
        ({"scoring_func": "sigmoid"}, "scoring_func", "softmax"),
        ({"hidden_act": "gelu"}, "hidden_act", "silu"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling", "'linear' is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "rope_scaling.factor", ">= 1"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor", "positive"),
        ({"attention_dropout": 1.0}, "attention_dropout", "[0, 1)"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings", "not supported"),
    ],
)
def test_contradictory_values_raise_naming_the_field(changes: dict, field: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"config field '{field}'") + ".*" + re.escape(reason)):
        ModelConfig.from_hf({**V2_LITE_JSON, **changes})


def test_unknown_preset_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'v4'.*v2-lite"):
        ModelConfig.preset("v4")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_unknown_keys_warn_and_survive_to_hf() -> None:
    with pytest.warns(UserWarning, match="my_custom_flag"):
        cfg = ModelConfig.from_hf({**V2_LITE_JSON, "my_custom_flag": 3})
    assert cfg.to_hf()["my_custom_flag"] == 3
