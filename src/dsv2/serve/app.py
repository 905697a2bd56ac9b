"""The OpenAI-compatible HTTP API: routes, streaming, auth, limits, metrics.

Every client mistake becomes a 4xx with OpenAI's error JSON ({"error": {"message", "type", "param",
"code"}}); a 5xx means the engine failed (the request's step raised: 500; the engine is gone or the server is
stopping: 503) and never carries a stack trace. A stream that fails after it started ends with an error event,
then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv2.infer import LLM, CompletionOutput, EngineDeadError, RequestOutput, SamplingParams
from dsv2.serve.engine_loop import EngineLoop
from dsv2.serve.metrics import Metrics
from dsv2.serve import tools
from dsv2.serve.protocol import (ChatCompletionRequest, CompletionRequest, NamedToolChoice, error_body, new_id, now,
                                 usage)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_concurrent: int = 64  # requests the engine runs at once (its max_num_seqs)
    max_queue: int = 256  # requests waiting beyond those; more get 429
    max_body_bytes: int = 4 * 1024 * 1024
    log_requests: bool = True  # one access-log line per request on the "dsv2.access" logger


access_log = logging.getLogger("dsv2.access")


def create_app(llm: LLM, config: ServerConfig, on_fatal: Callable[[BaseException], None] | None = None
               ) -> FastAPI:
    """on_fatal: called (from the engine thread) when the engine cannot go on; `dsv2 serve` stops the process."""
    engine = EngineLoop(llm, on_fatal)
    metrics = Metrics(lambda: engine.stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        logging.getLogger("dsv2").info("stopped serving")

    app = FastAPI(title="dsv2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    _install_error_handlers(app, metrics)
    _install_body_limit(app, config.max_body_bytes, metrics)
    if config.log_requests:
        app.add_middleware(_AccessLog)
    auth = _auth_dependency(config.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        reason = str(engine.dead) if engine.dead is not None else "the engine is not running"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": now(), "owned_by": "dsv2"}
                for name in config.served_model_names]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        _check_model(req.model, config)
        prompt = _chat_prompt(_tokenizer(llm), req)
        params = _params(req, llm, len(prompt), req.requested_max_tokens, req.num_logprobs, "messages")
        calling = bool(req.tools) and req.tool_choice != "none"
        if calling:
            params = _tool_params(req, params)
        await _check_grammar(llm, params, "tools" if calling and params.grammar else _grammar_field(req))
        job = _Job(engine, metrics, config, new_id("chatcmpl"), [prompt], params, req.model, "chat",
                   parse_tools=calling)
        return await job.respond(request, req.stream,
                                 bool(req.stream_options and req.stream_options.include_usage))

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check_model(req.model, config)
        given = req.prompts()
        prompts = _completion_prompts(llm, given, req.suffix)
        if any(not p for p in prompts):
            raise APIError(400, "prompt is empty", param="prompt")
        bad = [t for p in prompts for t in p if not 0 <= t < llm.cfg.vocab_size]
        if bad:
            raise APIError(400, f"token ids outside the vocabulary [0, {llm.cfg.vocab_size}): {bad[:5]}",
                           param="prompt")
        params = _params(req, llm, max(map(len, prompts)), req.max_tokens, req.logprobs, "prompt")
        await _check_grammar(llm, params, _grammar_field(req))
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs asks for the prompt's logprobs, which dsv2 does not compute yet",
                           param="echo")
        # The prompt as the client sent it (echo returns it; text_offset counts from its start): a string as
        # it came, without the BOS the tokenizer adds; token ids decoded (only when needed), BOS included if sent.
        needs_text = req.echo or req.logprobs is not None
        texts = [p if isinstance(p, str) else _tokenizer(llm).decode(p) if needs_text else "" for p in given]
        job = _Job(engine, metrics, config, new_id("cmpl"), prompts, params, req.model, "text", echo=req.echo,
                   prompt_texts=texts)
        return await job.respond(request, req.stream,
                                 bool(req.stream_options and req.stream_options.include_usage))

    return app


# ---------------------------------------------------------------------------------------------- a request
class _Job:
    """One HTTP request: one or more prompts, each an engine request with n completions."""

    def __init__(self, engine: EngineLoop, metrics: Metrics, config: ServerConfig, response_id: str,
                 prompts: list[list[int]], params: SamplingParams, model: str, kind: str, echo: bool = False,
                 prompt_texts: list[str] | None = None, parse_tools: bool = False) -> None:
        """parse_tools: the replies are decoded with special tokens and split into content and tool_calls."""
        self.engine, self.metrics, self.config = engine, metrics, config
        self.parse_tools = parse_tools
        self._parsers: dict[tuple[int, int], tools.StreamParser] = {}
        self.id, self.prompts, self.params, self.model, self.kind = response_id, prompts, params, model, kind
        self.echo, self.tokenizer = echo, engine.llm.tokenizer
        self.prompt_texts = prompt_texts or [""] * len(prompts)
        self.created = now()
        self.request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]

    async def respond(self, request: Request, stream: bool, include_usage: bool) -> Response:
        if not self.engine.healthy:
            raise _engine_gone(self.engine)
        if self.engine.in_flight + len(self.prompts) > self.config.max_concurrent + self.config.max_queue:
            raise APIError(429, "the server is busy: too many requests in flight; retry shortly",
                           type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.started = time.perf_counter()
        self.usage = request.state.usage = {"prompt_tokens": sum(map(len, self.prompts)), "completion_tokens": 0}
        self.generated = [0] * len(self.prompts)
        queues = [self.engine.submit(rid, p, self.params) for rid, p in zip(self.request_ids, self.prompts)]
        if stream:
            return StreamingResponse(self._sse(queues, include_usage), media_type="text/event-stream")
        try:
            finals = [await self._last(p, q) for p, q in enumerate(queues)]
        finally:
            self._abort_unfinished()
        self.metrics.finished(self.usage["prompt_tokens"], self.usage["completion_tokens"])
        return JSONResponse(self._full_response(finals))

    async def _last(self, prompt: int, updates: asyncio.Queue) -> RequestOutput:
        timer = _TokenTimer(self.metrics, self.started)
        while True:
            item = await updates.get()
            if (error := self._error(item)) is not None:
                raise error
            timer.observe(item)
            self._progress(prompt, item)
            if item.finished:
                return item

    def _error(self, item: object) -> APIError | None:
        """What the client is told when an update is not progress: the prompt was refused (400), the engine
        failed this request's step (500), the server is stopping (503) or the engine is gone (503)."""
        if isinstance(item, ValueError):
            return APIError(400, str(item), param="prompt" if self.kind == "text" else "messages")
        if isinstance(item, EngineDeadError):
            return _engine_gone(self.engine)
        reasons = {o.finish_reason for o in item.outputs}
        if "error" in reasons:
            return APIError(500, f"the engine failed on this request ({item.error}); other requests are unaffected",
                            type_="server_error", code="engine_error")
        if "abort" in reasons:  # only the server aborts a request whose client is still there: it is stopping
            return APIError(503, "the server is shutting down; retry on another instance", type_="server_error",
                            code="server_shutting_down")
        return None

    def _progress(self, prompt: int, item: RequestOutput) -> None:
        """Keep the access log's token count current, so a stream the client left still logs what it got."""
        self.generated[prompt] = sum(len(o.token_ids) for o in item.outputs)
        self.usage["completion_tokens"] = sum(self.generated)

    def _abort_unfinished(self) -> None:
        for rid in self.request_ids:
            self.engine.abort(rid)  # a no-op for finished requests

    async def _sse(self, queues: list[asyncio.Queue], include_usage: bool) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, completion) -> (chars, tokens) sent
        finals: list[RequestOutput] = []
        done = False
        try:
            for p, updates in enumerate(queues):
                if self.kind == "chat":
                    for i in range(self.params.n):
                        yield _event(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]))
                timer = _TokenTimer(self.metrics, self.started)
                while True:
                    item = await updates.get()
                    if (error := self._error(item)) is not None:
                        done = True
                        self.metrics.rejected(error.status)
                        yield _event(error.body)
                        yield "data: [DONE]\n\n"
                        return
                    timer.observe(item)
                    self._progress(p, item)
                    choices = [c for o in item.outputs if (c := self._delta(p, o, sent)) is not None]
                    if choices:
                        yield _event(self._chunk(choices))
                    if item.finished:
                        finals.append(item)
                        break
            self.metrics.finished(self.usage["prompt_tokens"], self.usage["completion_tokens"])
            if include_usage:
                yield _event(self._chunk([], usage=self._usage(finals)))
            done = True
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects and the server cancels this generator
            self._abort_unfinished()
            if not done:
                self.metrics.rejected(499)  # nginx's "client closed request"

    # ---------------------------------------------------------------- shapes
    def _index(self, prompt: int, completion: int) -> int:
        return prompt * self.params.n + completion

    def _delta(self, prompt: int, out: CompletionOutput, sent: dict[tuple[int, int], tuple[int, int]]
               ) -> dict[str, Any] | None:
        key = (prompt, out.index)
        first = key not in sent
        text_from, tok_from = sent.get(key, (0, 0))
        text = out.text[text_from:]
        if self.kind == "text" and first and self.echo:
            text = self.prompt_texts[prompt] + text
        if not text and out.finish_reason is None:
            return None
        new_logprobs = out.logprobs[tok_from:] if out.logprobs is not None else None
        sent[key] = (len(out.text), len(out.token_ids))
        choice: dict[str, Any] = {"index": self._index(prompt, out.index), "finish_reason": out.finish_reason,
                                  "logprobs": self._logprobs(new_logprobs, prompt, text_from)}
        if self.kind == "chat" and self.parse_tools:
            return self._tool_delta(key, text, out, choice)
        if self.kind == "chat":
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        return choice

    def _tool_delta(self, key: tuple[int, int], text: str, out: CompletionOutput, choice: dict[str, Any]
                    ) -> dict[str, Any] | None:
        parser = self._parsers.setdefault(key, tools.StreamParser(self.tokenizer.eos_token))
        done_before = parser.calls_sent
        content, calls = parser.push(text, final=out.finish_reason is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [c.openai(index=done_before + i) for i, c in enumerate(calls)]
        if not delta and out.finish_reason is None:
            return None
        if out.finish_reason is not None and parser.called:
            choice["finish_reason"] = "tool_calls"
        choice["delta"] = delta
        return choice

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def _usage(self, finals: list[RequestOutput]) -> dict[str, int]:
        totals = [usage(len(f.prompt_token_ids), f.outputs) for f in finals]
        return {k: sum(t[k] for t in totals) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}

    def _full_response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, final in enumerate(finals):
            for o in final.outputs:
                choice: dict[str, Any] = {"index": self._index(p, o.index), "finish_reason": o.finish_reason,
                                          "logprobs": self._logprobs(o.logprobs, p, 0)}
                if self.kind == "chat" and self.parse_tools:
                    content, calls = tools.parse(o.text, self.tokenizer.eos_token)
                    choice["message"] = {"role": "assistant", "content": content if content or not calls else None}
                    if calls:
                        choice["message"]["tool_calls"] = [c.openai() for c in calls]
                        choice["finish_reason"] = "tool_calls"
                elif self.kind == "chat":
                    choice["message"] = {"role": "assistant", "content": o.text}
                else:
                    choice["text"] = (self.prompt_texts[p] if self.echo else "") + o.text
                choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage(finals)}

    def _logprobs(self, entries: list[Any] | None, prompt: int, text_from: int) -> dict[str, Any] | None:
        """text_from: where in the completion's text these entries start; text_offset counts from the start
        of the prompt, as OpenAI's does, echoed or not."""
        if entries is None:
            return None
        tok = self.tokenizer

        def piece(token_id: int) -> str:
            return tok.decode([token_id]) if tok is not None else str(token_id)

        if self.kind == "chat":
            return {"content": [{"token": piece(e.token_id), "logprob": e.logprob,
                                 "bytes": list(piece(e.token_id).encode()),
                                 "top_logprobs": [{"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
                                                  for t, lp in e.top]} for e in entries]}
        offsets, pos = [], len(self.prompt_texts[prompt]) + text_from
        for e in entries:
            offsets.append(pos)
            pos += len(piece(e.token_id))
        return {"tokens": [piece(e.token_id) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{piece(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


class _TokenTimer:
    """Time to first token and inter-token latency, per engine request, from its snapshots."""

    def __init__(self, metrics: Metrics, started: float) -> None:
        self.metrics, self.last, self.tokens = metrics, started, 0

    def observe(self, out: RequestOutput) -> None:
        tokens = sum(len(o.token_ids) for o in out.outputs)
        if tokens > self.tokens:
            t = time.perf_counter()
            if self.tokens == 0:
                self.metrics.ttft.observe(t - self.last)
            else:
                self.metrics.itl.observe((t - self.last) / (tokens - self.tokens))
            self.last, self.tokens = t, tokens


def _engine_gone(engine: EngineLoop) -> APIError:
    return APIError(503, f"the engine is not running ({engine.dead or 'stopped'}); this server cannot answer",
                    type_="server_error", code="engine_unavailable")


class _AccessLog:
    """One line per HTTP request when its response has gone out (a stream: when it ends or the client left):
    client, method, path, status, prompt/completion tokens where a generation ran, latency."""

    def __init__(self, app: Any) -> None:  # noqa: ANN401 (an ASGI app)
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_and_see(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            client = scope.get("client") or ("-", 0)
            usage = scope.get("state", {}).get("usage")
            tokens = f" prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}" \
                if usage else ""
            access_log.info('%s:%s "%s %s" %d%s %.3fs', client[0], client[1], scope["method"], scope["path"],
                            status[0], tokens, time.perf_counter() - started)


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- checks
def _check_model(name: str, config: ServerConfig) -> None:
    if name not in config.served_model_names:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {config.served_model_names}",
                       param="model", code="model_not_found")


def _tokenizer(llm: LLM) -> Any:  # noqa: ANN401
    if llm.tokenizer is None:
        raise APIError(400, "the served model has no tokenizer; send token ids to /v1/completions", param="prompt")
    return llm.tokenizer


def _chat_prompt(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:  # noqa: ANN401
    messages = [m.for_template() for m in req.messages]
    extra: dict[str, Any] = {}
    history = any(m.tool_calls or m.role == "tool" for m in req.messages)
    if req.tools or history:
        why = tools.unsupported_reason(tokenizer)
        if why is not None:
            param = "tools" if req.tools else "messages"
            raise APIError(400, f"{param}: {why}, so it cannot take {'tools' if req.tools else 'tool calls or results'}",
                           param=param, code="tools_not_supported")
    if req.tools:
        messages, extra = tools.with_tools(tokenizer, messages, [t.model_dump(exclude_none=True) for t in req.tools])
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e


def _tool_params(req: ChatCompletionRequest, params: SamplingParams) -> SamplingParams:
    """Tool calls are read from the special tokens, so those stay in the text; a required or named call is
    forced by a grammar over the tools' parameter schemas."""
    choice = req.tool_choice
    params = dataclasses.replace(params, skip_special_tokens=False)
    if choice not in ("required",) and not isinstance(choice, NamedToolChoice):
        return params
    if params.grammar is not None:
        raise APIError(400, "tool_choice: a required or named tool_choice already fixes the output; it cannot be "
                       "combined with response_format or guided_*", param="tool_choice")
    chosen = [t.model_dump() for t in req.tools
              if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]
    parallel = choice == "required" and req.parallel_tool_calls is not False
    return dataclasses.replace(params, grammar=tools.forced_call_grammar(chosen, parallel))


def _grammar_field(req: Any) -> str:  # noqa: ANN401
    return next((f for f in ("response_format", "guided_json", "guided_regex", "guided_choice")
                 if getattr(req, f) is not None), "response_format")


async def _check_grammar(llm: LLM, params: SamplingParams, param: str) -> None:
    """Compile the request's grammar (cached per grammar) off the event loop: an invalid one is a 400 here."""
    if params.grammar is None:
        return
    try:
        await asyncio.to_thread(llm.check_grammar, params)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param) from e


def _completion_prompts(llm: LLM, given: list[str | list[int]], suffix: str | None) -> list[list[int]]:
    """Token ids for each prompt; with a suffix, fill-in-the-middle prompts (the prompt is the prefix). A model
    without FIM tokens takes suffix "" (sent by clients that always fill the field) as no suffix."""
    if suffix is None or (suffix == "" and (llm.tokenizer is None or not llm.tokenizer.supports_fim)):
        return [_tokenizer(llm).encode(p) if isinstance(p, str) else p for p in given]
    tokenizer = _tokenizer(llm)
    if not tokenizer.supports_fim:
        raise APIError(400, "suffix: this model's tokenizer has no fill-in-the-middle tokens, so it cannot take a "
                       "suffix (DeepSeek-Coder-V2 checkpoints have them)", param="suffix", code="fim_not_supported")
    if not all(isinstance(p, str) for p in given):
        raise APIError(400, "prompt: a suffix needs the prompt as text (the prefix), not token ids", param="prompt")
    return [tokenizer.fim_prompt(p, suffix) for p in given]


def _params(req: Any, llm: LLM, prompt_len: int, max_tokens: int | None, logprobs: int | None,  # noqa: ANN401
            param: str) -> SamplingParams:
    room = llm.max_model_len - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {llm.max_model_len}",
                       param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {llm.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
    try:
        return req.sampling(max_tokens or room, logprobs, llm.generation_defaults, vocab_size=llm.cfg.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None)) from e


def _auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           type_="authentication_error", code="invalid_api_key")
    return check


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        metrics.rejected(e.status)
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        metrics.rejected(400)
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request")
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        metrics.rejected(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        metrics.rejected(500)
        return JSONResponse(error_body("internal server error", type_="server_error"), status_code=500)


def _install_body_limit(app: FastAPI, limit: int, metrics: Metrics) -> None:
    @app.middleware("http")
    async def body_limit(request: Request, call_next: Callable[..., Any]) -> Response:
        too_big = JSONResponse(error_body(f"request body exceeds {limit} bytes"), status_code=400)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            metrics.rejected(400)
            return too_big
        if length is None and request.method == "POST" and len(await request.body()) > limit:
            metrics.rejected(400)
            return too_big
        return await call_next(request)
