"""OpenAI request schemas (every field dsv2 honours) and the response/chunk builders.

Requests are validated by pydantic; every range below is OpenAI's (or, for the fields OpenAI lacks, vLLM's)
documented one, so an out-of-range value is the client's error (400) rather than the engine's. Every
SamplingParams field is accepted under vLLM's name. A field dsv2 does not implement is a 400 that names it,
never a 200 that silently dropped it: the known OpenAI features say what is missing (tools, structured
output, ...), anything else is an unknown field. Only metadata that changes no output (`user`, `metadata`,
`store`, `service_tier`) is accepted and ignored. A sampling field left unset (or null) takes the
checkpoint's default (generation_config.json), then SamplingParams' own.
"""

from __future__ import annotations

import difflib
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from dsv2.infer import CompletionOutput, Grammar, SamplingParams

Refusals = dict[str, tuple[str, tuple[Any, ...]]]  # field -> (why not, the values that change nothing)
_LEGACY_FUNCTIONS = "the legacy functions API is not supported; send `tools` (and `tool_choice`) instead"


class FieldError(ValueError):
    """A request field that is valid alone but not for this model (a logit_bias id past the vocabulary)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class _Strict(BaseModel):
    """strict: "yes" is not a boolean and "3" is not an integer; clients get a 400 instead of a guess.
    Fields outside the model are a 400 naming them, with the reason when it is an OpenAI feature dsv2 lacks."""

    model_config = ConfigDict(strict=True, extra="forbid")

    # field -> (why it is refused, the values that change nothing and are accepted, null among them)
    refused_fields: ClassVar[Refusals] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:  # noqa: ANN401
        if not isinstance(data, dict):
            return data  # pydantic's own "should be a valid dictionary"
        errors = []
        known = {f.alias or n for n, f in cls.model_fields.items()}
        for name, value in data.items():
            if name in known:
                continue
            if name in cls.refused_fields:
                why, harmless = cls.refused_fields[name]
                if value is None or any(value == h and type(value) is type(h) for h in harmless):
                    continue
                errors.append(_error(name, value, "unsupported_field", why))
            else:
                near = difflib.get_close_matches(name, list(cls.model_fields), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                errors.append(_error(name, value, "extra_forbidden", f"not a field dsv2 implements{hint}"))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return {k: v for k, v in data.items() if k in known}


def _error(name: str, value: Any, kind: str, message: str) -> InitErrorDetails:  # noqa: ANN401
    # The server's error handler prints "{loc}: {msg}", so the message does not repeat the field's name.
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=(name,), input=value)


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    # A participant's name: no chat template of the DeepSeek family renders it (nor does OpenAI's model
    # see it as text), so it is accepted and left out of what the template gets.
    name: str | None = Field(None, exclude=True)
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers

    refused_fields: ClassVar[Refusals] = {"function_call": (_LEGACY_FUNCTIONS, ()),
                                          "audio": ("audio is not supported by dsv2", ())}

    @model_validator(mode="after")
    def _content_where_needed(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "content is required (it may be null only in an assistant "
                                      "message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("unsupported_value", "only assistant messages carry tool_calls")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' shape: tool_calls with JSON-text arguments)."""
        return self.model_dump(exclude_none=True, exclude={"name"}) | {"content": self.content}

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:  # noqa: ANN401
        """Accept OpenAI's list-of-parts form when every part is text."""
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in value):
                raise ValueError("only text content parts are supported")
            return "".join(p["text"] for p in value)
        return value


Stop = Annotated[str, Field(min_length=1)]
Bias = Annotated[float, Field(ge=-100, le=100)]
TokenId = Annotated[int, Field(ge=0)]

# The OpenAI features dsv2 does not have, refused by name on both endpoints.
_REFUSED: Refusals = {
    "functions": (_LEGACY_FUNCTIONS, ([],)), "function_call": (_LEGACY_FUNCTIONS, ("none",)),
    "guided_grammar": ("not supported; use response_format, guided_json, guided_regex or guided_choice", ()),
    "audio": ("audio output is not supported by dsv2", ()),
    "modalities": ('dsv2 answers in text only; modalities can only be ["text"]', (["text"],)),
    "prediction": ("predicted outputs are not supported by dsv2", ()),
    "web_search_options": ("web search is not supported by dsv2", ()),
    "reasoning_effort": ("not supported: DeepSeek-V2 is not a reasoning model", ()),
}

class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")  # absent: any JSON value, as OpenAI's
    strict: bool | None = None  # dsv2's output always follows the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("unsupported_value", "json_schema is required with type \"json_schema\" "
                                      "and allowed only with it")
        return self


# SamplingParams fields a request names the same way, unset (None) unless the client sends them.
_KNOBS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
          "seed", "ignore_eos", "skip_special_tokens")


class _Sampling(_Strict):
    refused_fields: ClassVar[Refusals] = _REFUSED

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=16)
    best_of: int | None = Field(None, ge=1, le=16)  # accepted only as n: dsv2 returns every completion it samples
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: -1 or 0 = off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Bias] | None = None  # token id (as a string, JSON's only key type) -> bias
    stop: Stop | list[Stop] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = None
    # Structured output: OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    # OpenAI metadata: accepted, and changes nothing
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise PydanticCustomError("too_long", "at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = [k for k in value or {} if not re.fullmatch(r"[0-9]{1,9}", k)]
        if bad:
            raise PydanticCustomError("token_id", "keys must be token ids (non-negative integers, as strings), "
                                      "got {bad}", {"bad": repr(bad[:3])})
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if value is not None and value != n:
            raise PydanticCustomError("unsupported_value", "must equal n ({n}): dsv2 returns every completion "
                                      "it samples", {"n": n})
        return value

    def grammar(self) -> Grammar | None:
        """What the output must match, from whichever structured-output field is set (at most one)."""
        fmt = self.response_format
        given = {name: g for name, g in (
            ("response_format", None if fmt is None or fmt.type == "text" else
             Grammar.json_object() if fmt.type == "json_object" else Grammar.json_schema(
                 {"type": "object"} if fmt.json_schema.schema_ is True else fmt.json_schema.schema_)),
            ("guided_json", None if self.guided_json is None else Grammar.json_schema(self.guided_json)),
            ("guided_regex", None if self.guided_regex is None else Grammar.regex(self.guided_regex)),
            ("guided_choice", None if self.guided_choice is None else Grammar.lark(
                "start: " + " | ".join(json.dumps(c) for c in self.guided_choice))),
        ) if g is not None}
        if len(given) > 1:
            raise FieldError(sorted(given)[1], f"only one of {sorted(given)} may be set")
        return next(iter(given.values()), None)

    def sampling(self, max_tokens: int, logprobs: int | None, defaults: Mapping[str, Any], *,
                 vocab_size: int | None = None) -> SamplingParams:
        """The engine's SamplingParams: a field this request sets wins, else the checkpoint's `defaults`
        (generation_defaults()), else SamplingParams' own. With vocab_size, a logit_bias id past the
        vocabulary is a FieldError (a ValueError) here rather than in the engine's step."""
        knobs = {k: v for k, v in defaults.items() if k in _KNOBS}
        knobs.update({k: v for k in _KNOBS if (v := getattr(self, k)) is not None})
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        if vocab_size is not None and bias and max(bias) >= vocab_size:
            raise FieldError("logit_bias", f"token id {max(bias)} is outside the vocabulary [0, {vocab_size})")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, n=self.n or 1, stop=stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), logit_bias=bias, logprobs=logprobs,
                              grammar=self.grammar(), **knobs)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # a forced call always follows the schema; an "auto" one is parsed as written


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("unsupported_value", "only allowed with `logprobs` set to true")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in value or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("unsupported_value", "two functions have the same name")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, value: Any, info: ValidationInfo) -> Any:  # noqa: ANN401
        tools = info.data.get("tools") or []
        if value not in (None, "none", "auto") and not tools:
            raise PydanticCustomError("unsupported_value", "a tool_choice other than none or auto needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in [t.function.name for t in tools]:
            raise PydanticCustomError("unsupported_value", "names {name!r}, which is not one of the tools",
                                      {"name": value.function.name})
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    # Fill in the middle: each prompt is the text before the hole, `suffix` the text after it.
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:  # noqa: ANN401
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, outputs: list[CompletionOutput]) -> dict[str, int]:
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
