"""ModelConfig: every DeepSeek-V2 architecture field, validated, with the published presets.

Field names are the Hugging Face config.json names, so `from_hf` / `to_hf` are an explicit map rather
than a translation table. This module imports no torch: configs are data, and the V2 preset must be
usable (parameter counts, cache sizes) without building anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

TOPK_METHODS = ("greedy", "group_limited_greedy")
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1, "int8": 1}

# config.json keys that carry no architecture information (training/runtime bookkeeping of transformers
# or the remote code). They are accepted and dropped silently; any other unknown key warns.
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "use_cache", "pretraining_tp", "output_router_logits", "router_aux_loss_coef", "head_dim",
    "qk_head_dim", "mlp_bias", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "tokenizer_class", "num_labels", "quantization_config", "_attn_implementation",
    "layer_types",
}


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (`rope_scaling` with type "yarn" in config.json), remote-code defaults."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        _check(self.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {self.factor}")
        _check(self.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
               f"must be positive, got {self.original_max_position_embeddings}")
        _check(self.beta_fast > self.beta_slow > 0, "rope_scaling.beta_fast",
               f"need beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}")
        _check(self.mscale >= 0 and self.mscale_all_dim >= 0, "rope_scaling.mscale",
               f"mscale and mscale_all_dim must be >= 0, got {self.mscale} and {self.mscale_all_dim}")

    def to_hf(self) -> dict[str, Any]:
        return {"type": "yarn", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944  # dense-MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int = 1408  # width of one routed expert; shared experts are n_shared_experts times wider
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # carried for HF compatibility; MLA does not use it
    n_shared_experts: int = 2
    n_routed_experts: int | None = 64  # None: every layer is dense
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    q_lora_rank: int | None = None  # None: plain q_proj (V2-Lite); else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    ep_size: int = 1
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # unknown HF keys, kept for to_hf

    def __post_init__(self) -> None:
        if self.topk_method == "gready":  # the remote code's own spelling in early checkpoints
            object.__setattr__(self, "topk_method", "greedy")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _yarn_from_dict(self.rope_scaling))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq",
                     "max_position_embeddings", "ep_size"):
            _check_positive(self, name)
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"RoPE rotates pairs, got odd {self.qk_rope_head_dim}")
        _check(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
               f"must be null or positive, got {self.q_lora_rank}")
        _check(self.first_k_dense_replace >= 0, "first_k_dense_replace", f"must be >= 0, got {self.first_k_dense_replace}")
        _check(0.0 <= self.attention_dropout < 1.0, "attention_dropout", f"must be in [0, 1), got {self.attention_dropout}")
        _check(self.hidden_act == "silu", "hidden_act", f"DeepSeek-V2 uses 'silu', got {self.hidden_act!r}")
        _check(not self.attention_bias, "attention_bias", "no DeepSeek-V2 checkpoint has attention biases; not supported")
        _check(not self.tie_word_embeddings, "tie_word_embeddings",
               "DeepSeek-V2 keeps lm_head separate from embed_tokens; tied weights are not supported")
        if self.n_routed_experts is not None:
            self._validate_moe()

    def _validate_moe(self) -> None:
        E, K = self.n_routed_experts, self.num_experts_per_tok
        _check_positive(self, "n_routed_experts")
        _check_positive(self, "moe_intermediate_size")
        _check_positive(self, "num_experts_per_tok")
        _check(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        _check(K <= E, "num_experts_per_tok", f"{K} experts per token but only {E} routed experts")
        _check(self.topk_method in TOPK_METHODS, "topk_method",
               f"unknown routing method {self.topk_method!r}; expected one of {TOPK_METHODS}")
        _check(self.scoring_func == "softmax", "scoring_func",
               f"DeepSeek-V2 scores experts with 'softmax', got {self.scoring_func!r}")
        _check(self.routed_scaling_factor > 0, "routed_scaling_factor",
               f"must be positive, got {self.routed_scaling_factor}")
        _check_positive(self, "n_group")
        _check_positive(self, "topk_group")
        _check(E % self.n_group == 0, "n_routed_experts",
               f"{E} experts cannot be split into n_group={self.n_group} equal groups")
        _check(self.topk_group <= self.n_group, "topk_group",
               f"keeps {self.topk_group} groups but there are only n_group={self.n_group}")
        if self.topk_method == "group_limited_greedy":
            kept = self.topk_group * (E // self.n_group)
            _check(K <= kept, "num_experts_per_tok",
                   f"{K} experts per token but the {self.topk_group} kept groups hold only {kept} experts")

    # ---------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)**2 (the official code's footgun)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_get_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        """The official rule; transformers' native class ignores moe_layer_freq."""
        return (self.n_routed_experts is not None and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- sizes
    def _attention_params(self) -> int:
        H, nh = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = H * nh * self.qk_head_dim
        else:
            q = H * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        kv = H * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + nh * self.v_head_dim * H

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def _layer_params(self, layer: int, active: bool) -> int:
        H = self.hidden_size
        n = self._attention_params() + 2 * H
        if not self.is_moe_layer(layer):
            return n + 3 * H * self.intermediate_size
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        return n + H * self.n_routed_experts + (routed + self.n_shared_experts) * self._expert_params()

    def num_params(self, include_embeddings: bool = True) -> int:
        """All parameters; embeddings means embed_tokens and lm_head (two vocab x hidden matrices)."""
        n = sum(self._layer_params(i, active=False) for i in range(self.num_hidden_layers)) + self.hidden_size
        return n + (2 * self.vocab_size * self.hidden_size if include_embeddings else 0)

    def num_active_params(self, include_embeddings: bool = True) -> int:
        """Parameters one token touches: all but the routed experts it is not sent to (router counted)."""
        n = sum(self._layer_params(i, active=True) for i in range(self.num_hidden_layers)) + self.hidden_size
        return n + (2 * self.vocab_size * self.hidden_size if include_embeddings else 0)

    def kv_cache_bytes_per_token(self, dtype: Any = "bfloat16") -> int:
        """Bytes of latent cache per token: (kv_lora_rank + qk_rope_head_dim) values in every layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers * _dtype_bytes(dtype)

    # ---------------------------------------------------------------- HF interchange
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """From an official config.json (path, directory holding one, or its dict)."""
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls(**_fields_from_hf(raw))

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' DeepseekV2Config and the official remote code both load."""
        out = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **self.extra}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_hf() if isinstance(value, YarnScaling) else value
        return out

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _check(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"config field {name!r}: {reason}")


def _check_positive(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
           f"must be a positive integer, got {value!r}")


def _dtype_bytes(dtype: Any) -> int:
    if hasattr(dtype, "itemsize"):
        return int(dtype.itemsize)
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected a torch.dtype or one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def _yarn_from_dict(d: dict[str, Any]) -> YarnScaling | None:
    kind = d.get("type", d.get("rope_type", "yarn"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"config field 'rope_scaling': type {kind!r} is not supported (DeepSeek-V2 uses 'yarn')")
    names = {f.name for f in dataclasses.fields(YarnScaling)}
    return YarnScaling(**{k: v for k, v in d.items() if k in names and v is not None})


def _fields_from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    out: dict[str, Any] = {}
    # transformers 5 folds rope_theta and the scaling into one `rope_parameters` dict.
    params = raw.pop("rope_parameters", None)
    if params:
        params = dict(params)
        if "rope_theta" in params:
            out["rope_theta"] = params.pop("rope_theta")
        raw.setdefault("rope_scaling", params if params.get("rope_type", "default") != "default" else None)
    if raw.get("torch_dtype") is None and raw.get("dtype") is not None:
        raw["torch_dtype"] = raw["dtype"]
    unknown = {}
    for key, value in raw.items():
        if key in names:
            out[key] = value
        elif key not in _IGNORED_HF_KEYS:
            unknown[key] = value
    if unknown:
        warnings.warn(f"config.json keys not used by DeepSeek-V2, kept as-is: {sorted(unknown)}", stacklevel=3)
    for key in ("n_group", "topk_group"):  # null in greedy checkpoints: one group holding every expert
        if out.get(key) is None:
            out.pop(key, None)
    if isinstance(out.get("rope_scaling"), dict):
        out["rope_scaling"] = _yarn_from_dict(out["rope_scaling"])
    for key in ("rope_theta", "routed_scaling_factor", "rms_norm_eps"):
        if key in out:
            out[key] = float(out[key])
    if "n_routed_experts" in out and out["n_routed_experts"] is None:
        out.setdefault("num_experts_per_tok", 1)
    out["extra"] = unknown
    return out


def _yarn_40(mscale: float) -> YarnScaling:
    return YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                       mscale=mscale, mscale_all_dim=mscale)


_V2 = ModelConfig(
    vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
    num_hidden_layers=60, num_attention_heads=128, n_shared_experts=2, n_routed_experts=160,
    num_experts_per_tok=6, routed_scaling_factor=16.0, topk_method="group_limited_greedy", n_group=8,
    topk_group=3, q_lora_rank=1536, rope_scaling=_yarn_40(0.707),
)
_V2_LITE = ModelConfig(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
    num_experts_per_tok=6, routed_scaling_factor=1.0, topk_method="greedy", q_lora_rank=None,
    rope_scaling=_yarn_40(0.707),
)

PRESETS: dict[str, ModelConfig] = {
    "v2": _V2,
    "v2-lite": _V2_LITE,
    # Coder-V2 and Coder-V2-Lite share the V2 / V2-Lite shapes; read mscale from the real config.json when loading.
    "coder-v2": _V2,
    "coder-v2-lite": _V2_LITE,
    "v2.5": _V2.replace(rope_scaling=_yarn_40(1.0)),
    # The V2 structure at a few million parameters: q compression, 4 groups of 4 experts with 2 kept,
    # shared experts, one dense layer, YaRN (factor 4 over a 256-token pretraining context).
    "tiny": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=2, n_routed_experts=16,
        num_experts_per_tok=4, routed_scaling_factor=1.0, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=1024, torch_dtype="float32", bos_token_id=0, eos_token_id=1,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=256, mscale=0.707,
                                 mscale_all_dim=0.707),
    ),
}
