"""Constrained decoding: a Grammar that a request's output must match, enforced as a token mask in the sampler.

The grammar engine is llguidance (the Rust library behind llama.cpp's and vLLM's "guidance" backend): it needs
only the tokenizer.json the checkpoint already has, runs on any CPU, and computes a mask over the vocabulary per
step from an Earley parser with a lazily built lexer. dsv2 owns only the glue: what a request asks for (Grammar),
compiling each distinct grammar once (Constraints), and packing/applying masks for a batch.

Batch invariance: each row's mask depends only on that row's grammar and tokens, and masking sets the row's
disallowed logits to -inf before anything else reads them, so a constrained request samples the same tokens alone
or in any batch, and unconstrained rows are untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

KINDS = ("json_schema", "json_object", "lark", "regex")
# Compact JSON: with flexible whitespace a weak model can emit newlines forever. A schema may opt back in with
# "x-guidance": {"whitespace_flexible": true}.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """What a request's output must be. kind: "json_schema" (source: the schema as JSON text), "json_object"
    (any JSON object), "lark" (llguidance's Lark dialect, which may embed JSON schemas with %json and name
    special tokens as <｜...｜> or <[id]>), or "regex". Hashable, so SamplingParams stays hashable."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Grammar.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"Grammar.source must be a string, got {type(self.source).__name__}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Grammar:
        # not sort_keys: the order of "properties" is the order the fields are written in
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_object")

    @classmethod
    def lark(cls, text: str) -> Grammar:
        return cls("lark", text)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    def definition(self) -> str:
        """The grammar in llguidance's serialized form; ValueError if the source is not valid for its kind."""
        try:
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
            if self.kind == "json_schema":
                schema = json.loads(self.source)
                if not isinstance(schema, (dict, bool)):
                    raise ValueError(f"a JSON schema is an object or a boolean, not {type(schema).__name__}")
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
            if self.kind == "lark":
                return llguidance.LLMatcher.grammar_from_lark(self.source)
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"invalid {self.kind} grammar: {e}") from e


class Constraints:
    """Per engine: llguidance's view of the tokenizer (built once, ~1 s for a 100K vocabulary) and every grammar
    compiled so far. `matcher(grammar)` hands out a fresh copy of the compiled matcher for one sequence."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int], max_cached: int = 256) -> None:
        self._tokenizer_json, self.vocab_size, self._eos = tokenizer_json, vocab_size, sorted(eos_ids)
        self._lltok: llguidance.LLTokenizer | None = None
        self._compiled: dict[Grammar, llguidance.LLMatcher] = {}
        self._max_cached = max_cached
        self._executor: llguidance.LLExecutor | None = None

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            # n_vocab: the model's rows; ids past the tokenizer's entries are never allowed.
            self._lltok = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                 eos_token=self._eos or None)
        return self._lltok

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A matcher at the start of `grammar`; ValueError naming the problem if the grammar is invalid."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._tokenizer(), grammar.definition())
            if compiled.is_error():
                raise ValueError(f"invalid {grammar.kind} grammar: {compiled.get_error()}")
            if len(self._compiled) >= self._max_cached:  # a server sees unboundedly many schemas
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[grammar] = compiled
        return compiled.deep_copy()

    def masks(self, matchers: Sequence[llguidance.LLMatcher]) -> torch.Tensor:
        """(len(matchers), vocab) bool: the tokens each matcher allows next (computed in parallel)."""
        words = (self.vocab_size + 31) // 32
        packed = torch.zeros(len(matchers), words, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], packed.data_ptr(),
                                               words * 4, len(matchers))
        return unpack(packed, self.vocab_size)


_BITS = torch.arange(32, dtype=torch.int32)


def unpack(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, words) int32 bitmasks (bit j of word w is token 32w + j) -> (N, vocab_size) bool."""
    return ((packed.unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)[:, :vocab_size]
