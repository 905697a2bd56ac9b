"""A Coder/V2.5-style checkpoint served by a real `dsv2 serve`, driven by the official `openai` client:
fill-in-the-middle through `suffix`, JSON-schema output, and a tool-call round trip (streamed too).

The checkpoint is the served test model's random weights with the real DeepSeek-V2 tokenizer, to which the FIM,
tool-call and turn tokens are added, and xinference's copy of DeepSeek-V2.5's chat template (the template that
renders tool calls and tool results; tests/test_chat_templates.py names its source). A random model never calls a
tool by itself: a required or named tool_choice forces the call through the grammar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import tokenizers

from dsv2.infer import LLM, SamplingParams
from dsv2.serve import tools
from dsv2.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer
from tests.test_grammar import SCHEMA, validate
from tests.test_server import NAME, _start, _stop, write_checkpoint

TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "xinference-deepseek-v2.5.json"
ADDED = [FIM_HOLE, FIM_BEGIN, FIM_END, "<｜User｜>", "<｜Assistant｜>", *tools.MARKERS, "<｜tool▁outputs▁begin｜>",
         "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("served_variant"))
    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.add_special_tokens(ADDED)
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = json.loads(TEMPLATE.read_text(encoding="utf-8"))["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return path


@pytest.fixture(scope="module")
def client(ckpt: Path) -> Iterator[openai.OpenAI]:
    proc, port = _start(ckpt)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    _stop(proc)


@pytest.fixture(scope="module")
def local(ckpt: Path) -> LLM:
    return LLM(ckpt, dtype="float32", max_cache_tokens=4096)


def test_fim_with_suffix_returns_the_middle(client: openai.OpenAI, local: LLM) -> None:
    prefix, suffix = "def area(r):\n    ", "\n    return result\n"
    resp = client.completions.create(model=NAME, prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
    ids = local.tokenizer.fim_prompt(prefix, suffix)
    want = local.generate(ids, SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert resp.choices[0].text == want.text and resp.usage.prompt_tokens == len(ids)
    # and without the suffix it is an ordinary completion of the prefix, a different prompt
    plain = client.completions.create(model=NAME, prompt=prefix, max_tokens=8, temperature=0)
    assert plain.usage.prompt_tokens == len(local.tokenizer.encode(prefix)) < len(ids)


def test_json_schema_output_validates_every_time(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        resp = client.chat.completions.create(model=NAME, messages=ASK, response_format=fmt, temperature=1.0,
                                              seed=seed, max_tokens=150)
        assert resp.choices[0].finish_reason == "stop"
        validate(json.loads(resp.choices[0].message.content))
    stream = client.chat.completions.create(model=NAME, messages=ASK, response_format=fmt, temperature=1.0, seed=0,
                                            max_tokens=150, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == client.chat.completions.create(model=NAME, messages=ASK, response_format=fmt,
                                                      temperature=1.0, seed=0, max_tokens=150
                                                      ).choices[0].message.content


def test_json_object_and_completions_guided_choice(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=NAME, messages=ASK, response_format={"type": "json_object"},
                                          max_tokens=3)
    assert resp.choices[0].message.content.startswith("{")
    pick = client.completions.create(model=NAME, prompt="Pick:", max_tokens=5, temperature=1.0, seed=2,
                                     extra_body={"guided_choice": ["left", "right"]})
    assert pick.choices[0].text in ("left", "right") and pick.choices[0].finish_reason == "stop"


def _args_ok(call: Any) -> dict[str, Any]:  # noqa: ANN401
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"} and args["city"] in ("Paris", "Rome", "Oslo") and args["unit"] in "CF"
    else:
        assert call.function.name == "get_time" and set(args) == {"zone"} and len(args["zone"]) <= 5
    return args


def test_tool_call_round_trip(client: openai.OpenAI, local: LLM) -> None:
    auto = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], max_tokens=6)
    assert auto.choices[0].message.tool_calls is None  # a random model does not call a tool unforced
    assert auto.choices[0].finish_reason in ("stop", "length")

    first = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           temperature=1.0, seed=1, max_tokens=200)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id for c in calls)
    for c in calls:
        _args_ok(c)

    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
               *[{"role": "tool", "tool_call_id": c.id, "content": "18 degrees, sunny"} for c in calls]]
    final = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                           max_tokens=5)
    assert final.choices[0].message.tool_calls is None and isinstance(final.choices[0].message.content, str)
    # The tool results reached the model through the template, with the tool list in the system message.
    template_messages = [{k: v for k, v in m.items() if v is not None or k == "content"} for m in history]
    rendered, extra = tools.with_tools(local.tokenizer, template_messages, [WEATHER, TIME])
    text = local.tokenizer.apply_chat_template(rendered, **extra)
    assert "<｜tool▁output▁begin｜>18 degrees, sunny<｜tool▁output▁end｜>" in text and "`get_time`" in text
    assert final.usage.prompt_tokens == len(local.tokenizer.apply_chat_template(rendered, tokenize=True, **extra))


def test_named_tool_choice_makes_exactly_that_call(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TIME], temperature=1.0, seed=3,
                                          tool_choice={"type": "function", "function": {"name": "get_time"}},
                                          max_tokens=100)
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_time"
    _args_ok(calls[0])


def test_streamed_tool_calls_equal_the_whole_response(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": NAME, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
                          "temperature": 1.0, "seed": 4, "max_tokens": 200}
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                  for c in whole.message.tool_calls]


def test_stream_parser_holds_back_a_split_marker() -> None:
    parser = tools.StreamParser("<｜end▁of▁sentence｜>")
    call = f"{tools.CALL_BEGIN}function{tools.SEP}f\n```json\n{{}}\n```{tools.CALL_END}"
    pieces = ["Sure", ". <｜tool▁", "calls▁begin｜>", call[:10], call[10:], tools.CALLS_END]
    out = [parser.push(p) for p in pieces]
    assert "".join(c for c, _ in out) == "Sure. "
    assert [len(calls) for _, calls in out] == [0, 0, 0, 0, 1, 0]
    assert out[4][1][0].name == "f" and out[4][1][0].arguments == "{}"
    assert tools.parse("Sure. " + tools.CALLS_BEGIN + call + tools.CALLS_END + "<｜end▁of▁sentence｜>",
                       "<｜end▁of▁sentence｜>")[0] == "Sure. "


def test_a_model_without_tool_tokens_refuses_tools_clearly() -> None:
    tok = Tokenizer.from_name("deepseek-v2")
    assert "tool-call tokens" in tools.unsupported_reason(tok)
