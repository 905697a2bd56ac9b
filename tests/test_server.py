"""`dsv2 serve` as a real process on a loopback port, spoken to by the official `openai` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from dsv2 import Transformer, save
from dsv2.infer import LLM, SamplingParams
from dsv2.tokenizer import named_tokenizer_dir
from tests.conftest import randomize_, small_config

KEY = "sk-test-123"
NAME = "tiny-v2"
CFG = small_config(vocab_size=102400, bos_token_id=100000, eos_token_id=100001, max_position_embeddings=512,
                   rope_scaling=None)


def write_checkpoint(path: Path) -> Path:
    """The served test model: CFG's random weights (seed 17) with the real DeepSeek-V2 tokenizer beside them."""
    save(randomize_(Transformer(CFG), seed=17), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(named_tokenizer_dir("deepseek-v2") / name, path / name)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("served"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: Path | None, *extra: str, launcher: tuple[str, ...] = ("dsv2.cli",)) -> tuple[subprocess.Popen, int]:
    """`dsv2 serve` on a free loopback port: `ckpt` served as NAME, or (None) the shipped default model.
    launcher: the module (and its arguments) that runs the command line, `python -m dsv2.cli` by default."""
    port = _free_port()
    model = ["--model", str(ckpt), "--served-model-name", NAME] if ckpt is not None else []
    cmd = [sys.executable, "-m", *launcher, "serve", *model, "--port", str(port), "--dtype", "float32",
           "--max-cache-tokens", "4096", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DSV2_API_KEY": ""})
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if _raw(port, "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up")


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM, as a service manager would; returns what the server printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM, nothing on stderr
    assert proc.returncode in (0, -15), proc.returncode
    assert "Traceback" not in out, out
    return out


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[int]:
    proc, port = _start(ckpt, "--api-key", KEY)
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def client(server: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _raw(port: int, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None
         ) -> tuple[int, dict | str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read().decode()
        try:
            parsed: dict | str = json.loads(data)
        except json.JSONDecodeError:
            parsed = data
        return resp.status, parsed, dict(resp.getheaders())
    finally:
        conn.close()


def _post(port: int, path: str, payload: object, key: str | None = KEY) -> tuple[int, dict | str, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return _raw(port, "POST", path, body, headers)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def local(ckpt: Path) -> LLM:
    return LLM(ckpt, dtype=torch.float32, max_cache_tokens=4096)


def test_chat_matches_llm_generate_and_counts_usage(client: openai.OpenAI, local: LLM) -> None:
    resp = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    [ref] = local.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0))
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == NAME
    assert abs(resp.created - time.time()) < 120


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    args = dict(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_prompts_echo_and_stream(server: int, client: openai.OpenAI, local: LLM) -> None:
    resp = client.completions.create(model=NAME, prompt=["Hello", "The sky is"], max_tokens=8, temperature=0)
    refs = local.generate(["Hello", "The sky is"], SamplingParams(max_tokens=8, temperature=0))
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in refs]
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    ids = refs[0].prompt_token_ids
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert by_ids.choices[0].text == local.tokenizer.decode(ids) + refs[0].outputs[0].text
    # a string prompt is echoed as sent, without the BOS token the tokenizer put before it
    by_text = client.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=0, echo=True)
    assert by_text.choices[0].text == "Hello" + refs[0].outputs[0].text
    # text_offset counts from the start of the prompt, echoed or not (OpenAI's legacy completions)
    lp = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0, logprobs=1)
    assert lp.choices[0].logprobs.text_offset[0] == len("Hello")
    pieces = lp.choices[0].logprobs.tokens
    assert lp.choices[0].logprobs.text_offset == [len("Hello") + len("".join(pieces[:i])) for i in range(3)]
    status, body, _ = _post(server, "/v1/completions", {"model": NAME, "prompt": "Hi", "echo": True, "logprobs": 1})
    assert status == 400 and body["error"]["param"] == "echo"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Hello", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == refs[0].outputs[0].text


def test_n_stop_seed_and_logprobs(client: openai.OpenAI) -> None:
    two = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, n=2, temperature=1.0, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    greedy = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[5:8]
    stopped = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_models_health_and_auth(server: int, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert _raw(server, "GET", "/health")[0] == 200
    for key in (None, "wrong"):
        status, body, _ = _post(server, "/v1/chat/completions", {"model": NAME, "messages": MESSAGES}, key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()
    status, body, _ = _post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


BAD_CHAT = [
    ({"temperature": 3}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"), ({"n": 100}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"), ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"), ({"frequency_penalty": -9}, "frequency_penalty"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"), ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": " ".join(map(str, range(600)))}]}, "messages"), ({"stream": "maybe"}, "stream"),
    ({"model": 5}, "model"), ({"logprobs": "yes"}, "logprobs"),
]


def test_each_invalid_field_is_a_400_naming_it(server: int) -> None:
    for change, param in BAD_CHAT:
        payload = {"model": NAME, "messages": MESSAGES, **change}
        status, body, _ = _post(server, "/v1/chat/completions", payload)
        assert status == 400, (change, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert (body["error"]["param"] or "").startswith(param), (change, body)


def test_malformed_requests_never_give_5xx(server: int) -> None:
    cases: list[tuple[str, str, bytes | str | None]] = [
        ("POST", "/v1/chat/completions", b"{not json"), ("POST", "/v1/chat/completions", b""),
        ("POST", "/v1/chat/completions", b"[]"), ("POST", "/v1/chat/completions", b"null"),
        ("POST", "/v1/chat/completions", "\xff\xfe".encode("latin-1")), ("POST", "/v1/completions", b"{}"),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": []})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": [[]]})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": [-1, 5]})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": [10**9]})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "hi", "logprobs": 9})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "hi", "echo": "no"})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": {"a": 1}})),
        ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": " ".join(map(str, range(600)))})),
        ("GET", "/v1/chat/completions", None), ("PUT", "/v1/models", b"{}"), ("GET", "/v1/nothing", None),
        ("POST", "/v1/chat/completions", b"x" * (5 * 1024 * 1024)),
    ]
    cases += [("POST", "/v1/chat/completions", json.dumps({"model": NAME, "messages": MESSAGES, **c}))
              for c, _ in BAD_CHAT]
    cases += [("POST", "/v1/chat/completions", json.dumps(v)) for v in (1, "s", True, {"model": NAME},
                                                                          {"messages": MESSAGES})]
    cases += [("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "hi", **c})) for c in (
        {"max_tokens": 0}, {"max_tokens": "5"}, {"temperature": "hot"}, {"n": 1.5}, {"top_p": -1},
        {"stop": 7}, {"stream_options": {"include_usage": "y"}}, {"max_tokens": 10**7})]
    assert len(cases) >= 50
    for method, path, body in cases:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        status, resp, _ = _raw(server, method, path, body, headers)
        assert 400 <= status < 500, (method, path, str(body)[:80], status, resp)
        assert isinstance(resp, dict) and "message" in resp["error"], resp
    status, body, _ = _post(server, "/v1/chat/completions", b"x" * (5 * 1024 * 1024))
    assert status == 400 and "exceeds" in body["error"]["message"]


def _metric(port: int, name: str) -> float:
    _, text, _ = _raw(port, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "{" not in name):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_concurrent_streams_with_disconnects(server: int, client: openai.OpenAI) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stream = client.chat.completions.create(model=NAME, max_tokens=40 if i >= 8 else 400, temperature=0,
                                                    stream=True, messages=[{"role": "user", "content": f"Count to {i}"}])
            text = ""
            for n, chunk in enumerate(stream):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if i < 8 and n == 3:
                    stream.close()  # the client goes away mid-stream
                    return
            results[i] = text
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == list(range(8, 32))
    for i in (8, 20, 31):
        ref = client.chat.completions.create(model=NAME, max_tokens=40, temperature=0,
                                             messages=[{"role": "user", "content": f"Count to {i}"}])
        assert results[i] == ref.choices[0].message.content
    deadline = time.time() + 10
    while _metric(server, "dsv2_cache_blocks_used") != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert _metric(server, "dsv2_cache_blocks_used") == 0
    assert _metric(server, "dsv2_running") == 0
    assert _metric(server, 'dsv2_requests_total{status="499"}') == 8  # the disconnects were aborted
    assert _metric(server, "dsv2_time_to_first_token_seconds_count") > 0
    assert _metric(server, "dsv2_generation_tokens_total") > 0


def test_full_queue_gets_429_with_retry_after(ckpt: Path) -> None:
    proc, port = _start(ckpt, "--max-concurrent", "1", "--max-queue", "0")
    try:
        slow = threading.Thread(target=_post, args=(port, "/v1/completions",
                                                    {"model": NAME, "prompt": "Hi", "max_tokens": 300,
                                                     "temperature": 0}, None))
        slow.start()
        time.sleep(1.0)
        status, body, headers = _post(port, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2}, None)
        slow.join()
        assert status == 429 and headers.get("retry-after") == "1" and body["error"]["type"] == "rate_limit_error"
        assert _post(port, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2}, None)[0] == 200
    finally:
        _stop(proc)


def test_sigterm_ends_in_flight_streams_cleanly(ckpt: Path) -> None:
    # No grace: the stream in flight is aborted at once, and still ends with an error event (OpenAI has no
    # finish_reason for it) that the client reports, not a cut connection.
    proc, port = _start(ckpt, "--graceful-timeout", "0")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.completions.create(model=NAME, prompt="Hi", max_tokens=400, temperature=0, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    out: list[str] = []
    stopper = threading.Thread(target=lambda: out.append(_stop(proc)))
    stopper.start()
    with pytest.raises(openai.APIError, match="the server is shutting down"):
        for chunk in stream:
            assert not chunk.choices or chunk.choices[0].finish_reason is None
    stopper.join()
    assert "dsv2: shutting down" in out[0] and "stopped serving" in out[0]


def test_a_model_without_tokenizer_takes_token_ids_and_refuses_echo() -> None:
    """echo of token ids needs the tokenizer to turn them back into text: a 400 without one (before: a 500)."""
    from fastapi.testclient import TestClient

    from dsv2.serve import ServerConfig, create_app

    llm = LLM(randomize_(Transformer(small_config()), seed=3), max_cache_tokens=256)
    with TestClient(create_app(llm, ServerConfig([NAME]))) as client:
        ok = client.post("/v1/completions", json={"model": NAME, "prompt": [5, 6, 7], "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        echo = client.post("/v1/completions", json={"model": NAME, "prompt": [5, 6, 7], "max_tokens": 3, "echo": True})
        assert echo.status_code == 400 and "no tokenizer" in echo.json()["error"]["message"]
        chat = client.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES})
        assert chat.status_code == 400 and "no tokenizer" in chat.json()["error"]["message"]
