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
import re
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from dsv2.infer import CompletionOutput, SamplingParams

Refusals = dict[str, tuple[str, tuple[Any, ...]]]  # field -> (why not, the values that change nothing)
_TOOLS = "tool calls are not supported by dsv2"


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
        for name, value in data.items():
            if name in cls.model_fields:
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
        return {k: v for k, v in data.items() if k in cls.model_fields}


def _error(name: str, value: Any, kind: str, message: str) -> InitErrorDetails:  # noqa: ANN401
    # The server's error handler prints "{loc}: {msg}", so the message does not repeat the field's name.
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=(name,), input=value)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    # A participant's name: no chat template of the DeepSeek family renders it (nor does OpenAI's model
    # see it as text), so it is accepted and left out of what the template gets.
    name: str | None = Field(None, exclude=True)

    refused_fields: ClassVar[Refusals] = {"tool_calls": (_TOOLS, ([],)), "function_call": (_TOOLS, ()),
                                          "audio": ("audio is not supported by dsv2", ())}

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

# The OpenAI features dsv2 does not have yet, refused by name on both endpoints.
_REFUSED: Refusals = {
    "tools": (_TOOLS, ([],)), "tool_choice": (_TOOLS, ("none",)), "functions": (_TOOLS, ([],)),
    "function_call": (_TOOLS, ("none",)), "parallel_tool_calls": (_TOOLS, ()),
    "response_format": ('structured output is not supported yet; only {"type": "text"} is', ({"type": "text"},)),
    "guided_json": ("structured output is not supported yet", ()),
    "guided_regex": ("structured output is not supported yet", ()),
    "guided_choice": ("structured output is not supported yet", ()),
    "guided_grammar": ("structured output is not supported yet", ()),
    "audio": ("audio output is not supported by dsv2", ()),
    "modalities": ('dsv2 answers in text only; modalities can only be ["text"]', (["text"],)),
    "prediction": ("predicted outputs are not supported by dsv2", ()),
    "web_search_options": ("web search is not supported by dsv2", ()),
    "reasoning_effort": ("not supported: DeepSeek-V2 is not a reasoning model", ()),
}

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
                              **knobs)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    refused_fields: ClassVar[Refusals] = {**_REFUSED,
                                          "suffix": ("fill-in-the-middle `suffix` is not supported yet", ("",))}

    prompt: str | list[str] | list[int] | list[list[int]]
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
