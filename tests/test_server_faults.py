"""Faults inside a real `dsv2 serve` process: a model forward that raises on chosen calls (tests/fault_serve.py).
A failed step fails its own requests (500 JSON, or an error event then [DONE] in a stream) and the server goes
on; an engine that cannot go on makes /health say 503 and the process exit non-zero."""

from __future__ import annotations

import json
import time

import openai
from fastapi.testclient import TestClient

from dsv2.infer import LLM
from dsv2.serve import ServerConfig, create_app
from tests.test_server import NAME, _metric, _post, _raw, _start, ckpt  # noqa: F401 (ckpt: a fixture)

CHAT = {"model": NAME, "temperature": 0, "messages": [{"role": "user", "content": "Count to ten."}]}


def _stream_events(port: int, payload: dict) -> list[str]:
    """The raw `data:` payloads of a streamed request."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({**payload, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        return [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    finally:
        conn.close()


def test_a_failed_step_fails_only_its_requests(ckpt) -> None:  # noqa: ANN001
    # Forward calls, one request at a time: A = 1, 2, 3 (fails); B = 4..7; C = 8 (fails); D = 9...
    proc, port = _start(ckpt, launcher=("tests.fault_serve", "3,8"))
    try:
        events = _stream_events(port, {**CHAT, "max_tokens": 20, "ignore_eos": True})
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        assert all(json.loads(e)["choices"][0].get("finish_reason") in (None,) for e in events[:-2])

        status, body, _ = _post(port, "/v1/chat/completions", {**CHAT, "max_tokens": 4, "ignore_eos": True}, None)
        assert status == 200 and body["usage"]["completion_tokens"] == 4  # B: untouched by A's fault

        status, body, _ = _post(port, "/v1/chat/completions", {**CHAT, "max_tokens": 4}, None)
        assert status == 500 and body["error"]["code"] == "engine_error"  # C

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=NAME, max_tokens=8, temperature=0,
                                               messages=CHAT["messages"])  # D
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert _raw(port, "GET", "/health")[0] == 200
        assert _metric(port, "dsv2_failed_steps") == 2 and _metric(port, "dsv2_cache_blocks_used") == 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -15) and "stopped serving" in out
    assert out.count("engine step failed") == 2 and out.count("RuntimeError: injected fault") == 2  # logged
    assert '"POST /v1/chat/completions" 500' in out and '"POST /v1/chat/completions" 200' in out  # access log


def test_a_dead_engine_exits_non_zero(ckpt) -> None:  # noqa: ANN001
    """Every forward fails: the third failed step in a row kills the engine; the server tells its clients
    (503), stops and exits 1 so that a supervisor restarts it."""
    proc, port = _start(ckpt, launcher=("tests.fault_serve", "1-"))
    statuses = [_post(port, "/v1/chat/completions", {**CHAT, "max_tokens": 4}, None)[0] for _ in range(3)]
    assert statuses == [500, 500, 503]
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 1, out
    assert "dsv2: stopped: the engine failed (3 engine steps failed in a row" in out


def test_health_and_new_requests_say_503_once_the_engine_is_dead(ckpt) -> None:  # noqa: ANN001
    llm = LLM(ckpt, dtype="float32", max_cache_tokens=512)

    def broken(batch):  # noqa: ANN001, ANN202
        raise RuntimeError("the device is gone")

    llm.runner.run = broken
    with TestClient(create_app(llm, ServerConfig([NAME]))) as client:
        assert client.get("/health").status_code == 200
        codes = [client.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2}).status_code
                 for _ in range(3)]
        assert codes == [500, 500, 503]
        health = client.get("/health")
        assert health.status_code == 503 and "3 engine steps failed in a row" in health.json()["reason"]
        late = client.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2, "stream": True})
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"
        deadline = time.time() + 5
        while client.app.state.engine.in_flight and time.time() < deadline:
            time.sleep(0.05)
        assert client.app.state.engine.in_flight == 0
