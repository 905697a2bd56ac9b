"""dsv2 on one GPU: the gpu-marked tests, then V2-Lite-shaped inference and a training step, as one JSON.

Sized for about 8 minutes of an H200 (the device tool's budget is 15 minutes a session, start included):

1. `pytest -m gpu` plus the Triton kernel tests, compiled on the device (the CPU CI runs them interpreted);
2. a V2-Lite-shaped model (config preset "v2-lite": 27 layers, 64 routed + 2 shared experts, 6 per token) with
   random bf16 weights built directly on the GPU, no 31 GB file to move, served by dsv2's engine:
   - batch-1 decode tok/s against the roofline: bytes of weights touched per token (the active parameters in
     bf16, lm_head included) / the HBM bandwidth (4.8 TB/s on an H200 by default: --bandwidth);
   - aggregate decode tok/s at 64 and 256 concurrent requests;
   - prefill tok/s of 8 x 2,048-token prompts;
3. one AdamW training step of a V2-Lite-shaped model cut to --train-layers layers (bf16 autocast over fp32
   master weights), tokens/s and model FLOPs utilisation against --peak-tflops (790 bf16 dense on an H200),
   with FLOPs = 6 x active non-embedding parameters x tokens + the attention's 12 x layers x heads x head dim x T
   per token (the PaLM appendix's count, with MLA's q/k head dim 192 and v 128).

Decode time is measured as the difference between a run to N new tokens and a run to 1 new token of the same
prompts (same engine, warmed up), so that prefill is not counted in it. Each section writes what it has to the JSON
before the next starts, so a run stopped at its limit still reports.

    python benchmarks/gpu.py --out $OUT/gpu.json [--skip-tests] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dsv2 import ModelConfig, Transformer
from dsv2.infer import LLM, SamplingParams


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def run_tests() -> dict[str, Any]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu_mla_decode.py", "tests/test_gpu_moe.py",
                           "tests/test_engine.py::test_engine_on_cuda_gives_the_cpu_engines_tokens",
                           "tests/test_train_run.py::test_a_training_step_on_cuda"],
                          capture_output=True, text=True, timeout=240)
    tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
    return {"returncode": done.returncode, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Built on the device in its dtype: N(0, 0.02) weights, norms at one (Transformer.init_weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """Weights one batch-1 decode step reads: the active parameters without the embedding table (one row of it is
    read), with lm_head (num_active_params counts both embedding matrices)."""
    return (cfg.num_active_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size) * itemsize


def sync() -> None:
    if torch.cuda.is_available():
        sync()


def gib_allocated(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**30, 2)


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return time.perf_counter() - t0


def decode_rate(llm: LLM, prompts: list[list[int]], new_tokens: int, rounds: int) -> dict[str, float]:
    """Aggregate decode tok/s of len(prompts) concurrent requests: (N - 1) tokens each over (t_N - t_1)."""
    timed_generate(llm, prompts, 4)  # warm-up: kernels compiled, allocator primed
    rates = []
    for _ in range(rounds):
        t_1 = timed_generate(llm, prompts, 1)
        t_n = timed_generate(llm, prompts, new_tokens)
        rates.append(len(prompts) * (new_tokens - 1) / max(t_n - t_1, 1e-9))
    rates.sort()
    return {"tok_s": rates[len(rates) // 2], "rounds": rates, "requests": len(prompts), "new_tokens": new_tokens}


def inference(args: argparse.Namespace, device: torch.device, result: dict[str, Any], out: Path) -> None:
    cfg = ModelConfig.preset(args.preset)
    t0 = time.perf_counter()
    model = random_model(cfg, device, torch.bfloat16)
    result["model"] = {"preset": args.preset, "params": cfg.num_params(), "active_params": cfg.num_active_params(),
                       "build_s": round(time.perf_counter() - t0, 1),
                       "gpu_memory_gib": gib_allocated(device)}
    llm = LLM(model, device=device, max_cache_tokens=256 * 512, max_num_seqs=256, max_num_batched_tokens=16384,
              compile=args.compile)
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(100, cfg.vocab_size, (n, length), generator=g).tolist()

    bw = args.bandwidth * 1e12
    roofline = bw / bytes_per_token(cfg, 2)
    log("batch-1 decode")
    b1 = decode_rate(llm, prompts(1, 32), args.new_tokens, args.rounds)
    result["decode_batch1"] = b1 | {"roofline_tok_s": roofline, "of_roofline": b1["tok_s"] / roofline,
                                    "bytes_per_token": bytes_per_token(cfg, 2), "bandwidth_tb_s": args.bandwidth}
    write(result, out)
    for n in (64, 256):
        log(f"decode at {n} concurrent requests")
        result[f"decode_concurrent_{n}"] = decode_rate(llm, prompts(n, 32), 32, max(1, args.rounds - 1))
        write(result, out)
    log("prefill 8 x 2048")
    batch = prompts(8, 2048)
    timed_generate(llm, batch[:1], 1)
    times = sorted(timed_generate(llm, batch, 1) for _ in range(args.rounds))
    result["prefill_8x2048"] = {"tok_s": 8 * 2048 / times[len(times) // 2], "seconds": times}
    result["engine"] = {"compiled_steps": llm.runner.compiled_steps, "decode_kernel": repr(llm.runner.decode_kernel)}
    write(result, out)
    del llm, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training(args: argparse.Namespace, device: torch.device, result: dict[str, Any], out: Path) -> None:
    from dsv2.train.optim import OptimConfig, build_optimizer

    cfg = ModelConfig.preset(args.preset).replace(num_hidden_layers=args.train_layers)
    model = random_model(cfg, device, torch.float32).train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=0))
    B, T = args.train_batch, args.train_seq
    ids = torch.randint(100, cfg.vocab_size, (B, T + 1), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    log(f"training step: {args.train_layers} layers, {B} x {T} tokens")
    step()  # warm-up
    times = []
    for _ in range(args.rounds):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    seconds = times[len(times) // 2]
    n_active = cfg.num_active_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size  # + lm_head
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2 * T
    flops = (6 * n_active + attn) * B * T
    result["train_step"] = {
        "layers": args.train_layers, "batch": B, "seq_len": T, "seconds": times,
        "tokens_per_s": B * T / seconds, "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (args.peak_tflops * 1e12), "peak_tflops": args.peak_tflops,
        "max_memory_gib": gib_allocated(device, peak=True),
    }
    write(result, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu.json")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--compile", action="store_true", help="compiled decode graphs (LLM(compile=True))")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=4.8, help="HBM TB/s for the roofline")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s for the MFU")
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=2048)
    p.add_argument("--preset", default="v2-lite", help="model config preset (a small one smoke-tests the script)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script with a small preset")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out = Path(args.out)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    sections = [("tests", not args.skip_tests), ("inference", not args.skip_inference),
                ("training", not args.skip_training)]
    for name, wanted in sections:
        if not wanted:
            continue
        log(name)
        try:
            if name == "tests":
                result["tests"] = run_tests()
            elif name == "inference":
                inference(args, device, result, out)
            else:
                training(args, device, result, out)
        except Exception as e:  # noqa: BLE001 -- one section's failure must not lose the others' figures
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {e}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write(result, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
