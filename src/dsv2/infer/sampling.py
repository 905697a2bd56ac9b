"""SamplingParams and the batched sampler.

The sampler works on a (N, vocab) block of fp32 logits, one row per sequence: logit bias, penalties,
temperature, top-k / top-p / min-p masks and the draw are tensor ops over the whole batch. Randomness comes
from one torch.Generator per sequence, so a seeded request samples the same tokens alone or in any batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv2.infer.grammar import Grammar

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # strings, matched on the detokenized output and trimmed from it
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # number of top alternatives to report per token (0: the sampled one only)
    skip_special_tokens: bool = True
    # token id -> bias added to its logit before anything else (OpenAI's logit_bias; -100 bans, +100 forces).
    # Given as a dict or pairs; stored as (id, bias) pairs sorted by id, so that the params stay hashable.
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    # What the output must match (JSON schema, any JSON object, Lark, regex): a token mask at every step.
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _require(_is_num(self.temperature) and self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _require(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 or -1: off)", self.top_k)
        _require(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _require(_is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "> 0",
                 self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_num(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 "non-negative integers", self.stop_token_ids)
        _require(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        _require(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        _require(self.grammar is None or isinstance(self.grammar, Grammar), "grammar", "a Grammar or None",
                 self.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    what = "a {token id: bias} mapping or (token id, bias) pairs, ids >= 0, biases in [-100, 100]"
    pairs = list(bias.items()) if isinstance(bias, Mapping) else bias
    _require(isinstance(pairs, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs),
             "logit_bias", what, bias)
    _require(all(_is_int(t) and t >= 0 and _is_num(b) and -100 <= b <= 100 for t, b in pairs), "logit_bias", what,
             bias)
    ids = [t for t, _ in pairs]
    _require(len(set(ids)) == len(ids), "logit_bias", "free of repeated token ids", bias)
    return tuple(sorted((t, float(b)) for t, b in pairs))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(ok: bool, name: str, what: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {what}, got {value!r}")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class SamplerInput:
    """Per-row state the sampler needs beside the logits."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    allowed: torch.Tensor | None = None  # (vocab,) bool: the tokens the row's grammar allows now


def sample(logits: torch.Tensor, rows: Sequence[SamplerInput]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (N, V) fp32 -> one token id per row, and its logprobs where asked."""
    logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
    logits = _apply_grammar(logits, rows)
    logits = _apply_logit_bias(logits, rows)
    logits = _apply_penalties(logits, rows)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [rows[i].params for i in random_rows])
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i, and the noise
        # for each row comes from that row's own generator.
        noise = torch.stack([torch.empty(logits.shape[-1], device=logits.device).exponential_(
            generator=rows[i].generator) for i in random_rows])
        # E_i can come out exactly 0: p / 0 is inf, and 0 / 0 on a filtered-out token is NaN, which argmax picks.
        # Clamped to the smallest normal float, p / E stays finite (p <= 1); filtered-out tokens score -1, below
        # every kept one (>= 0), whatever the noise.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        tokens[idx] = torch.where(probs > 0, probs / noise, -1.0).argmax(dim=-1)
    token_list = tokens.tolist()
    return token_list, _logprobs(logprobs, token_list, rows)


def _apply_grammar(logits: torch.Tensor, rows: Sequence[SamplerInput]) -> torch.Tensor:
    """-inf for every token a row's grammar forbids; first, so that bias and penalties cannot revive one."""
    constrained = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not constrained:
        return logits
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[constrained] = torch.stack([rows[i].allowed for i in constrained]).to(logits.device)
    return logits.masked_fill(~allowed, float("-inf"))


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplerInput]) -> torch.Tensor:
    """Add each row's logit_bias: one accumulate-index_put over all (row, token) pairs of the batch."""
    if not any(r.params.logit_bias for r in rows):
        return logits
    row_ids = [i for i, r in enumerate(rows) for _ in r.params.logit_bias]
    token_ids = [t for r in rows for t, _ in r.params.logit_bias]
    biases = [b for r in rows for _, b in r.params.logit_bias]
    V = logits.shape[-1]
    if max(token_ids) >= V:  # index_put would fail with an opaque index error (or a device assert on CUDA)
        raise ValueError(f"logit_bias names token id {max(token_ids)}, outside the vocabulary [0, {V})")
    device = logits.device
    index = (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device))
    return logits.index_put(index, torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplerInput]) -> torch.Tensor:
    if all(r.params.repetition_penalty == 1 and r.params.presence_penalty == 0
           and r.params.frequency_penalty == 0 for r in rows):
        return logits
    N, V = logits.shape
    device = logits.device
    counts = torch.zeros(N, V, device=device)
    seen = torch.zeros(N, V, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):  # one scatter per row over its token ids, never a loop over the vocabulary
        if r.output_ids:
            counts[i].index_add_(0, torch.tensor(r.output_ids, device=device), torch.ones(len(r.output_ids),
                                                                                           device=device))
        if r.params.repetition_penalty != 1 and (r.prompt_ids or r.output_ids):
            seen[i, torch.tensor(list(r.prompt_ids) + list(r.output_ids), device=device)] = True
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
    # Repetition penalty as in CTRL / transformers: shrink positive logits, push negative ones further down.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency * counts - presence * (counts > 0)


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        V = probs.shape[-1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=device)[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        rank = torch.arange(V, device=device)[None, :]
        # Keep a token if it is within top-k and the mass before it is below top-p (the first always stays).
        keep = (rank < top_k) & ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    probs = torch.where(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0, probs)
    return probs


def _logprobs(logprobs: torch.Tensor | None, tokens: list[int], rows: Sequence[SamplerInput]
              ) -> list[TokenLogprob | None]:
    if logprobs is None:
        return [None] * len(rows)
    k = max(r.params.logprobs or 0 for r in rows)
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out: list[TokenLogprob | None] = []
    for i, r in enumerate(rows):
        n = r.params.logprobs
        out.append(None if n is None else TokenLogprob(tokens[i], chosen[i], list(zip(top_ids[i][:n],
                                                                                         top_vals[i][:n]))))
    return out


# generation_config.json keys that are sampling defaults, and the types SamplingParams takes them in.
_GENERATION_KEYS: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                                     "repetition_penalty": float}


def generation_defaults(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's own sampling defaults (its generation_config.json) as SamplingParams keywords: what a
    request that leaves a field unset gets. DeepSeek-V2 ships temperature 0.3 and top_p 0.95; dsv2-tiny ships
    `do_sample: false`, i.e. greedy. No file: {}. As in transformers, `do_sample: false` means greedy with
    the repetition penalty still applied, and the sampling-only keys ignored; top_k 0 or absent: off."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise ValueError(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    keys = ("repetition_penalty",) if cfg.get("do_sample") is False else tuple(_GENERATION_KEYS)
    out: dict[str, Any] = {"temperature": 0.0} if cfg.get("do_sample") is False else {}
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        kind = _GENERATION_KEYS[key]
        if not _is_num(value) or (kind is int and not float(value).is_integer()):
            raise ValueError(f"{path}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        out[key] = kind(value)
    if out.get("top_k", 1) <= 0:
        del out["top_k"]
    try:
        SamplingParams(**out)
    except ValueError as e:  # e.g. top_p 0: the checkpoint's mistake, not a request's
        raise ValueError(f"{path}: {e}") from e
    return out
