"""Long contexts: batch-1 decode speed and prefill time at 1K-32K tokens of context, peak memory, cache bytes per token.

The forward benchmark's 135M-parameter DeepSeek-V2 shape (--shape tiny: the 8.5M "tiny" preset's, to check the
script) with YaRN stretched to 40,960 positions (factor 40 over 1,024), random weights saved as a checkpoint, greedy with EOS ignored. Per context C: a prompt of C random tokens,
then --new-tokens tokens.
  dsv2: `LLM` on the checkpoint (its default CPU setup, prefix caching off), prefill chunked at 2,048 tokens and
        attended in key blocks (dsv2.infer.attention); prefill = add_request to the first token, decode = the
        tokens after it, step by step;
  transformers (--transformers): DeepseekV2ForCausalLM on the same checkpoint: one forward over the prompt, then
        one token at a time on its cache;
  llama.cpp (--llama-gguf PATH): llama-bench from the peer build (../shared/peers/llama_cpp.sh) on a GGUF of the
        same checkpoint (write it with --checkpoint DIR, then `llama_cpp.sh convert DIR OUT.gguf f32`; the written
        checkpoint carries the shipped model's tokenizer files, which the converter needs, padded to the vocabulary
        by it): prefill of C tokens, and --new-tokens generated at depth C, with its defaults otherwise (f16 latent
        cache, flash attention auto) and weight repacking off (with it, DeepSeek-V2 GGUFs abort on some AVX-512
        CPUs: ../shared/peers/bench_llama.py).
Rounds interleave engines and contexts (a drift in machine load hits all alike; llama-bench runs once per round and
context); the table shows medians. Peak RSS:
the process's high-water mark during the measurement (reset before it through /proc/self/clear_refs where the
kernel allows) and its rise above the resident size before it, i.e. what the context itself costs.

    python benchmarks/long_context.py [--contexts 1024 8192 32768] [--rounds 3] [--new-tokens 32] [--transformers]
        [--llama-gguf PATH] [--checkpoint DIR] [--dtype float32|bfloat16] [--threads N] [--shape 135m|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forward import CFG  # run as `python benchmarks/long_context.py`: benchmarks/ is on sys.path
from dsv2 import ModelConfig, Transformer, save
from dsv2.config import YarnScaling
from dsv2.default_model import default_model_dir
from dsv2.infer import LLM, SamplingParams

LONG = dict(max_position_embeddings=40960, bos_token_id=None, eos_token_id=None,
            rope_scaling=YarnScaling(factor=40.0, original_max_position_embeddings=1024, mscale=0.707,
                                     mscale_all_dim=0.707))
SHAPES = {"135m": CFG.replace(**LONG), "tiny": ModelConfig.preset("tiny").replace(**LONG)}  # tiny: to check the script
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "dsv2-peers"))
MiB = 2**20


@dataclass
class Run:
    prefill_s: float
    decode_tok_s: float
    peak_rss: int  # bytes
    rss_rise: int  # bytes above the resident size before the run


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak RSS over a block of code: VmHWM after a reset, else getrusage's lifetime peak (then monotonic)."""

    def __enter__(self) -> Memory:
        self.before = _status_bytes("VmRSS")
        self.exact = _reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = (_status_bytes("VmHWM") if self.exact
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_dsv2(llm: LLM, prompt: list[int], new: int) -> Run:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    with Memory() as mem:
        t0 = time.perf_counter()
        rid = llm.add_request(prompt, params)
        t_first = None
        while llm.has_unfinished():
            outs = llm.step()
            if t_first is None and any(o.request_id == rid and o.outputs[0].token_ids for o in outs):
                t_first = time.perf_counter()
        t1 = time.perf_counter()
    return Run(t_first - t0, (new - 1) / (t1 - t_first), mem.peak, mem.peak - mem.before)


def run_transformers(model: torch.nn.Module, prompt: list[int], new: int) -> Run:
    with Memory() as mem, torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        t_first = time.perf_counter()
        for _ in range(new - 1):
            out = model(tok, cache=out.cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
    return Run(t_first - t0, (new - 1) / (t1 - t_first), mem.peak, mem.peak - mem.before)


def llama_bench() -> Path | None:
    exe = PEERS / "bin" / "llama-bench"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def run_llama(gguf: str, ctx: int, new: int, rounds: int, threads: int) -> Run:
    """llama-bench: a prefill of ctx tokens (pp at depth 0), and `new` tokens generated at depth ctx (tg)."""
    peak = 0

    def bench(*args: str) -> dict:
        nonlocal peak
        cmd = [str(llama_bench()), "-m", gguf, "-t", str(threads), "-r", str(rounds), "--repack", "0", "-o", "json",
               *args]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            # Its own high-water mark, read until it exits (VmHWM only grows). getrusage(RUSAGE_CHILDREN) would
            # report this process's resident size, which the child holds between fork and exec.
            while proc.poll() is None:
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                    peak = max(peak, int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1])
                               * 1024)
                except (OSError, StopIteration):
                    pass
                time.sleep(0.05)
            out.seek(0), err.seek(0)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read()[-2000:]}")
            return json.loads(out.read())[0]

    pp = bench("-p", str(ctx), "-n", "0")
    tg = bench("-p", "0", "-n", str(new), "-d", str(ctx))
    return Run(ctx / pp["avg_ts"], tg["avg_ts"], peak, 0)


def cache_bytes(cfg: ModelConfig, itemsize: int) -> tuple[int, int]:
    """Per token: MLA's latent cache, and the same model's attention cached in MHA form (decompressed K and V)."""
    latent = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
                                                             + cfg.v_head_dim) * itemsize
    return latent, mha


def _median(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in Run.__dataclass_fields__))


def _row(engine: str, ctx: int, r: Run) -> str:
    rise = f"{r.rss_rise / MiB:,.0f}" if engine != "llama.cpp" else "-"
    return (f"| {engine} | {ctx:,} | {r.decode_tok_s:,.1f} | {r.prefill_s:,.2f} | {ctx / r.prefill_s:,.0f} | "
            f"{r.peak_rss / MiB:,.0f} | {rise} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--shape", choices=list(SHAPES), default="135m", help="tiny: a quick check of the script")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--transformers", action="store_true", help="also transformers' DeepseekV2ForCausalLM")
    ap.add_argument("--llama-gguf", default=None, help="a GGUF of --checkpoint for llama.cpp's llama-bench")
    ap.add_argument("--checkpoint", default=None,
                    help="directory of the random checkpoint: written if absent (to convert to GGUF), else loaded")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts, new = sorted(args.contexts), args.new_tokens
    dtype = getattr(torch, args.dtype)
    if max(contexts) + new > cfg.max_position_embeddings:
        ap.error(f"contexts + new tokens must fit in {cfg.max_position_embeddings:,} positions")
    if args.llama_gguf and llama_bench() is None:
        ap.error(f"--llama-gguf: llama.cpp is not available (no {PEERS}/bin/llama-bench; "
                 "build it with ../shared/peers/llama_cpp.sh setup)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint or tmp)
        if not (ckpt / "config.json").is_file():
            torch.manual_seed(0)
            save(Transformer(cfg), ckpt)
            for f in ("tokenizer.json", "tokenizer_config.json"):  # for llama.cpp's converter
                shutil.copy(default_model_dir() / f, ckpt / f)
        longest = max(contexts) + new
        llm = LLM(ckpt, dtype=dtype, max_cache_tokens=longest + 64, max_model_len=longest, prefix_caching=False)
        cfg = llm.cfg  # a --checkpoint written earlier may have another shape
        ref = None
        if args.transformers:
            from transformers import DeepseekV2ForCausalLM
            ref = DeepseekV2ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        engines = {"dsv2": lambda p: run_dsv2(llm, p, new)}
        if ref is not None:
            engines["transformers"] = lambda p: run_transformers(ref, p, new)
        rng = random.Random(0)
        for fn in engines.values():  # warm-up: allocator, oneDNN primitives, first-call paths
            fn([rng.randrange(cfg.vocab_size) for _ in range(min(contexts[0], 512))])
        runs: dict[tuple[str, int], list[Run]] = {}
        failed: dict[tuple[str, int], str] = {}  # (engine, context) -> what it could not allocate
        if args.llama_gguf:
            engines["llama.cpp"] = lambda p: run_llama(args.llama_gguf, len(p), new, 1, torch.get_num_threads())
        for r in range(args.rounds):
            for ctx in contexts:
                prompt = [rng.randrange(cfg.vocab_size) for _ in range(ctx)]
                for name, fn in engines.items():
                    if (name, ctx) in failed:
                        continue
                    try:
                        runs.setdefault((name, ctx), []).append(fn(prompt))
                    except RuntimeError as e:  # transformers' attention at long contexts: more than the RAM
                        if name != "transformers" or "can't allocate memory" not in str(e):
                            raise
                        failed[(name, ctx)] = str(e).split("you tried to allocate ")[-1].split(".")[0]
                        runs.pop((name, ctx))
                        print(f"round {r} {name} {ctx}: out of memory ({failed[(name, ctx)]})", flush=True)
                        continue
                    print(f"round {r} {name} {ctx}: {runs[(name, ctx)][-1]}", flush=True)
    print(f"# {cfg.num_params() / 1e6:.0f}M params, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{new} new tokens after a prompt of each context, medians of {args.rounds} interleaved rounds")
    print("| engine | context | decode tok/s | prefill s | prefill tok/s | peak RSS MiB | RSS rise MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in ("dsv2", "transformers", "llama.cpp"):
        for ctx in contexts:
            if (name, ctx) in runs:
                print(_row(name, ctx, _median(runs[(name, ctx)])))
            elif (name, ctx) in failed:
                print(f"| {name} | {ctx:,} | out of memory: tried to allocate {failed[(name, ctx)]} | | | | |")
    if not args.llama_gguf:
        state = (f"available ({PEERS}/bin/llama-bench): pass --llama-gguf" if llama_bench()
                 else f"not available (no {PEERS}/bin/llama-bench)")
        print(f"\nllama.cpp: {state}")
    latent, mha = cache_bytes(cfg, dtype.itemsize)
    assert latent == llm.cache_bytes_per_token
    print(f"\n| cache bytes per token ({args.dtype}) | MLA latent {latent:,} | MHA form {mha:,} | "
          f"{mha / latent:.1f}x smaller | at {max(contexts):,} tokens: {latent * max(contexts) / MiB:,.1f} "
          f"vs {mha * max(contexts) / MiB:,.1f} MiB |")


if __name__ == "__main__":
    main()
