"""Peak memory of `dsv2.load`: the model is built on the meta device and filled tensor by tensor from
memory-mapped safetensors, so the process should peak near one copy of the weights in the target dtype.

Writes a random ~1 GB (fp32) checkpoint, then loads it in fresh subprocesses with dsv2 and, as the
baseline, with transformers' `from_pretrained`, reporting peak RSS above the interpreter's baseline.

    python benchmarks/load_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import torch

from dsv2 import ModelConfig, Transformer, save

CFG = ModelConfig(
    vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=8, n_routed_experts=48, num_experts_per_tok=4, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, torch_dtype="float32",
)

CHILD = r"""
import json, sys, torch
def hwm():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "transformers":
    from transformers import DeepseekV2ForCausalLM
else:
    import dsv2
base = hwm()
if which == "transformers":
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype)
else:
    model = dsv2.load(path, dtype=dtype)
peak = hwm()
print(json.dumps({"base": base, "peak": peak, "weights": sum(p.nbytes for p in model.parameters())}))
"""


def measure(which: str, path: str, dtype: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path, dtype], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        with torch.device("meta"):
            model = Transformer(CFG)
        model = model.to_empty(device="cpu")
        model.init_weights(0.02)
        save(model, d, max_shard_size="200MB")
        del model
        print(f"# {CFG.num_params() / 1e6:.0f}M params, fp32 checkpoint in 200 MB shards")
        print("| load as | loader | weights (MB) | peak RSS above baseline (MB) | peak / weights |")
        print("|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            for which in ("dsv2", "transformers"):
                r = measure(which, d, dtype)
                extra = r["peak"] - r["base"]
                print(f"| {dtype} | {which} | {r['weights'] / 1e6:,.0f} | {extra / 1e6:,.0f} | "
                      f"{extra / r['weights']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
