"""Generation throughput: the dsv2 engine (`LLM`) vs transformers' `generate` on one random checkpoint.

The same ~100M-parameter DeepSeek-V2-shaped model as benchmarks/forward.py, fp32, greedy, EOS ignored
(random weights), measured in the same process:
  (a) batch-1 decode: one 16-token prompt, 128 new tokens;
  (b) 32 requests of 128 new tokens with prompt lengths 8..256: the engine (continuous batching) against
      transformers one request at a time and transformers' left-padded batch `generate`;
  (c) cache bytes per token: the engine's latent cache against transformers' DynamicCache after a run.
With --compile the engine decodes small batches through torch.compile (LLM(compile=True)); the warm-up run
before the timed ones absorbs the compilation. --gemm torch keeps the engine's products on F.linear (the default,
auto, packs its weights for oneDNN on x86 CPUs unless compiling; see dsv2.kernels.onednn).

    python benchmarks/generate.py [--reps 3] [--requests 32] [--new-tokens 128] [--gemm auto|onednn|torch]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import DeepseekV2ForCausalLM

from forward import CFG  # run as `python benchmarks/generate.py`: benchmarks/ is on sys.path
from dsv2 import Transformer, save
from dsv2.infer import LLM, SamplingParams
from dsv2.kernels import onednn
from dsv2.kernels.onednn import PackedLinear

BENCH_CFG = CFG.replace(bos_token_id=None, eos_token_id=None)


def paired_medians(ours: Callable[[], object], theirs: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median seconds of each, runs interleaved so that drift in machine load hits both alike."""
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(reps):
        for fn, times in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def hf_generate(model: DeepseekV2ForCausalLM, prompts: list[list[int]], new: int) -> torch.Tensor:
    """Left-padded batch generate (one prompt: no padding)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)


def hf_cache_bytes_per_token(model: DeepseekV2ForCausalLM, prompt: list[int]) -> float:
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
    tensors = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
    return sum(t.nbytes for t in tensors) / len(prompt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-gemv-layout", action="store_true", help="keep row-major weights (for comparison)")
    ap.add_argument("--compile", action="store_true", help="LLM(compile=True): compiled decode of small batches")
    ap.add_argument("--gemm", choices=onednn.CHOICES, default="auto", help="the engine's products")
    ap.add_argument("--cases", default="batch1,serial,padded", help="comma-separated subset to run")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        model = Transformer(BENCH_CFG)
        save(model, d)
        ref = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        llm = LLM(d, dtype=torch.float32, max_cache_tokens=args.requests * (256 + new + 16), max_num_seqs=64,
                  gemv_layout=not args.no_gemv_layout, compile=args.compile, gemm=args.gemm)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    one = [rng.randrange(BENCH_CFG.vocab_size) for _ in range(16)]
    prompts = [[rng.randrange(BENCH_CFG.vocab_size) for _ in range(rng.randint(8, 256))] for _ in range(args.requests)]
    total = new * len(prompts)
    print(f"# {BENCH_CFG.num_params() / 1e6:.1f}M params, fp32, {torch.get_num_threads()} threads, "
          f"{new} new tokens per request, medians of {args.reps}, gemv layout {not args.no_gemv_layout}, compile {args.compile}, "
          f"oneDNN-packed weights {isinstance(llm.model.head, PackedLinear)}")
    print("| case | dsv2 tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    cases = args.cases.split(",")
    if "batch1" in cases:
        ours, theirs = paired_medians(lambda: llm.generate([one], params), lambda: hf_generate(ref, [one], new),
                                      args.reps)
        print(f"| batch-1 decode | {new / ours:,.1f} | {new / theirs:,.1f} | {theirs / ours:.2f}x |", flush=True)
    if "serial" in cases:
        ours, theirs = paired_medians(lambda: llm.generate(prompts, params),
                                      lambda: [hf_generate(ref, [p], new) for p in prompts], max(1, args.reps // 3))
        print(f"| {len(prompts)} requests vs one at a time | {total / ours:,.1f} | {total / theirs:,.1f} | "
              f"{theirs / ours:.2f}x |", flush=True)
    if "padded" in cases:
        ours, theirs = paired_medians(lambda: llm.generate(prompts, params), lambda: hf_generate(ref, prompts, new),
                                      args.reps)
        print(f"| {len(prompts)} requests vs padded batch | {total / ours:,.1f} | {total / theirs:,.1f} | "
              f"{theirs / ours:.2f}x |", flush=True)
    hf_bytes = hf_cache_bytes_per_token(ref, prompts[0])
    print(f"\n| cache bytes per token | dsv2 {llm.cache_bytes_per_token:,} | transformers {hf_bytes:,.0f} | "
          f"{hf_bytes / llm.cache_bytes_per_token:.1f}x smaller |")


if __name__ == "__main__":
    main()
