"""Constrained decoding in the engine (dsv2.infer.grammar): output that matches its grammar every time, even from a
random model; batch invariance; fill-in-the-middle prompts; clear errors for bad grammars."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from dsv2.infer import LLM, Grammar, SamplingParams
from dsv2.infer.grammar import unpack
from dsv2.model import Transformer
from dsv2.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer, named_tokenizer_dir
from tests.conftest import randomize_, small_config

# Every value bounded, so that a random model finishes inside max_tokens: strings by maxLength, numbers by range.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "colour", "tags"],
    "additionalProperties": False,
}


def validate(doc: Any) -> None:  # noqa: ANN401
    """SCHEMA, checked by hand (no jsonschema dependency): keys, types and bounds."""
    assert isinstance(doc, dict) and list(doc) == ["name", "age", "ok", "colour", "tags"], doc
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 6
    assert isinstance(doc["age"], int) and not isinstance(doc["age"], bool) and 0 <= doc["age"] <= 120
    assert isinstance(doc["ok"], bool) and doc["colour"] in ("red", "green", "blue")
    assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and set(doc["tags"]) <= {"a", "b"}


@pytest.fixture(scope="module")
def llm() -> LLM:
    """A random model on the real DeepSeek-V2 tokenizer (102,400 ids), plus the Coder FIM tokens as added ones."""
    tok = Tokenizer.from_dir(named_tokenizer_dir("deepseek-v2"))
    tok.backend.add_special_tokens([FIM_HOLE, FIM_BEGIN, FIM_END])
    cfg = small_config(vocab_size=102400, bos_token_id=100000, eos_token_id=100001, max_position_embeddings=512)
    return LLM(randomize_(Transformer(cfg), seed=5), tokenizer=tok, max_cache_tokens=8192)


def test_json_schema_output_parses_and_validates_every_time(llm: LLM) -> None:
    grammar = Grammar.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, grammar=grammar) for s in range(12)]
    outs = llm.generate(["Describe a person:"] * 12, params)
    docs = []
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop", o
        docs.append(json.loads(o.text))
        validate(docs[-1])
    assert len({json.dumps(d) for d in docs}) > 1  # sampled, not one forced string


def test_json_object_and_regex_and_choice(llm: LLM) -> None:
    obj = llm.generate("x", SamplingParams(max_tokens=1, temperature=0, grammar=Grammar.json_object()))[0].outputs[0]
    assert obj.text.startswith("{")  # the first token already opens the object
    pattern = r"[0-9]{3}-[a-z]{2}"
    out = llm.generate("x", SamplingParams(max_tokens=40, temperature=1.0, seed=1, grammar=Grammar.regex(pattern)))
    assert re.fullmatch(pattern, out[0].outputs[0].text) and out[0].outputs[0].finish_reason == "stop"
    choice = Grammar.lark('start: "yes" | "no" | "maybe"')
    outs = llm.generate(["a", "b", "c"], [SamplingParams(max_tokens=10, temperature=1.0, seed=s, grammar=choice)
                                          for s in range(3)])
    assert all(o.outputs[0].text in ("yes", "no", "maybe") for o in outs)


def test_constrained_rows_are_batch_invariant(llm: LLM) -> None:
    """A constrained request samples the same alone or beside others, and unconstrained neighbours are untouched."""
    grammar = Grammar.json_schema(SCHEMA)
    constrained = SamplingParams(max_tokens=60, temperature=0.8, seed=3, grammar=grammar)
    free = SamplingParams(max_tokens=20, temperature=0.8, seed=4)
    alone = llm.generate("Describe a person:", constrained)[0].outputs[0].token_ids
    free_alone = [llm.generate(p, free)[0].outputs[0].token_ids for p in ("Once upon", "Hello")]
    mixed = llm.generate(["Once upon", "Describe a person:", "Hello"], [free, constrained, free])
    assert mixed[1].outputs[0].token_ids == alone
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == free_alone


def test_n_completions_each_follow_the_grammar(llm: LLM) -> None:
    out = llm.generate("p", SamplingParams(max_tokens=120, temperature=1.0, seed=9, n=3,
                                           grammar=Grammar.json_schema(SCHEMA)))[0]
    for o in out.outputs:
        validate(json.loads(o.text))


def test_invalid_grammars_fail_at_add_request_and_leave_nothing_behind(llm: LLM) -> None:
    for grammar, says in [(Grammar.json_schema('{"type": "strin"}'), "Invalid type"),
                          (Grammar.json_schema("{not json"), "not valid JSON"),
                          (Grammar.lark("start: foo"), "unknown name"),
                          (Grammar.regex("[a-"), "regex")]:
        with pytest.raises(ValueError, match=says):
            llm.add_request("x", SamplingParams(grammar=grammar))
    assert not llm.has_unfinished()
    with pytest.raises(ValueError, match="Grammar.kind"):
        Grammar("yaml", "")


def test_unpack_matches_the_bit_layout() -> None:
    packed = torch.tensor([[0b101, -(2**31)], [0, 1]], dtype=torch.int32)
    allowed = unpack(packed, 64)  # bit j of word w is token 32w + j; the sign bit is bit 31
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 63]
    assert allowed[1].nonzero().flatten().tolist() == [32]
    assert unpack(packed, 40).shape == (2, 40)


def test_fim_prompt_layout(llm: LLM) -> None:
    tok = llm.tokenizer
    assert tok.supports_fim
    ids = tok.fim_prompt("def f(x):\n", "\n    return y\n")
    hole, begin, end = (tok.added_token_id(t) for t in (FIM_HOLE, FIM_BEGIN, FIM_END))
    assert ids[:2] == [tok.bos_id, begin] and ids[-1] == end and ids.count(hole) == 1
    assert tok.decode(ids) == f"{tok.bos_token}{FIM_BEGIN}def f(x):\n{FIM_HOLE}\n    return y\n{FIM_END}"
    greedy = SamplingParams(max_tokens=6, temperature=0)
    assert (llm.generate("def f(x):\n", greedy, suffix="\n    return y\n")[0].outputs[0].token_ids
            == llm.generate(ids, greedy)[0].outputs[0].token_ids)


def test_fim_needs_fim_tokens_and_text() -> None:
    plain = Tokenizer.from_dir(named_tokenizer_dir("deepseek-v2"))
    assert not plain.supports_fim
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
        plain.fim_prompt("a", "b")
    llm = LLM(randomize_(Transformer(small_config()), seed=1), tokenizer=plain, max_cache_tokens=256)
    with pytest.raises(ValueError, match="prefix and the suffix as strings"):
        llm.add_request([1, 2, 3], suffix="b")
