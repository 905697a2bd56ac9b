"""Training throughput: a dsv2 training step vs transformers' DeepseekV2ForCausalLM on the same weights and batch.

One step = forward, next-token cross-entropy, backward, AdamW (0.9, 0.95, wd 0.1) update, in fp32 (or with
forward and loss under bf16 autocast on both sides, --autocast bfloat16, as `dsv2 train` offers): dsv2's
optimizer (fused AdamW) against torch's default AdamW on transformers' side (--fused-baseline: fused too).
Neither side adds balance losses or drops tokens (transformers' native class has no DeepSeek aux loss), so
both models do the same arithmetic (the two AdamW variants differ only in rounding). Two configurations: the
`tiny` preset and the ~100M model of benchmarks/forward.py. Steps alternate between the two models so drift
in machine load hits both alike; we report median tokens/s and the ratio.

    python benchmarks/train.py [--reps 5] [--batch 4] [--seq 256] [--threads N] [--only tiny|100m] [--profile]
                               [--fused-baseline] [--keep-freed-memory] [--gemm auto|onednn|torch]
                               [--autocast none|bfloat16]

dsv2's side multiplies as `dsv2 train` does by default (--gemm auto: through oneDNN on x86 CPUs, see
dsv2.kernels.onednn); --gemm torch gives it F.linear, the library transformers' side always uses.

--profile also runs one profiled step of each side and prints the time in matrix products (aten::mm, bmm,
addmm, baddbmm; self time, which includes the BLAS call) and the bound it puts on the ratio: if dsv2 spent
no time at all outside its matrix products, its step could be at most transformers' step / dsv2's GEMM time
faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from dsv2 import ModelConfig, load
from dsv2.hardware import keep_freed_memory
from dsv2.kernels import onednn
from dsv2.train.optim import OptimConfig, build_optimizer



def _config_100m() -> ModelConfig:
    """The forward benchmark's ~100M model (imported, not copied, so the two benchmarks stay comparable)."""
    spec = importlib.util.spec_from_file_location("forward_bench", Path(__file__).with_name("forward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CFG


def step_fn(model: torch.nn.Module, ids: torch.Tensor, ours: bool, fused_baseline: bool = False,
            bf16: bool = False) -> Callable[[], float]:
    """dsv2's optimizer is fused AdamW; transformers' side gets torch's default AdamW unless fused_baseline.
    bf16: forward and loss under torch.autocast(bfloat16), as `dsv2 train --train.autocast=bfloat16`."""
    opt = build_optimizer(model, OptimConfig(lr=1e-4)) if ours else torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused_baseline)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if ours:
                loss = model(inputs, labels=targets)  # as dsv2 train: lm_head + cross-entropy in chunks
            else:
                logits = model(inputs).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# transformers runs its routed experts through torch._grouped_mm (its default experts implementation), whose CPU
# kernel here calls aten::mm inside; it is listed for builds where it does the product itself.
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm", "mkldnn::_linear_pointwise")


def profiled_ms(fn: Callable[[], float]) -> tuple[float, float]:
    """(whole step, matrix products) in ms, from one step under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    gemm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS)
    return wall * 1e3, gemm_us / 1e3


def bench(name: str, cfg: ModelConfig, batch: int, seq: int, reps: int, profile: bool = False,
          fused_baseline: bool = False, gemm: str = "auto", bf16: bool = False) -> None:
    torch.manual_seed(0)
    ref = DeepseekV2ForCausalLM(DeepseekV2Config(**cfg.to_hf())).train()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = load(d, dtype=torch.float32).train()
    if onednn.wanted(gemm):
        onednn.use_for_training_(ours)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    run_ours = step_fn(ours, ids, ours=True, bf16=bf16)
    run_ref = step_fn(ref, ids, ours=False, fused_baseline=fused_baseline, bf16=bf16)
    first_ours, first_ref = run_ours(), run_ref()  # warm-up; same weights, so the same first loss
    assert abs(first_ours - first_ref) < (2e-2 if bf16 else 1e-3), (first_ours, first_ref)
    t_ours, t_ref = [], []
    for _ in range(reps):
        for fn, times in ((run_ours, t_ours), (run_ref, t_ref)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    tokens = batch * seq
    a, b = tokens / statistics.median(t_ours), tokens / statistics.median(t_ref)
    params = f"{cfg.num_params() / 1e6:.1f}M ({cfg.num_active_params() / 1e6:.1f}M active)"
    print(f"| {name} | {params} | {batch} x {seq} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |", flush=True)
    if profile:
        (step_o, gemm_o), (step_r, gemm_r) = profiled_ms(run_ours), profiled_ms(run_ref)
        print(f"#   profiled step, {name}: dsv2 {step_o:.0f} ms ({gemm_o:.0f} ms = {gemm_o / step_o:.0%} in GEMMs), "
              f"transformers {step_r:.0f} ms ({gemm_r:.0f} ms = {gemm_r / step_r:.0%} in GEMMs); ratio bound if "
              f"dsv2 ran only its GEMMs: {step_r / gemm_o:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["tiny", "100m"], default=None)
    ap.add_argument("--profile", action="store_true", help="also report time in matrix products (one step each)")
    ap.add_argument("--fused-baseline", action="store_true", help="give transformers' side fused AdamW too")
    ap.add_argument("--gemm", choices=onednn.CHOICES, default="auto",
                    help="dsv2's products: oneDNN (auto: on x86 CPUs) or F.linear")
    ap.add_argument("--autocast", choices=["none", "bfloat16"], default="none",
                    help="bfloat16: both sides' forward and loss under CPU autocast (bf16 products)")
    ap.add_argument("--keep-freed-memory", action="store_true", help="apply dsv2.hardware.keep_freed_memory() "
                    "first, as `dsv2 train` does; process-wide, so both sides run with it")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("error: keep_freed_memory() does not apply here (needs Linux with glibc)")
    configs = {"tiny": ModelConfig.preset("tiny"), "100m": _config_100m()}
    adamw = "fused AdamW on both sides" if args.fused_baseline else "dsv2 fused AdamW, transformers default AdamW"
    adamw += ", freed memory kept (both sides)" if args.keep_freed_memory else ""
    bf16 = args.autocast == "bfloat16"
    # Under autocast dsv2's oneDNN products step aside for F.linear's bf16 ones (dsv2.kernels.onednn.linear).
    adamw += f", dsv2 GEMMs via {'oneDNN' if onednn.wanted(args.gemm) and not bf16 else 'F.linear'}"
    print(f"# training step (fwd + CE + bwd + AdamW), {adamw}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"medians of {args.reps}")
    print("| config | params | batch | dsv2 tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        if args.only in (None, name):
            bench(name, cfg, args.batch, args.seq, args.reps, args.profile, args.fused_baseline, args.gemm, bf16)


if __name__ == "__main__":
    main()
