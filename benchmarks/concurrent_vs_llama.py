"""Many requests at once, real size: dsv2's engine on int8 / int4 weights against `llama-server -np N` (continuous
batching, llama.cpp's own server, built by ../shared/peers/llama_cpp.sh) on the GGUF of the same checkpoint.

Both sides get N requests (default 32) at once, each a different random 41-token prompt and a fixed number of
greedy new tokens with EOS ignored (random weights); the figure is aggregate output tokens / wall time from the
first request sent to the last token received. llama-server is driven over HTTP by N client threads
(`/completion` with token-id prompts, `n_predict`, `ignore_eos`); dsv2 through `LLM.generate` in process (its
HTTP layer adds nothing measurable at these rates). The sides cannot share memory, so each run is a fresh
process, alternating; medians over rounds.

    python benchmarks/concurrent_vs_llama.py DIR --pair int8=Q8_0.gguf [--requests 32] [--new-tokens 32] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

CHILD = r"""
import json, random, sys, time
from dsv2.infer import LLM, SamplingParams
path, quantization, n, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = LLM(path, quantization=quantization, max_cache_tokens=n * (41 + new) + 256, max_num_seqs=n)
rnd = random.Random(7)
prompts = [[100000] + [rnd.randrange(100000) for _ in range(40)] for _ in range(n)]
params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
t = time.perf_counter()
outs = llm.generate(prompts, params)
dt = time.perf_counter() - t
print(json.dumps({"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / dt, "seconds": dt}))
"""


def dsv2_run(path: str, quantization: str, n: int, new: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, quantization, str(n), str(new)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_run(peers_bin: Path, gguf: str, n: int, new: int, port: int = 8093) -> dict:
    ctx = n * (41 + new + 16)
    server = subprocess.Popen([str(peers_bin / "llama-server"), "-m", gguf, "-np", str(n), "-c", str(ctx), "-t", "2",
                               "--port", str(port), "--host", "127.0.0.1", "--no-warmup",
                               # as bench_llama.py: with weight repacking, DeepSeek-V2 GGUFs abort on AVX-512/AMX
                               # CPUs (GGML_ASSERT cur_backend_id != -1)
                               "--no-repack"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited ({server.returncode}): {server.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        rnd = random.Random(7)
        prompts = [[100000] + [rnd.randrange(100000) for _ in range(40)] for _ in range(n)]
        counts = [0] * n

        def one(i: int) -> None:
            body = json.dumps({"prompt": prompts[i], "n_predict": new, "temperature": 0, "ignore_eos": True,
                               "cache_prompt": False}).encode()
            req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=3600) as r:
                counts[i] = json.loads(r.read())["tokens_predicted"]

        one(0)  # warm-up
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        return {"tok_s": sum(counts) / dt, "seconds": dt}
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--pair", action="append", required=True, metavar="METHOD=GGUF")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--peers-bin", default=os.path.expanduser("~/.cache/dsv2-peers/bin"))
    a = ap.parse_args()
    rows = []
    for method, gguf in (p.split("=", 1) for p in a.pair):
        ours, theirs = [], []
        for r in range(a.rounds):
            ours.append(dsv2_run(a.checkpoint, method, a.requests, a.new_tokens))
            print(f"round {r} dsv2 {method}: {ours[-1]}", flush=True)
            theirs.append(llama_run(Path(a.peers_bin), gguf, a.requests, a.new_tokens))
            print(f"round {r} llama-server {os.path.basename(gguf)}: {theirs[-1]}", flush=True)
        o, t = (statistics.median(x["tok_s"] for x in runs) for runs in (ours, theirs))
        rows.append(f"| {method} | {os.path.basename(gguf)} | {a.requests} x {a.new_tokens} | {o:.2f} | {t:.2f} | "
                    f"{o / t:.2f}x |")
    print("\n| dsv2 | llama-server | requests x new tokens | dsv2 tok/s | llama.cpp tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
