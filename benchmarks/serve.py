"""Serving throughput and latency: N concurrent streaming clients against a real `dsv2 serve` process.

Starts the server on a free loopback port with a random ~100M-parameter checkpoint (the config of
benchmarks/forward.py, with the real DeepSeek-V2 tokenizer), sends `--requests` chat requests from
`--clients` concurrent streaming `openai` clients, and reports requests/s, output tokens/s, time to first
token and inter-token latency (p50/p99). Baseline, same run: the same prompts through the in-process engine
(`LLM.chat`, at most `--clients` sequences at a time), i.e. what the HTTP layer costs.

    python benchmarks/serve.py [--clients 8] [--requests 32] [--max-tokens 64] [--compile]

--compile runs both the server (`dsv2 serve --compile`, which compiles before it listens) and the offline
engine with compiled decode; compilation is outside the timed part.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from forward import CFG  # run as `python benchmarks/serve.py`: benchmarks/ is on sys.path
from dsv2 import LLM, SamplingParams, Transformer, save
from dsv2.tokenizer import named_tokenizer_dir

SERVE_CFG = CFG.replace(vocab_size=102400, bos_token_id=100000, eos_token_id=100001)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def start_server(ckpt: Path, compile: bool) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv2.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", "bench", "--dtype", "float32", "--max-cache-tokens", "65536"]
                            + ["--compile"] * compile,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    for _ in range(6000):  # up to 20 minutes: with --compile the server compiles before it listens
        try:
            client.models.list()
            return proc, port
        except openai.APIConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def run_clients(port: int, prompts: list[str], clients: int, max_tokens: int) -> dict[str, list[float]]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    stats: dict[str, list[float]] = {"ttft": [], "itl": [], "tokens": []}
    lock, work = threading.Lock(), list(prompts)

    def worker() -> None:
        while True:
            with lock:
                if not work:
                    return
                prompt = work.pop()
            t0 = time.perf_counter()
            last, arrivals = t0, []
            stream = client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            tokens = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    arrivals.append(now - last)
                    last = now
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            with lock:
                if arrivals:
                    stats["ttft"].append(arrivals[0])
                    stats["itl"] += arrivals[1:]
                stats["tokens"].append(tokens)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="compiled decode in the server and the offline engine")
    args = ap.parse_args()
    torch.manual_seed(0)
    prompts = [f"Question {i}: " + " ".join(f"word{j}" for j in range(5 + 7 * (i % 9))) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        save(Transformer(SERVE_CFG), ckpt)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(named_tokenizer_dir("deepseek-v2") / name, ckpt / name)
        # same concurrency as the clients: the engine never runs more than --clients sequences at once
        llm = LLM(ckpt, dtype=torch.float32, max_cache_tokens=65536, max_num_seqs=args.clients,
                  compile=args.compile)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        messages = [[{"role": "user", "content": p}] for p in prompts]
        llm.warm_up()
        llm.chat(messages[:2], params)  # warm-up
        t0 = time.perf_counter()
        offline = llm.chat(messages, params)
        offline_s = time.perf_counter() - t0
        offline_tokens = sum(len(o.outputs[0].token_ids) for o in offline)
        del llm
        proc, port = start_server(ckpt, args.compile)
        try:
            run_clients(port, prompts[:2], 2, args.max_tokens)  # warm-up
            t0 = time.perf_counter()
            stats = run_clients(port, prompts, args.clients, args.max_tokens)
            served_s = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait()
    served_tokens = sum(stats["tokens"])
    ms = 1000
    print(f"# {SERVE_CFG.num_params() / 1e6:.0f}M params fp32, {args.clients} concurrent streaming clients, "
          f"{args.requests} chat requests, up to {args.max_tokens} tokens each, greedy, compile {args.compile}")
    print("| clients | requests/s | output tok/s | offline engine tok/s | served / offline | TTFT p50 / p99 (ms) "
          "| ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.requests / served_s:.2f} | {served_tokens / served_s:,.1f} | "
          f"{offline_tokens / offline_s:,.1f} | {(served_tokens / served_s) / (offline_tokens / offline_s):.2f} | "
          f"{statistics.median(stats['ttft']) * ms:,.0f} / {percentile(stats['ttft'], 0.99) * ms:,.0f} | "
          f"{statistics.median(stats['itl']) * ms:,.1f} / {percentile(stats['itl'], 0.99) * ms:,.1f} |")


if __name__ == "__main__":
    main()
