"""Write deepseek2 GGUF files the way llama.cpp does, for tests that have no llama.cpp build.

Written from llama.cpp's converter, not from dsv2.gguf (the reader under test), so that a round trip checks one
reading of the converter against another:

* `conversion/deepseek.py`, `DeepseekV2Model.modify_tensors`: lm_head dropped when tie_word_embeddings; routed
  experts stacked per layer with `torch.stack(datas, dim=0)` under the merged HF name
  `model.layers.{bid}.mlp.experts.{down,gate,up}_proj.weight`; kv_b_proj split for MLA absorption:
      kv_b = data.view(n_head_kv, v_head_dim + qk_nope_head_dim, data.shape[-1])
      k_b, v_b = torch.split(kv_b, [qk_nope_head_dim, v_head_dim], dim=1)
      k_b = k_b.transpose(1, 2)
  (n_head_kv is the config's num_key_value_heads: tensors are converted in `prepare_tensors`, before
  `set_gguf_parameters` overwrites it with 1).
* `DeepseekV2Model.set_gguf_parameters` on top of `TextModel.set_gguf_parameters` (`conversion/base.py`):
  head_count_kv = 1, key_length = kv_lora_rank + qk_rope_head_dim, value_length = kv_lora_rank,
  key_length_mla = qk_nope + qk_rope, value_length_mla = v_head_dim, yarn_log_multiplier = 0.1 * mscale_all_dim,
  expert_weights_norm only when true, expert_group_count / expert_group_used_count when n_group / topk_group
  are set, expert_gating_func from scoring_func. `mla=False` writes the layout of the first deepseek2
  converter (2024) instead: `attn_kv_b` whole, head_count_kv = num_key_value_heads, key_length = qk_nope +
  qk_rope, value_length = v_head_dim, and none of the keys added later (the *_mla lengths, the gating function
  -- "existing DeepSeek V2 and V2.5 GGUFs that have no expert_gating_func" in src/models/deepseek2.cpp --,
  expert groups, yarn betas).
* Names: gguf-py's `TensorNameMap(MODEL_ARCH.DEEPSEEK2).get_name(name, try_suffixes=(".weight", ".bias"))`,
  as `ModelBase.map_tensor_name` does.
* Types: `ModelBase.prepare_tensors` keeps 1-D tensors, `*_norm.weight` and FFN_GATE_INP in F32. For K-quants,
  llama-quantize (`tensor_type_fallback` in src/llama-quant.cpp) falls back when a row is not a multiple of
  256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when the row does not fit that type's blocks
  either (as `prepare_tensors` does on gguf.QuantError). Types gguf.quants can quantize go through it; Q4_K, Q5_K and
  Q6_K (which it can only dequantize) are encoded here, block layout read off gguf.quants' dequantizers, with
  simple min/max scales rather than llama.cpp's search (so the error is somewhat above real llama-quantize's).
* Tokenizer: `TextModel.get_vocab_base` (ids beyond the vocabulary padded with "[PAD{i}]" UNUSED tokens,
  special added tokens CONTROL, other added tokens USER_DEFINED) and `gguf.SpecialVocab` (merges as "a b",
  bos/eos/pad ids, add_bos/add_eos, chat_template).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

QK_K = 256
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
QTypeChoice = Q | Mapping[str, Q] | Callable[[str], Q]


def write_deepseek2_gguf(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    mla: bool = True,
    qtype: QTypeChoice = Q.F32,
    tokenizer: Mapping[str, Any] | None = None,
    arch: str = "deepseek2",
    split_max_tensors: int = 0,
    extra_tensors: Mapping[str, tuple[np.ndarray, Q | None]] | None = None,
) -> dict[str, Q]:
    """Write `state_dict` (HF names, HF shapes) + `config` (an HF config.json dict) as a deepseek2 GGUF.

    `qtype` is the type for every quantizable weight, or a GGUF-name -> type map / function. `tokenizer` is
    the dict `tokenizer_metadata` returns. `extra_tensors` are added as they are, under their GGUF names (raw
    block bytes when a type is given): for files llama.cpp would not write. Returns each tensor's GGUF type.
    """
    hp = dict(config)
    writer = gguf.GGUFWriter(os.fspath(path), arch, split_max_tensors=split_max_tensors)
    _add_parameters(writer, hp, mla)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, hp["num_hidden_layers"])
    types: dict[str, Q] = {}
    for hf_name, data in _converted(state_dict, hp, mla):
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"cannot map tensor {hf_name!r}")
        array = data.detach().to(torch.float32).contiguous().numpy()
        qt = _tensor_type(new_name, array, qtype)
        types[new_name] = qt
        if qt == Q.F32:
            writer.add_tensor(new_name, array)
        elif qt == Q.F16:
            writer.add_tensor(new_name, array.astype(np.float16))
        else:
            writer.add_tensor(new_name, quantize(array, qt), raw_dtype=qt)
    for new_name, (array, raw_dtype) in (extra_tensors or {}).items():
        writer.add_tensor(new_name, array, raw_dtype=raw_dtype)
        types[new_name] = raw_dtype or Q.F32
    if any(t not in (Q.F32, Q.F16, Q.BF16) for t in types.values()):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _converted(state_dict: Mapping[str, torch.Tensor], hp: dict[str, Any], mla: bool):  # noqa: ANN202
    """DeepseekV2Model.modify_tensors: (HF-style name, tensor) in the order the converter emits them."""
    n_experts = hp.get("n_routed_experts")
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name, data in state_dict.items():
        if hp.get("tie_word_embeddings", False) and name == "lm_head.weight":
            continue
        bid = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if "mlp.experts" in name:
            assert bid is not None
            experts.setdefault(bid, {})[name] = data
            if len(experts[bid]) >= n_experts * 3:
                for w_name in ("down_proj", "gate_proj", "up_proj"):
                    datas = [experts[bid].pop(f"model.layers.{bid}.mlp.experts.{x}.{w_name}.weight")
                             for x in range(n_experts)]
                    yield f"model.layers.{bid}.mlp.experts.{w_name}.weight", torch.stack(datas, dim=0)
            continue
        if mla and name.endswith("kv_b_proj.weight"):
            n_head_kv, v_head_dim, qk_nope = hp["num_key_value_heads"], hp["v_head_dim"], hp["qk_nope_head_dim"]
            assert data.shape[0] == n_head_kv * (v_head_dim + qk_nope)
            kv_b = data.view(n_head_kv, v_head_dim + qk_nope, data.shape[-1])
            k_b, v_b = torch.split(kv_b, [qk_nope, v_head_dim], dim=1)
            k_b = k_b.transpose(1, 2)
            yield name.replace("kv_b_proj", "k_b_proj"), k_b
            yield name.replace("kv_b_proj", "v_b_proj"), v_b
            continue
        yield name, data
    leftover = [k for d in experts.values() for k in d]
    assert not leftover, f"unprocessed experts: {leftover[:4]}"


def _tensor_type(new_name: str, array: np.ndarray, qtype: QTypeChoice) -> Q:
    if array.ndim <= 1 or new_name.endswith("_norm.weight") or ".ffn_gate_inp." in new_name:
        return Q.F32
    if isinstance(qtype, Q):
        qt = qtype
    elif callable(qtype):
        qt = qtype(new_name)
    else:
        qt = qtype.get(new_name, Q.F32)
    if qt in K_FALLBACK and array.shape[-1] % QK_K:
        qt = K_FALLBACK[qt]
    if qt not in (Q.F32, Q.F16) and array.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
        # prepare_tensors on gguf.QuantError, and llama-quantize for rows no block type fits: "falling back to F16"
        qt = Q.F16
    return qt


def _add_parameters(w: gguf.GGUFWriter, hp: dict[str, Any], mla: bool) -> None:
    # TextModel.set_gguf_parameters (with hparams["num_key_value_heads"] = 1 set first by DeepseekV2Model)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(1 if mla else hp["num_key_value_heads"])
    rope = hp.get("rope_scaling") or {}
    if rope.get("type", rope.get("rope_type")) == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if mla:
            if rope.get("beta_fast") is not None:
                w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
            if rope.get("beta_slow") is not None:
                w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(hp.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    if hp.get("n_routed_experts") is not None:
        w.add_expert_count(hp["n_routed_experts"])
    if hp.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if mla:
        if hp.get("n_group") is not None:
            w.add_expert_group_count(hp["n_group"])
        if hp.get("topk_group") is not None:
            w.add_expert_group_used_count(hp["topk_group"])
        if hp.get("scoring_func") == "softmax":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        elif hp.get("scoring_func") == "sigmoid":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # DeepseekV2Model.set_gguf_parameters
    w.add_leading_dense_block_count(hp["first_k_dense_replace"])
    w.add_vocab_size(hp["vocab_size"])
    if hp.get("q_lora_rank") is not None:
        w.add_q_lora_rank(hp["q_lora_rank"])
    kv_lora, rope_dim = hp["kv_lora_rank"], hp["qk_rope_head_dim"]
    w.add_kv_lora_rank(kv_lora)
    if mla:
        w.add_key_length(kv_lora + rope_dim)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(hp["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(hp["v_head_dim"])
    else:
        w.add_key_length(hp["qk_nope_head_dim"] + rope_dim)
        w.add_value_length(hp["v_head_dim"])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_count(hp.get("n_shared_experts", 0))
    if hp.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(hp["routed_scaling_factor"])
    if hp.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    if rope.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_metadata(
    tokenizer_json: str | os.PathLike[str],
    tokenizer_config: Mapping[str, Any],
    vocab_size: int,
    pre: str = "deepseek-llm",
) -> dict[str, Any]:
    """TextModel.get_vocab_base + gguf.SpecialVocab, from a tokenizer.json file and a tokenizer_config dict."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    added = {a["content"]: a for a in data.get("added_tokens", [])}
    vocab.update({content: a["id"] for content, a in added.items()})
    assert max(vocab.values()) < vocab_size
    reverse = {i: tok for tok, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if added[token]["special"]:
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    def token_id(key: str) -> int | None:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return None if value is None else vocab[value]

    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos": token_id("bos_token"), "eos": token_id("eos_token"), "pad": token_id("pad_token"),
        **_add_special(data.get("post_processor"), tokenizer_config),
        "chat_template": tokenizer_config.get("chat_template"),
    }


def _add_special(post_processor: Mapping[str, Any] | None, tokenizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """SpecialVocab._load: the post-processor decides add_bos/add_eos ("Mismatch between tokenizer_config
    add_bos_token(True) and tokenizer post_processor<bos>(False) - opting for the latter"), config.json after."""
    def content(key: str) -> str | None:
        value = tokenizer_config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    add: dict[str, Any] = {}
    for processor in (post_processor or {}).get("processors", [post_processor] if post_processor else []):
        if processor.get("type") == "ByteLevel":
            add.setdefault("add_bos", False)
            add.setdefault("add_eos", False)
        elif processor.get("type") == "TemplateProcessing":
            single = processor.get("single", [])
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                add["add_bos"] = first is not None and first == content("bos_token")
                add["add_eos"] = last is not None and last == content("eos_token")
    for key in ("bos", "eos"):
        add.setdefault(f"add_{key}", tokenizer_config.get(f"add_{key}_token"))
    return add


def _add_tokenizer(w: gguf.GGUFWriter, tok: Mapping[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if tok.get(key) is not None:
            add(tok[key])
    if tok.get("add_bos") is not None:
        w.add_add_bos_token(tok["add_bos"])
    if tok.get("add_eos") is not None:
        w.add_add_eos_token(tok["add_eos"])
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])


def write_tokenizer_only(path: str | os.PathLike[str], tokenizer: Mapping[str, Any], vocab_size: int) -> None:
    """A deepseek2 GGUF with metadata and vocabulary but no tensors (what `--vocab-only` writes)."""
    writer = gguf.GGUFWriter(os.fspath(path), "deepseek2")
    writer.add_vocab_size(vocab_size)
    _add_tokenizer(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------- quantization
def quantize(array: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 rows -> GGUF block bytes, shape (*rows, bytes per row)."""
    if qtype in _K_ENCODERS:
        if array.shape[-1] % QK_K:
            raise ValueError(f"{qtype.name} needs rows that are a multiple of {QK_K}, got {array.shape[-1]}")
        blocks = _K_ENCODERS[qtype](array.reshape(-1, QK_K).astype(np.float32))
        return blocks.reshape(*array.shape[:-1], -1)
    return gguf.quants.quantize(array, qtype)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float32), where=b != 0)


def _scales_mins(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: 8 sub-blocks of 32, value = d * sc * q - dmin * m with 6-bit sc, m and 0 <= q <= nmax."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - lo) / nmax
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = ((-lo).max(axis=-1) / 63).astype(np.float16)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(-lo, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint(_safe_div(sub + offset[..., None], step[..., None])), 0, nmax).astype(np.uint8)
    packed = np.empty((n, 12), dtype=np.uint8)
    # the inverse of gguf.quants.Q4_K.get_scale_min
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, q


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) -> 128 bytes: byte 32c + l holds sub-block 2c (low nibble) and 2c + 1 (high nibble)."""
    q = q & 0x0F
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(q.shape[0], 128)


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _scales_mins(x, 15)
    return np.concatenate([d, dmin, scales, _low_nibbles(q)], axis=1)


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _scales_mins(x, 31)
    # qh byte l, bit j: fifth bit of element l of sub-block j
    high = ((q >> 4) & 1).astype(np.uint8)
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return np.concatenate([d, dmin, scales, qh, _low_nibbles(q)], axis=1)


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = (scale.max(axis=-1) / 127).astype(np.float16)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_safe_div(sub, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    # ql: 128 bytes in two halves of 64; element 128h + 64s + b sits in byte 64h + b, nibble s
    low = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    # qh: 64 bytes in two halves of 32; element 128g + 32s + l sits in byte 32g + l, bits 2s..2s+1
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = np.bitwise_or.reduce(high << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)


_K_ENCODERS: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q4_K: _encode_q4_k, Q.Q5_K: _encode_q5_k, Q.Q6_K: _encode_q6_k,
}


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| over the whole tensor."""
    num = (approx.double() - exact.double()).norm().item()
    den = exact.double().norm().item()
    return num / den if den else (0.0 if num == 0 else math.inf)
