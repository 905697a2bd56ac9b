"""Every sampling field reaches the engine through a real `dsv2 serve`, sent as a user would (the official
`openai` client, vLLM's extra fields in extra_body): each test fails if the server drops its field. And a
field dsv2 does not implement is a 400 naming it, never a 200 that ignored it.

The checkpoint ships `generation_config.json` {"do_sample": false}: a request without temperature is greedy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_server import CFG, NAME, _post, _start, _stop, write_checkpoint

BOS, EOS = 100000, 100001  # <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>: special tokens
HELLO = 39280  # " hello"
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("served_fields"))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return path


@pytest.fixture(scope="module")
def port(ckpt: Path) -> Iterator[int]:
    proc, port = _start(ckpt)
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


def _complete(client: openai.OpenAI, max_tokens: int = 8, prompt: str = PROMPT, **kw: Any) -> Any:  # noqa: ANN401
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, **kw).choices[0]


def _text(client: openai.OpenAI, **kw: Any) -> str:  # noqa: ANN401
    return _complete(client, **kw).text


def _edge_bias(client: openai.OpenAI, prompt: str, steps: int) -> float:
    """A logit_bias for " hello" that makes greedy say it `steps` times after `prompt`, but at some step after
    the first by a margin of only 1 logit: any penalty on a repeated token then changes the text. (The random
    model never repeats a token by itself.) Reported logprobs are the model's own, before bias and penalties."""
    forced = _complete(client, temperature=0, max_tokens=steps, prompt=prompt, logit_bias={str(HELLO): 100},
                       logprobs=5).logprobs
    gaps = [max(lp for piece, lp in top.items() if piece != " hello") - own
            for own, top in zip(forced.token_logprobs, forced.top_logprobs)]
    assert len(gaps) == steps and max(gaps[1:]) > gaps[0]
    return max(gaps[1:]) + 1.0


@pytest.mark.parametrize("field", [{"repetition_penalty": 100.0}, {"presence_penalty": 2.0},
                                   {"frequency_penalty": 2.0}])
def test_penalties(client: openai.OpenAI, field: dict) -> None:
    prompt = "Hello"  # where " hello" wins the first step by itself more easily than the later ones
    bias = {str(HELLO): _edge_bias(client, prompt, 8)}
    assert _text(client, prompt=prompt, temperature=0, logit_bias=bias) == " hello" * 8
    neutral = {k: 1.0 if k == "repetition_penalty" else 0.0 for k in field}
    assert _text(client, prompt=prompt, temperature=0, logit_bias=bias, extra_body=neutral) == " hello" * 8
    assert _text(client, prompt=prompt, temperature=0, logit_bias=bias, extra_body=field) != " hello" * 8


@pytest.mark.parametrize("field", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}])
def test_filters_that_keep_one_token_are_greedy(client: openai.OpenAI, field: dict) -> None:
    greedy = _text(client, temperature=0)
    hot = [_text(client, temperature=1.5, seed=s) for s in range(4)]
    assert any(t != greedy for t in hot)  # without the filter, temperature 1.5 does not give the greedy text
    for seed in range(4):
        assert _text(client, temperature=1.5, seed=seed, extra_body=field) == greedy, (field, seed)


def test_seed_reproduces(client: openai.OpenAI) -> None:
    first = _text(client, temperature=1.0, seed=11)
    assert _text(client, temperature=1.0, seed=11) == first
    assert _text(client, temperature=1.0, seed=12) != first


def test_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    assert _text(client, temperature=0, max_tokens=4, logit_bias={str(HELLO): 100}) == " hello" * 4
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logit_bias={str(HELLO): 100})
    assert chat.choices[0].message.content == " hello" * 3


def test_ignore_eos(client: openai.OpenAI) -> None:
    forced = {str(EOS): 100}
    stopped = _complete(client, temperature=0, logit_bias=forced)
    assert stopped.finish_reason == "stop" and stopped.text == ""
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=forced,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 6


def test_stop_token_ids(client: openai.OpenAI) -> None:
    forced = {str(HELLO): 100}
    assert _complete(client, temperature=0, max_tokens=5, logit_bias=forced).finish_reason == "length"
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias=forced,
                                     extra_body={"stop_token_ids": [HELLO]})
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 1


def test_skip_special_tokens(client: openai.OpenAI) -> None:
    forced = {str(BOS): 100}
    assert _text(client, temperature=0, max_tokens=2, logit_bias=forced) == ""
    shown = _text(client, temperature=0, max_tokens=2, logit_bias=forced, extra_body={"skip_special_tokens": False})
    assert shown == "<｜begin▁of▁sentence｜>" * 2


def test_generation_config_is_the_default(client: openai.OpenAI) -> None:
    # Needs the server to pass the checkpoint's generation_defaults() to the request builder.
    greedy = _text(client, temperature=0, max_tokens=12)
    assert _text(client, max_tokens=12) == greedy
    assert _text(client, max_tokens=12) == greedy
    messages = [{"role": "user", "content": "Hi"}]
    chats = [client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, **kw).choices[0]
             .message.content for kw in ({}, {}, {"temperature": 0})]
    assert chats[0] == chats[1] == chats[2]


def test_openai_metadata_is_accepted(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, user="u-1", metadata={"k": "v"}, store=False,
                                          service_tier="auto", response_format={"type": "text"}, n=1,
                                          extra_body={"best_of": 1})
    assert resp.choices[0].finish_reason in ("stop", "length")


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
REFUSED = [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
     "no tool-call tokens"),
    ("chat", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, "tool_choice", "not one of the tools"),
    ("chat", {"functions": [{"name": "f"}]}, "functions", "legacy functions API"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ("text", {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.name",
     "required"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "Invalid type"),
    ("text", {"guided_regex": "[a-", "guided_choice": ["a"]}, "guided_regex", "only one of"),
    ("text", {"guided_grammar": "root ::= x"}, "guided_grammar", "not supported"),
    ("text", {"suffix": "return x"}, "suffix", "fill-in-the-middle"),
    ("chat", {"max_token": 5}, "max_token", "did you mean 'max_tokens'"),
    ("text", {"temprature": 0}, "temprature", "did you mean 'temperature'"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ("chat", {"best_of": 2}, "best_of", "must equal n"),
    ("chat", {"logit_bias": {"hello": 5}}, "logit_bias", "token ids"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
    ("chat", {"top_k": -2}, "top_k", "greater than or equal to -1"),
    ("chat", {"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ("chat", {"stop_token_ids": [-1]}, "stop_token_ids", "greater than or equal to 0"),
    ("chat", {"ignore_eos": "yes"}, "ignore_eos", "boolean"),
    ("chat", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls.0.function", "required"),
    ("chat", {"messages": [{"role": "tool", "content": "3", "tool_call_id": "c"}]}, "messages",
     "no tool-call tokens"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages.0", "content is required"),
]


@pytest.mark.parametrize(("kind", "change", "param", "says"), REFUSED)
def test_unimplemented_or_invalid_field_is_a_400_naming_it(port: int, kind: str, change: dict, param: str, says: str
                                                           ) -> None:
    path, base = ("/v1/chat/completions", CHAT) if kind == "chat" else ("/v1/completions", COMPLETION)
    status, body, _ = _post(port, path, {**base, **change}, key=None)
    assert status == 400, body
    got = body["error"]["param"] or ""
    assert got.startswith(param) and body["error"]["message"].startswith(f"{got}: "), body
    assert says in body["error"]["message"], body


def test_refusals_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tools: this model's tokenizer has no tool-call tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError, match="suffix: this model's tokenizer has no fill-in-the-middle"):
        client.completions.create(model=NAME, prompt="def f(", suffix="    return x", max_tokens=2)


def test_logit_bias_outside_the_vocabulary_is_a_400(port: int) -> None:
    # Needs the server to pass vocab_size to the request builder.
    status, body, _ = _post(port, "/v1/chat/completions", {**CHAT, "logit_bias": {str(CFG.vocab_size): 1}}, key=None)
    assert status == 400 and "logit_bias" in body["error"]["message"] and "vocabulary" in body["error"]["message"]
    assert _post(port, "/v1/chat/completions", CHAT, key=None)[0] == 200  # and the server still serves
