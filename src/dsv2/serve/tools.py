"""Tool calls in DeepSeek's format: the tool list in the prompt, a grammar that forces a call, and the parser that
turns the model's call tokens into OpenAI `tool_calls` (whole responses and streams).

The format is the one DeepSeek-V2.5's chat template writes for an assistant turn that called tools:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

A model can call tools when its tokenizer has those marker tokens and its template renders `tool_calls`. Where
the template does not render the tool list itself (V2.5's does not), the list goes into the system message in the
model card's format: "## Tools / ### Function / You have the following functions available:" and one JSON block
per function.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsv2.infer import Grammar
from dsv2.tokenizer import Tokenizer

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>.*?)" + re.escape(SEP) + r"(?P<name>.*?)\n```json\n"
                   r"(?P<arguments>.*?)\n```" + re.escape(CALL_END), re.DOTALL)


def unsupported_reason(tokenizer: Tokenizer) -> str | None:
    """Why this model cannot call tools, or None if it can."""
    missing = [m for m in MARKERS if tokenizer.added_token_id(m) is None]
    if missing:
        return f"this model's tokenizer has no tool-call tokens ({', '.join(missing)})"
    if "tool_calls" not in (tokenizer.chat_template or ""):
        return "this model's chat template does not render tool calls"
    return None


def system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool list as DeepSeek-V2.5's model card writes it into the system message."""
    blocks = "".join(f"- `{t['function']['name']}`:\n```json\n{json.dumps(t['function'], indent=4)}\n```\n"
                     for t in tools)
    return f"## Tools\n\n### Function\n\nYou have the following functions available:\n\n{blocks}"


def with_tools(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template keywords) that put `tools` in front of the model: through the template's own `tools`
    variable when it reads one, else appended to the system message (one is added if there is none)."""
    if re.search(r"\btools\b", tokenizer.chat_template or ""):
        return messages, {"tools": list(tools)}
    block = system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]], {}
    return [{"role": "system", "content": block}, *messages], {}


def forced_call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool = True) -> Grammar:
    """Output that is one call (or, with `parallel`, one or more) of these tools, each with arguments that match
    its parameter schema, and nothing else."""
    functions = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        head = json.dumps(f"{fn['name']}\n```json\n")
        schema = fn.get("parameters") or {"type": "object"}
        functions.append(f"f{i}: {head} a{i} \"\\n```\" {CALL_END}\na{i}: %json {json.dumps(schema)}")
    more = ' ("\\n" call)*' if parallel else ""
    lark = (f"start: {CALLS_BEGIN} call{more} {CALLS_END}\n"
            f"call: {CALL_BEGIN} \"function\" {SEP} ({' | '.join(f'f{i}' for i in range(len(tools)))})\n"
            + "\n".join(functions))
    return Grammar.lark(lark)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse(text: str, eos_token: str | None) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a finished reply decoded with its special tokens: the text before the calls, and the
    calls in order. A reply without the calls marker is all content."""
    text = _strip_eos(text, eos_token)
    head, found, rest = text.partition(CALLS_BEGIN)
    if not found:
        return text, []
    return head, [ParsedCall(m["name"].strip(), m["arguments"].strip()) for m in _CALL.finditer(rest)]


def _strip_eos(text: str, eos_token: str | None) -> str:
    return text[: -len(eos_token)] if eos_token and text.endswith(eos_token) else text


class StreamParser:
    """The same split, one text delta at a time: `push` returns (content delta, calls completed by it). Text that
    could be the start of the calls marker is held back until it is known not to be."""

    def __init__(self, eos_token: str | None) -> None:
        self.eos = eos_token
        self.text = ""
        self._content_sent = 0
        self._calls_at: int | None = None  # where CALLS_BEGIN starts, once seen
        self._calls_sent = 0

    def push(self, delta: str, final: bool = False) -> tuple[str, list[ParsedCall]]:
        self.text += delta
        text = _strip_eos(self.text, self.eos) if final else self.text
        if self._calls_at is None:
            at = text.find(CALLS_BEGIN)
            if at >= 0:
                self._calls_at = at
        content_end = self._calls_at if self._calls_at is not None else (
            len(text) if final else len(text) - _marker_prefix_len(text))
        content = text[self._content_sent:content_end] if content_end > self._content_sent else ""
        self._content_sent = max(self._content_sent, content_end)
        calls: list[ParsedCall] = []
        if self._calls_at is not None:
            found = [ParsedCall(m["name"].strip(), m["arguments"].strip())
                     for m in _CALL.finditer(text, self._calls_at)]
            calls, self._calls_sent = found[self._calls_sent:], len(found)
        return content, calls

    @property
    def calls_sent(self) -> int:
        return self._calls_sent

    @property
    def called(self) -> bool:
        return self._calls_sent > 0


def _marker_prefix_len(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of CALLS_BEGIN."""
    for n in range(min(len(CALLS_BEGIN) - 1, len(text)), 0, -1):
        if CALLS_BEGIN.startswith(text[-n:]):
            return n
    return 0
