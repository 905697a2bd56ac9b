"""Soak test: a bounded run of mixed, abusive traffic against a real `dsv2 serve` process.

Starts `dsv2 serve` (the shipped dsv2-tiny, or --model DIR) on a free loopback port with a latent cache far
smaller than the load needs (--max-cache-tokens 4096: 64 requests of a few to a few hundred prompt tokens plus
8-256 output tokens want ~4-5x that, so the scheduler preempts), --max-concurrent 64. Then --clients (64)
asyncio workers with `openai.AsyncOpenAI` loop until --duration (300 s) is over, each request streamed:

- chat or completions (half each), prompts from a few tokens to a few hundred (arithmetic word problems,
  code-like text), max_tokens 8-256 (log-uniform), temperature 0 or 0.7;
- 20% disconnect mid-stream: the stream is closed after k content chunks (k = 0..32), or the request's task
  is cancelled 0-2 s after it started (often while it still waits in the engine's queue);
- 5% are malformed or oversized, sent with raw httpx: invalid JSON, "max_tokens": "ten", an unknown model, a
  prompt longer than the context, a body over the 4 MiB limit (with Content-Length and chunked), n: 0, a
  negative temperature. Each must get a 4xx with an OpenAI error JSON ({"error": {"message": ...}}).

A request that produced neither a final chunk nor an error within --timeout (120 s) is hung. Measured after a
--warmup (10 s) of the same load: completed / disconnected / rejected counts, 5xx, client-side TTFT and
inter-token latency p50/p99, requests/s and output tokens/s, the server's VmRSS every second (median of the
first and the last minute -- the first and last fifth for runs under 5 minutes -- and the growth), the engine's
gauges every 2 s. At the end: /metrics must show an idle engine (dsv2_running, dsv2_waiting,
dsv2_cache_blocks_used all 0, within --idle-wait s), /health 200, and SIGTERM must stop the server.

    python benchmarks/soak.py [--duration 300] [--quick] [--model DIR] [--max-cache-tokens 4096]
                              [--server-arg=--dtype --server-arg=bfloat16 ...]

Prints a summary, the machine, and one JSON line (the last line) with every number. Exits 1 when a pass
condition fails: hung > 0, any 5xx, any other unexpected answer (a malformed request not rejected with a 4xx
OpenAI error, a valid request erroring or ending without finish_reason), cache blocks used != 0 or requests
still running/waiting at the end, RSS growth >= 5%, /health not 200, the server not exiting on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

try:  # the openai client of this venv runs on httpx2 (httpx's successor, same API)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

BODY_LIMIT = 4 * 1024 * 1024  # the server's max_body_bytes


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------------------------------------- prompts
_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Zoe"]
_ITEMS = ["apples", "marbles", "books", "coins", "pencils", "stickers", "cookies", "cards"]


def _word_problem(rng: random.Random) -> str:
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 90), rng.randint(2, 50), rng.randint(1, 20)
    return rng.choice([
        f"{n} has {a} {it}. {n} buys {b} more and gives {c} away. How many {it} does {n} have now?",
        f"A box holds {a} {it}. How many {it} are in {c} boxes?",
        f"{n} had {a + b} {it} and lost {b}. Then {n} found {c} more. How many {it} now?",
        f"What is {a} plus {b} minus {c}?",
        f"There are {c} children and each has {b} {it}. How many {it} are there in total?",
    ])


def _code(rng: random.Random, lines: int) -> str:
    out = [f"def f{rng.randint(0, 99)}(x, y):"]
    for i in range(lines):
        op = rng.choice(["+", "-", "*"])
        out.append(f"    v{i} = x {op} {rng.randint(1, 99)} * y" if i % 3 else f"    if x > {rng.randint(0, 50)}:")
        if i % 3 == 0:
            out.append(f"        x = x {op} {rng.randint(1, 9)}")
    out.append("    return x")
    return "\n".join(out)


def make_prompts(rng: random.Random, count: int) -> list[str]:
    """A fixed pool: ~30% a few tokens, ~40% tens of tokens, ~30% one to four hundred tokens."""
    short = ["Hi", "2+2=", "What is 7 times 8?", "Count to five.", "def add(a, b):", "Hello, who are you?"]
    prompts = []
    for _ in range(count):
        r = rng.random()
        if r < 0.3:
            prompts.append(rng.choice(short))
        elif r < 0.7:
            if rng.random() < 0.6:
                prompts.append(" ".join(_word_problem(rng) for _ in range(rng.randint(1, 3))))
            else:
                prompts.append("Complete this function:\n" + _code(rng, rng.randint(2, 6)))
        else:
            if rng.random() < 0.5:
                prompts.append("Solve each problem.\n" + "\n".join(
                    f"{i + 1}. {_word_problem(rng)}" for i in range(rng.randint(4, 16))))
            else:
                prompts.append("What does this code return for x = 3, y = 4?\n" + _code(rng, rng.randint(8, 40)))
    return prompts


# ---------------------------------------------------------------------------------------------- stats
@dataclass
class Stats:
    completed: int = 0
    disconnected: int = 0
    malformed_rejected: int = 0
    hung: int = 0
    server_5xx: int = 0
    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    finish_reasons: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)  # kind -> count (everything unexpected, 5xx and hung too)
    examples: dict[str, str] = field(default_factory=dict)  # kind -> the first one's details
    malformed_status: Counter = field(default_factory=Counter)  # "case status" -> count

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        self.examples.setdefault(kind, detail[:300])


# ---------------------------------------------------------------------------------------------- malformed
def malformed_request(case: str, rng: random.Random, model: str, big: bytes) -> tuple[str, dict[str, Any]]:
    """(path, httpx.post kwargs) for one malformed or oversized request."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base: dict[str, Any] = ({"model": model, "messages": [{"role": "user", "content": "What is 2 plus 3?"}]}
                            if chat else {"model": model, "prompt": "What is 2 plus 3?"})
    base["stream"] = rng.random() < 0.5
    base["max_tokens"] = 16
    hdr = {"content-type": "application/json"}
    if case == "invalid_json":
        return path, {"content": json.dumps(base).encode()[:-7] + b",,", "headers": hdr}
    if case == "wrong_type":
        return path, {"json": {**base, "max_tokens": "ten"}}
    if case == "unknown_model":
        return path, {"json": {**base, "model": "no-such-model"}}
    if case == "prompt_too_long":  # ~3k words: well over the 1024-token context, far under 4 MiB
        text = " ".join(_word_problem(rng) for _ in range(150))
        body = ({**base, "messages": [{"role": "user", "content": text}]} if chat else {**base, "prompt": text})
        return path, {"json": body}
    if case == "body_too_large":
        return path, {"content": big, "headers": hdr}

    if case == "body_too_large_chunked":  # no Content-Length: the server must count what it reads
        async def pieces() -> Any:  # noqa: ANN401
            for i in range(0, len(big), 256 * 1024):
                yield big[i:i + 256 * 1024]
        return path, {"content": pieces(), "headers": hdr}
    if case == "n_zero":
        return path, {"json": {**base, "n": 0}}
    if case == "negative_temperature":
        return path, {"json": {**base, "temperature": -0.5}}
    raise ValueError(case)


MALFORMED_CASES = ["invalid_json", "wrong_type", "unknown_model", "prompt_too_long", "body_too_large",
                   "body_too_large_chunked", "n_zero", "negative_temperature"]


# ---------------------------------------------------------------------------------------------- the load
class Load:
    def __init__(self, args: argparse.Namespace, base_url: str, model: str) -> None:
        self.args, self.model = args, model
        self.client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0,
                                         timeout=args.timeout)
        self.raw = httpx.AsyncClient(base_url=base_url, timeout=args.timeout,
                                     limits=httpx.Limits(max_connections=200, max_keepalive_connections=100))
        self.prompts = make_prompts(random.Random(args.seed), 512)
        big_prompt = "x" * (BODY_LIMIT + 1024)
        self.big = json.dumps({"model": model, "prompt": big_prompt, "max_tokens": 8}).encode()
        self.warmup_stats, self.stats = Stats(), Stats()
        self.measuring = False

    async def worker(self, i: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + i + 1)
        while time.perf_counter() < deadline:
            stats = self.stats if self.measuring else self.warmup_stats
            r = rng.random()
            if r < self.args.malformed:
                await self.malformed(rng, stats)
            else:
                await self.valid(rng, stats, disconnect=r < self.args.malformed + self.args.disconnect)

    async def valid(self, rng: random.Random, st: Stats, disconnect: bool) -> None:
        chat = rng.random() < 0.5
        prompt = rng.choice(self.prompts)
        kw: dict[str, Any] = dict(model=self.model, stream=True, stream_options={"include_usage": True},
                                  max_tokens=int(round(math.exp(rng.uniform(math.log(8), math.log(256))))),
                                  temperature=rng.choice([0.0, 0.7]))
        close_after = cancel_after = None
        if disconnect:
            if rng.random() < 0.5:
                close_after = rng.randint(0, 32)
            else:
                cancel_after = rng.uniform(0.0, 2.0)
        desc = f"{'chat' if chat else 'completions'} max_tokens={kw['max_tokens']} prompt={prompt[:40]!r}"
        res: dict[str, Any] = {"finish": None, "tokens": None, "content": 0, "closed": False}

        async def consume() -> None:
            t0 = time.perf_counter()
            if chat:
                stream = await self.client.chat.completions.create(
                    messages=[{"role": "user", "content": prompt}], **kw)
            else:
                stream = await self.client.completions.create(prompt=prompt, **kw)
            last, ttft, itl = None, None, []
            try:
                if close_after == 0:
                    res["closed"] = True
                    return
                async for chunk in stream:
                    if chunk.choices:
                        c = chunk.choices[0]
                        text = c.delta.content if chat else c.text
                        if text:
                            now = time.perf_counter()
                            if last is None:
                                ttft = now - t0
                            else:
                                itl.append(now - last)
                            last = now
                            res["content"] += 1
                        if c.finish_reason is not None:
                            res["finish"] = c.finish_reason
                        if close_after is not None and res["content"] >= close_after and res["finish"] is None:
                            res["closed"] = True
                            return
                    if chunk.usage is not None:
                        res["tokens"] = chunk.usage.completion_tokens
            finally:
                await stream.close()
                if ttft is not None:
                    st.ttft.append(ttft)
                st.itl.extend(itl)

        try:
            async with asyncio.timeout(self.args.timeout):
                if cancel_after is None:
                    await consume()
                else:
                    task = asyncio.create_task(consume())
                    done, _ = await asyncio.wait({task}, timeout=cancel_after)
                    if not done:
                        task.cancel()
                        try:
                            await task
                        except asyncio.CancelledError:
                            pass
                        res["closed"] = True
                    else:
                        task.result()
        except TimeoutError:
            st.hung += 1
            st.fail("hung", f"{desc}: no final chunk or error within {self.args.timeout:.0f} s "
                            f"({res['content']} content chunks)")
            return
        except openai.APITimeoutError as e:
            st.hung += 1
            st.fail("hung", f"{desc}: client timeout {e!r}")
            return
        except openai.APIStatusError as e:
            if e.status_code >= 500:
                st.server_5xx += 1
                st.fail("valid_5xx", f"{desc}: {e.status_code} {e.response.text[:200]}")
            else:
                st.fail(f"valid_{e.status_code}", f"{desc}: {e.status_code} {e.response.text[:200]}")
            return
        except openai.APIConnectionError as e:
            st.fail("valid_connection_error", f"{desc}: {e!r} {e.__cause__!r}")
            return
        except openai.APIError as e:  # an error event inside the stream
            st.fail("valid_stream_error", f"{desc}: {e.message} body={e.body}")
            return
        except Exception as e:  # noqa: BLE001 (a parse failure of a chunk, say)
            st.fail("valid_client_exception", f"{desc}: {e!r}")
            return
        if res["closed"]:
            st.disconnected += 1
            return
        if res["finish"] is None:
            st.fail("stream_without_finish_reason", f"{desc}: stream ended after {res['content']} content chunks "
                                                    "without a finish_reason")
            return
        if res["tokens"] is None:
            st.fail("stream_without_usage", f"{desc}: include_usage but no usage chunk")
        st.finish_reasons[res["finish"]] += 1
        if res["finish"] == "abort":
            st.fail("valid_aborted", f"{desc}: finish_reason 'abort' while the server was not shutting down")
        st.completed += 1
        st.output_tokens += res["tokens"] if res["tokens"] is not None else res["content"]

    async def malformed(self, rng: random.Random, st: Stats) -> None:
        case = rng.choice(MALFORMED_CASES)
        path, kw = malformed_request(case, rng, self.model, self.big)
        try:
            async with asyncio.timeout(self.args.timeout):
                r = await self.raw.post(path, **kw)
        except TimeoutError:
            st.hung += 1
            st.fail("hung", f"malformed {case} {path}: no answer within {self.args.timeout:.0f} s")
            return
        except httpx.TimeoutException as e:
            st.hung += 1
            st.fail("hung", f"malformed {case} {path}: {e!r}")
            return
        except httpx.HTTPError as e:
            st.malformed_status[f"{case} {type(e).__name__}"] += 1
            st.fail(f"malformed_{case}_no_response", f"{path}: {e!r}")
            return
        st.malformed_status[f"{case} {r.status_code}"] += 1
        try:
            body = r.json()
            ok_json = isinstance(body, dict) and isinstance(body.get("error"), dict) and isinstance(
                body["error"].get("message"), str)
        except ValueError:
            ok_json = False
        detail = f"{path} -> {r.status_code} {r.headers.get('content-type')} {r.text[:200]!r}"
        if r.status_code >= 500:
            st.server_5xx += 1
            st.fail(f"malformed_{case}_5xx", detail)
        elif not 400 <= r.status_code < 500:
            st.fail(f"malformed_{case}_accepted", detail)
        elif not ok_json:
            st.fail(f"malformed_{case}_not_openai_error_json", detail)
        else:
            st.malformed_rejected += 1


# ---------------------------------------------------------------------------------------------- the server
def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def by_status(m: dict[str, float]) -> dict[str, float]:
    out: Counter = Counter()
    for key, v in m.items():
        if key.startswith("dsv2_requests_total{") and (hit := re.search(r'status="([^"]*)"', key)):
            out[hit.group(1)] += v
    return dict(sorted(out.items()))


def preemptions(m: dict[str, float]) -> float | None:
    for key in ("dsv2_preemptions_total", "dsv2_preemptions"):
        if key in m:
            return m[key]
    return None


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return {"cpu": model, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "mem_total": mem}


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dsv2.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-concurrent", str(args.max_concurrent), "--max-cache-tokens", str(args.max_cache_tokens)]
    cmd += ["--model", args.model] if args.model else []
    cmd += args.server_arg
    log = open(log_path, "wb")  # noqa: SIM115 (the server writes it until it exits)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + args.startup_timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening:\n{tail(log_path)}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer /health within {args.startup_timeout} s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- the run
async def soak(args: argparse.Namespace, proc: subprocess.Popen, base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as mon:
        model = (await mon.get("/v1/models")).json()["data"][0]["id"]
        load = Load(args, base, model)
        rss: list[tuple[float, int]] = []  # (seconds since the measured start, KiB)
        gauges: list[dict[str, float]] = []
        stop = asyncio.Event()
        rss_start = rss_kib(proc.pid)

        async def sample_rss() -> None:
            while not stop.is_set():
                if load.measuring and (v := rss_kib(proc.pid)) is not None:
                    rss.append((time.perf_counter() - t_measure, v))
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass

        async def sample_metrics() -> None:
            while not stop.is_set():
                if load.measuring:
                    try:
                        gauges.append(parse_metrics((await mon.get("/metrics")).text))
                    except httpx.HTTPError:
                        pass
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                except TimeoutError:
                    pass

        t_start = time.perf_counter()
        t_measure = t_start + args.warmup
        deadline = t_measure + args.duration
        cpu0 = time.process_time()
        cpu_measure, srv_cpu0 = cpu0, cpu_seconds(proc.pid)
        load.measuring = args.warmup <= 0
        samplers = [asyncio.create_task(sample_rss()), asyncio.create_task(sample_metrics())]
        workers = [asyncio.create_task(load.worker(i, deadline)) for i in range(args.clients)]
        if not load.measuring:
            await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
            load.measuring = True
            t_measure = time.perf_counter()
            cpu_measure, srv_cpu0 = time.process_time(), cpu_seconds(proc.pid)
        await asyncio.gather(*workers)
        t_end = time.perf_counter()
        cpu_end, srv_cpu1 = time.process_time(), cpu_seconds(proc.pid)
        stop.set()
        await asyncio.gather(*samplers)
        await load.client.close()
        await load.raw.aclose()

        # the engine must drain: nothing running or waiting, every cache block back
        final: dict[str, float] = {}
        idle_s = None
        t_idle = time.perf_counter()
        while True:
            try:
                final = parse_metrics((await mon.get("/metrics")).text)
            except httpx.HTTPError:
                final = {}
            if final and all(final.get(k) == 0 for k in
                             ("dsv2_running", "dsv2_waiting", "dsv2_cache_blocks_used")):
                idle_s = time.perf_counter() - t_idle
                break
            if time.perf_counter() - t_idle > args.idle_wait:
                break
            await asyncio.sleep(0.25)
        try:
            health = (await mon.get("/health")).status_code
        except httpx.HTTPError as e:
            health = repr(e)

    st, m = load.stats, Path(args.model).name if args.model else "dsv2-tiny (shipped)"
    wall = t_end - t_measure
    win = min(60.0, args.duration / 5)
    first = [v for t, v in rss if t <= win]
    last = [v for t, v in rss if t >= (rss[-1][0] - win if rss else 0)]
    rss_first = statistics.median(first) / 1024 if first else float("nan")
    rss_last = statistics.median(last) / 1024 if last else float("nan")
    blocks_total = [g.get("dsv2_cache_blocks_total", 0) for g in gauges]
    used = [g.get("dsv2_cache_blocks_used", 0) for g in gauges]
    util = [100 * u / t for u, t in zip(used, blocks_total) if t]
    ms = 1000
    return {
        "model": m, "served_name": model, "duration_s": args.duration, "warmup_s": args.warmup,
        "measured_wall_s": round(wall, 1), "clients": args.clients, "max_concurrent": args.max_concurrent,
        "max_cache_tokens": args.max_cache_tokens, "timeout_s": args.timeout,
        "completed": st.completed, "disconnected": st.disconnected, "malformed_rejected": st.malformed_rejected,
        "hung": st.hung, "server_5xx": st.server_5xx,
        "unexpected": sum(st.failures.values()), "failures": dict(st.failures), "failure_examples": st.examples,
        "malformed_status": dict(sorted(st.malformed_status.items())), "finish_reasons": dict(st.finish_reasons),
        "warmup_requests": load.warmup_stats.completed + load.warmup_stats.disconnected
        + load.warmup_stats.malformed_rejected, "warmup_failures": dict(load.warmup_stats.failures),
        "warmup_failure_examples": load.warmup_stats.examples,
        "requests_per_s": round((st.completed + st.disconnected + st.malformed_rejected) / wall, 2),
        "completed_per_s": round(st.completed / wall, 2),
        "output_tokens": st.output_tokens, "output_tokens_per_s": round(st.output_tokens / wall, 1),
        "ttft_p50_ms": round(percentile(st.ttft, 0.5) * ms, 1), "ttft_p99_ms": round(percentile(st.ttft, 0.99) * ms, 1),
        "itl_p50_ms": round(percentile(st.itl, 0.5) * ms, 2), "itl_p99_ms": round(percentile(st.itl, 0.99) * ms, 2),
        "rss_start_mib": round(rss_start / 1024, 1) if rss_start else None, "rss_window_s": win,
        "rss_first_mib": round(rss_first, 1), "rss_last_mib": round(rss_last, 1),
        "rss_max_mib": round(max(v for _, v in rss) / 1024, 1) if rss else None,
        "rss_growth_pct": round(100 * (rss_last / rss_first - 1), 2), "rss_samples": len(rss),
        "rss_trace_mib": [round(v / 1024) for t, v in rss[::10]],  # every 10 s from the measured start
        "gauge_samples": len(gauges), "cache_blocks_total": max(blocks_total, default=None),
        "cache_used_pct_mean": round(statistics.mean(util), 1) if util else None,
        "cache_used_pct_max": round(max(util), 1) if util else None,
        "waiting_max": max((g.get("dsv2_waiting", 0) for g in gauges), default=None),
        "running_mean": round(statistics.mean(g.get("dsv2_running", 0) for g in gauges), 1) if gauges else None,
        "preemptions": preemptions(final) if final else None,
        "final_running": final.get("dsv2_running"), "final_waiting": final.get("dsv2_waiting"),
        "final_cache_blocks_used": final.get("dsv2_cache_blocks_used"),
        "idle_after_s": round(idle_s, 2) if idle_s is not None else None,
        "server_requests_by_status": by_status(final),
        "health_status": health,
        "client_cpu_s": round(cpu_end - cpu_measure, 1),
        "client_cpu_pct_of_wall": round(100 * (cpu_end - cpu_measure) / wall, 1),
        "client_cpu_total_s": round(cpu_end - cpu0, 1),
        "server_cpu_s": round(srv_cpu1 - srv_cpu0, 1) if srv_cpu0 is not None and srv_cpu1 is not None else None,
    }


def stop_server(proc: subprocess.Popen, timeout: float) -> tuple[bool, int | None, float]:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout)
        return True, rc, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False, None, time.perf_counter() - t0


def verdict(res: dict[str, Any]) -> list[str]:
    bad = []
    if res["hung"]:
        bad.append(f"{res['hung']} hung requests")
    if res["server_5xx"]:
        bad.append(f"{res['server_5xx']} 5xx answers")
    other = {k: v for k, v in res["failures"].items() if k != "hung" and not k.endswith("5xx")}
    if other:
        bad.append(f"unexpected answers: {other}")
    if res["warmup_failures"]:
        bad.append(f"during warm-up: {res['warmup_failures']}")
    for k in ("final_cache_blocks_used", "final_running", "final_waiting"):
        if res[k] != 0:
            bad.append(f"{k} = {res[k]} at the end (after waiting {res['idle_wait_s']} s)")
    if not res["rss_growth_pct"] < 5:
        bad.append(f"RSS grew {res['rss_growth_pct']}% (>= 5%)")
    if res["health_status"] != 200:
        bad.append(f"/health answered {res['health_status']}")
    if not res["server_exited"]:
        bad.append(f"the server did not exit within {res['exit_timeout_s']} s of SIGTERM")
    elif res["server_exit_code"] not in (0, -signal.SIGTERM):  # uvicorn re-raises the signal once it is done
        bad.append(f"the server exited with {res['server_exit_code']} after SIGTERM")
    return bad


def summary(res: dict[str, Any], bad: list[str]) -> str:
    mc = res["machine"]
    pre = "n/a (no dsv2_preemptions metric)" if res["preemptions"] is None else f"{res['preemptions']:.0f}"
    lines = [
        f"# soak: {res['model']} served as {res['served_name']!r}, {res['clients']} streaming clients, "
        f"--max-concurrent {res['max_concurrent']}, --max-cache-tokens {res['max_cache_tokens']}, "
        f"{res['duration_s']:.0f} s after {res['warmup_s']:.0f} s warm-up (measured {res['measured_wall_s']} s)",
        f"machine: {mc['cpu']}, {mc['cpus']} CPUs ({mc['cpus_usable']} usable), {mc['mem_total']} RAM",
        f"requests: {res['completed']} completed, {res['disconnected']} disconnected mid-stream, "
        f"{res['malformed_rejected']} malformed rejected (4xx + error JSON); {res['hung']} hung, "
        f"{res['server_5xx']} 5xx, {res['unexpected']} unexpected in all",
        f"throughput: {res['requests_per_s']} requests/s ({res['completed_per_s']} completed/s), "
        f"{res['output_tokens_per_s']} output tokens/s ({res['output_tokens']} tokens in completed requests)",
        f"client TTFT p50 / p99: {res['ttft_p50_ms']:,.0f} / {res['ttft_p99_ms']:,.0f} ms; "
        f"inter-token p50 / p99: {res['itl_p50_ms']:,.1f} / {res['itl_p99_ms']:,.1f} ms",
        f"finish reasons: {res['finish_reasons']}",
        f"malformed answers: {res['malformed_status']}",
        f"engine under load ({res['gauge_samples']} samples): cache {res['cache_blocks_total']:.0f} blocks, "
        f"{res['cache_used_pct_mean']}% used on average (max {res['cache_used_pct_max']}%), running mean "
        f"{res['running_mean']}, waiting max {res['waiting_max']:.0f}; "
        f"preemptions: {pre}",
        f"server RSS: {res['rss_start_mib']} MiB at start, median {res['rss_first_mib']} MiB over the first "
        f"{res['rss_window_s']:.0f} s, {res['rss_last_mib']} MiB over the last {res['rss_window_s']:.0f} s: "
        f"growth {res['rss_growth_pct']}% (max {res['rss_max_mib']} MiB); every 10 s: {res['rss_trace_mib']}",
        f"at the end: running {res['final_running']}, waiting {res['final_waiting']}, cache blocks used "
        f"{res['final_cache_blocks_used']} (idle after {res['idle_after_s']} s); /health {res['health_status']}; "
        f"SIGTERM: exited {res['server_exited']} with {res['server_exit_code']} in {res['server_exit_s']} s",
        f"server's request counter by status: {res['server_requests_by_status']}",
        f"CPU over the measured run: client {res['client_cpu_s']} s ({res['client_cpu_pct_of_wall']}% of one core), "
        f"server {res['server_cpu_s']} s",
    ]
    for kind, example in {**res["failure_examples"], **res["warmup_failure_examples"]}.items():
        lines.append(f"  first {kind}: {example}")
    lines.append("PASS" if not bad else "FAIL: " + "; ".join(bad))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of measured load (default 300)")
    ap.add_argument("--quick", action="store_true", help="a fast check: --duration 30 --warmup 3")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped dsv2-tiny)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-concurrent", type=int, default=64)
    ap.add_argument("--max-cache-tokens", type=int, default=4096,
                    help="small on purpose: the load needs several times this, so the engine preempts")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="passed to `dsv2 serve` (repeatable; use --server-arg=--flag for flags)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds after which a request counts as hung")
    ap.add_argument("--disconnect", type=float, default=0.20, help="fraction of requests that disconnect")
    ap.add_argument("--malformed", type=float, default=0.05, help="fraction of malformed/oversized requests")
    ap.add_argument("--idle-wait", type=float, default=10.0, help="seconds the engine gets to drain at the end")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup = 30.0, 3.0

    with tempfile.TemporaryDirectory() as d:
        log_path = Path(d) / "server.log"
        proc, base = start_server(args, log_path)
        try:
            res = asyncio.run(soak(args, proc, base))
        except BaseException:
            proc.kill()
            print(tail(log_path), file=sys.stderr)
            raise
        exit_timeout = 30.0
        res["server_exited"], res["server_exit_code"], exit_s = stop_server(proc, exit_timeout)
        res["server_exit_s"], res["exit_timeout_s"], res["idle_wait_s"] = round(exit_s, 2), exit_timeout, args.idle_wait
        log = log_path.read_text(errors="replace")
        res["server_log_tracebacks"] = log.count("Traceback")
        res["machine"] = machine()
        bad = verdict(res)
        if res["server_log_tracebacks"]:
            bad.append(f"{res['server_log_tracebacks']} tracebacks in the server's log")
        if bad:
            print("# the server's log, last lines:\n" + tail(log_path), file=sys.stderr)
    res["pass"], res["fail_reasons"] = not bad, bad
    print(summary(res, bad))
    print(json.dumps(res, default=str))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
