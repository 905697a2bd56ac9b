"""Real size, side by side: dsv2 on int8 / int4 weights against llama.cpp on Q8_0 / Q4_0 / Q4_K_M of the same
checkpoint, same machine, same run.

The checkpoint is a V2-Lite-shaped one in the official layout (`python ../shared/peers/v2lite_random.py DIR`), the
GGUFs come from it through llama.cpp's own converter and quantizer (`../shared/peers/llama_cpp.sh convert` /
`quantize`). Both sides do the workload of `../shared/peers/bench_llama.py`: a 41-token prompt (BOS + random ids,
the same seed), 64 greedy tokens (decode-only rate: (64 - 1) / (time for 64 - time for 1)), and a 1 x 512 prefill.
The two cannot share the 24 GiB at once (dsv2's 15 GiB of int8 weights and llama.cpp's 16.7 GB memory-mapped
Q8_0), so each measurement is a fresh process, the sides alternate, and each figure is the median over rounds.
dsv2's process also reports its load time and peak memory (VmHWM, and the anonymous part, which excludes pages
of the memory-mapped safetensors that the kernel can drop at will).

    python benchmarks/quant_vs_llama.py DIR --pair int8=Q8_0.gguf --pair int4=Q4_0.gguf --pair int4=Q4_K_M.gguf \
        [--rounds 2] [--peers ../shared/peers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, random, statistics, sys, threading, time
import torch
from dsv2.infer import LLM, SamplingParams

path, quantization, n_tokens, prefill = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
peak = {"anon": 0}
def status():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith(("VmHWM", "RssAnon"))}
def watch():
    while True:
        peak["anon"] = max(peak["anon"], status()["RssAnon"]); time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
# No prefix caching: every run recomputes its prompt, as bench_llama.py's reset() makes llama.cpp do (with it on,
# the second 1 x 512 prefill of the same ids was served from the cache, and the median of two halved the time).
llm = LLM(path, quantization=None if quantization == "none" else quantization, max_cache_tokens=4096,
          max_num_batched_tokens=prefill, prefix_caching=False)
load_s = time.perf_counter() - t0
rnd = random.Random(5)  # bench_llama.py's prompt: BOS + 40 ids below 100000
prompt = [100000] + [rnd.randrange(100000) for _ in range(40)]
def run(n, ids=prompt):
    t = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t
run(4)
def med(f, k=3):
    return statistics.median(f() for _ in range(k))
t_all, t_first = med(lambda: run(n_tokens)), med(lambda: run(1))
xs = [rnd.randrange(100000) for _ in range(prefill)]
t_prefill = med(lambda: run(1, xs), 2)
print(json.dumps({"load_s": load_s, "decode": (n_tokens - 1) / (t_all - t_first), "prefill": prefill / t_prefill,
                  "vmhwm": status()["VmHWM"], "peak_anon": peak["anon"], "weights": llm.weight_bytes}))
"""


def dsv2_run(path: str, quantization: str, tokens: int, prefill: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, quantization, str(tokens), str(prefill)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_run(peers: Path, gguf: str, tokens: int, prefill: int) -> dict:
    out = subprocess.run([str(peers / "llama_cpp.sh"), "python", str(peers / "bench_llama.py"), gguf,
                          "--tokens", str(tokens), "--prefill", str(prefill)],
                         capture_output=True, text=True, check=True).stdout
    decode = float(re.search(r"decode only ([\d.]+) tok/s", out).group(1))
    pre = float(re.search(r"prefill 1x\d+: ([\d.]+) tok/s", out).group(1))
    return {"decode": decode, "prefill": pre}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--pair", action="append", required=True, metavar="METHOD=GGUF",
                    help="a dsv2 quantization (int8, int4, or a `dsv2 quantize`d DIR as dir:PATH) and the GGUF "
                         "llama.cpp runs against it")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--peers", default=str(Path(__file__).resolve().parents[2] / "shared" / "peers"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pairs = [p.split("=", 1) for p in a.pair]
    ours: dict[str, list[dict]] = {m: [] for m, _ in pairs}
    theirs: dict[str, list[dict]] = {g: [] for _, g in pairs}
    for r in range(a.rounds):
        for method, gguf in pairs:
            path, q = (method[4:], "none") if method.startswith("dir:") else (a.checkpoint, method)
            if len(ours[method]) <= r:
                ours[method].append(dsv2_run(path, q, a.tokens, a.prefill))
                print(f"round {r} dsv2 {method}: {ours[method][-1]}", flush=True)
            if len(theirs[gguf]) <= r:
                theirs[gguf].append(llama_run(Path(a.peers), gguf, a.tokens, a.prefill))
                print(f"round {r} llama.cpp {os.path.basename(gguf)}: {theirs[gguf][-1]}", flush=True)
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    print("\n| dsv2 | llama.cpp | decode tok/s (dsv2 / llama.cpp / ratio) | prefill 1x%d tok/s (ratio) | dsv2 load s, "
          "peak anon GiB, weights GiB |" % a.prefill)
    print("|---|---|---|---|---|")
    result = []
    for method, gguf in pairs:
        o, t = ours[method], theirs[gguf]
        d, ld = med(o, "decode"), med(t, "decode")
        p, lp = med(o, "prefill"), med(t, "prefill")
        print(f"| {method} | {os.path.basename(gguf)} | {d:.2f} / {ld:.2f} / {d / ld:.2f}x | {p:.1f} / {lp:.1f} / "
              f"{p / lp:.2f}x | {med(o, 'load_s'):.0f}, {med(o, 'peak_anon') / 2**30:.2f}, "
              f"{o[0]['weights'] / 2**30:.2f} |")
        result.append({"dsv2": method, "llama": gguf, "ours": o, "theirs": t})
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
