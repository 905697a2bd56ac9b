"""Prefill throughput: dsv2 vs transformers' DeepseekV2ForCausalLM on the same random weights.

A ~100M-parameter DeepSeek-V2-shaped model (MLA with q compression, 32 routed experts in 4 groups, 2 shared,
one dense layer), batch 4 x 512 tokens, fp32 and bf16, under inference_mode: prefill (hidden states for
every position, logits for the last, as an engine does) and the full forward (logits everywhere). Both models run
in the same process, alternating, several repetitions; we report medians and the ratio.

    python benchmarks/forward.py [--reps 5] [--batch 4] [--seq 512] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from dsv2 import ModelConfig, load
from dsv2.config import YarnScaling

CFG = ModelConfig(
    vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=8, n_shared_experts=2, n_routed_experts=32, num_experts_per_tok=4,
    topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=256, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
    rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=1024, mscale=0.707, mscale_all_dim=0.707),
    torch_dtype="float32",
)


def time_forward(fn, reps: int) -> list[float]:  # noqa: ANN001
    fn()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = DeepseekV2ForCausalLM(DeepseekV2Config(**CFG.to_hf())).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours32 = load(d, dtype=torch.float32)
        ours16 = load(d, dtype=torch.bfloat16)
        ref16 = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, CFG.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(f"# {CFG.num_params() / 1e6:.1f}M params ({CFG.num_active_params() / 1e6:.1f}M active), "
          f"batch {args.batch} x {args.seq}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print("| dtype | what | dsv2 tok/s (median) | transformers tok/s (median) | ratio |")
    print("|---|---|---|---|---|")
    for dtype, ours, theirs in [("fp32", ours32, ref), ("bf16", ours16, ref16)]:
        cases = {
            # what an engine's prefill computes: every position's hidden state, the last position's logits
            "prefill (last-token logits)": (lambda: ours.logits(ours.hidden_states(ids)[:, -1:]),
                                            lambda: theirs(ids, logits_to_keep=1).logits.float()),
            "forward (all logits, fp32)": (lambda: ours(ids), lambda: theirs(ids).logits.float()),
        }
        for what, (run_ours, run_ref) in cases.items():
            with torch.inference_mode():
                t_ours, t_ref = [], []
                for _ in range(args.reps):  # interleaved, so drift in machine load hits both alike
                    t_ours += time_forward(run_ours, 1)
                    t_ref += time_forward(run_ref, 1)
            a, b = tokens / statistics.median(t_ours), tokens / statistics.median(t_ref)
            print(f"| {dtype} | {what} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
