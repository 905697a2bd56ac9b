"""The per-token cost of constrained decoding: JSON-schema output against unconstrained, same engine, same run.

A random ~100M-parameter checkpoint (the config of benchmarks/forward.py) with the real DeepSeek-V2 tokenizer
(102,400-entry vocabulary: the mask is as wide as a real checkpoint's), in-process `LLM`, greedy decoding at batch 1
and at --batch concurrent requests. The constrained side asks for a JSON object with one long string property (a
random model inside a string almost never picks the closing quote among the ~100K tokens allowed there, so it runs
to max_tokens like the unconstrained side); each side's decode time is its run to N tokens minus its run to 1 token,
divided by the tokens actually generated. The two sides alternate for --rounds rounds; medians are reported, and the
overhead is (constrained ms/token - unconstrained ms/token) per decode step.

    python benchmarks/constrained.py [--batch 32] [--max-tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from forward import CFG  # run as `python benchmarks/constrained.py`: benchmarks/ is on sys.path
from dsv2 import LLM, SamplingParams, Tokenizer, Transformer
from dsv2.infer.grammar import Grammar
from dsv2.tokenizer import named_tokenizer_dir

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
          "additionalProperties": False}


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(errors[0])
    return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)


def ms_per_step(llm: LLM, prompts: list[list[int]], grammar: Grammar | None, max_tokens: int) -> tuple[float, float]:
    """(ms per decode step, mean tokens generated per request) for one run to max_tokens less one run to 1."""
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, grammar=grammar)
    full = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, grammar=grammar)
    t1, _ = timed(llm, prompts, one)
    tn, n = timed(llm, prompts, full)
    steps = n / len(prompts) - 1  # decode steps after the first token (requests run in lockstep)
    return 1e3 * (tn - t1) / max(steps, 1), n / len(prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CFG.replace(vocab_size=102400, bos_token_id=100000, eos_token_id=100001)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tok = Tokenizer.from_dir(named_tokenizer_dir("deepseek-v2"))
    llm = LLM(model, tokenizer=tok, max_cache_tokens=args.batch * (args.max_tokens + 64), max_num_seqs=args.batch)
    grammar = Grammar.json_schema(SCHEMA)
    g = torch.Generator().manual_seed(1)
    result: dict = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%d"), "vocab": cfg.vocab_size, "max_tokens": args.max_tokens}
    for batch in (1, args.batch):
        prompts = torch.randint(100, 90000, (batch, 24), generator=g).tolist()
        ms_per_step(llm, prompts, grammar, 4)  # warm-up: the schema compiled once, the engine's buffers touched
        ms_per_step(llm, prompts, None, 4)
        rows: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
        lengths = []
        for _ in range(args.rounds):
            rows["unconstrained"].append(ms_per_step(llm, prompts, None, args.max_tokens)[0])
            ms, length = ms_per_step(llm, prompts, grammar, args.max_tokens)
            rows["json_schema"].append(ms)
            lengths.append(length)
        free, held = statistics.median(rows["unconstrained"]), statistics.median(rows["json_schema"])
        result[f"batch_{batch}"] = {
            "unconstrained_ms_per_step": free, "json_schema_ms_per_step": held,
            "overhead_ms_per_step": held - free, "overhead_ms_per_token": (held - free) / batch,
            "ratio": held / free, "constrained_tokens_per_request": statistics.median(lengths), "rounds": rows,
        }
        print(json.dumps({f"batch_{batch}": result[f"batch_{batch}"]}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
