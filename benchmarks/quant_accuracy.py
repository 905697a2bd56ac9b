"""What weight-only int8 / int4 (dsv2.kernels.quant) costs a trained model in accuracy: held-out perplexity,
arithmetic exact-match through the engine, and the relative error of the quantized weights themselves.

1. Perplexity (256-token non-overlapping windows, as `dsv2 eval` and the shipped model's eval.json) on the two
   held-out sets of the tiny pipeline: validation-text.jsonl (500 validation-split arithmetic problems, seed 0)
   and stdlib-heldout.jsonl (the first MB of the CPython stdlib's test suites, which pretraining leaves out).
   Weights: fp32 and bf16 dense, int8, int4 groups of 32 / 64 / 128 symmetric and 64 asymmetric (all loaded by
   `dsv2.load(..., quantization=Scheme)`, activations fp32 as `dsv2 eval` runs them), and int4 g64 with the lm_head
   in int4 too (the default keeps it int8). The stdlib set scores --max-windows windows spread evenly over it
   (default 128 of its 1,343; --full scores every window, about 10x slower); the ratios are paired (the same
   windows for every variant). The targets checked: int8 within 0.5% of bf16, int4 within 3%.
2. Arithmetic exact-match on --arith test problems (seed 0, the chat template, greedy, 256 new tokens at most:
   what `dsv2 eval --arith N` does, but --max-num-seqs 16 at a time, so that decode runs on dsv2's few-row kernels) for fp32 dense, int8, int4 g64 and int4 g64 with an int4 head; also how many
   problems changed verdict against dense (the same problems, so the flips are what quantization did).
3. Per-tensor relative error ||W - W_q|| / ||W|| of each format over the tensors the scheme quantizes (each
   routed expert's w13 / w2 counted as its own tensor), median and max, per module kind. W_q is
   dequantize(quantize(W)) with fp32 scales (the portable form) and, separately, what the runtime weight
   multiplies with (scales and zeros held in bf16 for torch's kernels).
--ablation adds int4 g64 perplexities with one module kind at a time kept dense (fp32), or in int8.

The data files are built when missing, the way `make tiny-model` builds them (`python -m dsv2.train.tasks DATA
--stdlib`), into --data; the stdlib file depends on the Python whose stdlib it reads (built from CPython 3.11.7
it has the 343,553 tokens of the shipped eval.json). Scoring is dsv2.eval.perplexity's, kept per window (for the
standard errors).

    python benchmarks/quant_accuracy.py [--model DIR] [--data data/tiny] [--max-windows 128 | --full]
        [--arith 500] [--ablation] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv2 import LLM, Tokenizer, load
from dsv2.default_model import default_model_dir
from dsv2.eval.commands import heldout_tokens
from dsv2.eval.perplexity import window_batch, windows
from dsv2.eval.tasks import arithmetic_accuracy
from dsv2.kernels import quant
from dsv2.kernels.quant import Scheme
from dsv2.model.moe import Experts
from dsv2.train import tasks

WINDOW = 256
BATCH = 32  # windows per forward (dsv2 eval uses 8; the sums agree to float rounding, and 32 is faster here)
PPL_FILES = ("validation-text.jsonl", "stdlib-heldout.jsonl")
FORMATS = {"int8": Scheme("int8"), "int4 g32": Scheme("int4", 32), "int4 g64": Scheme("int4", 64),
           "int4 g128": Scheme("int4", 128), "int4 g64 asym": Scheme("int4", 64, symmetric=False)}
KINDS = ("attention", "dense MLP", "shared experts", "routed experts", "lm_head")
HEAD4 = "int4 g64, head int4"


# ------------------------------------------------------------------------------------------------ data
def ensure_data(data: Path) -> dict[str, Path]:
    """The held-out files in `data`, built as `python -m dsv2.train.tasks data --stdlib` builds them if absent."""
    paths = {name: data / name for name in PPL_FILES}
    if not paths["validation-text.jsonl"].is_file():
        tasks.write_arithmetic(data, {"validation": 500}, seed=0)
    if not paths["stdlib-heldout.jsonl"].is_file():
        files, chars = tasks.write_stdlib_corpus(paths["stdlib-heldout.jsonl"], max_bytes=2**20, tests=True)
        print(f"built {paths['stdlib-heldout.jsonl']}: {files} stdlib test files, {chars} characters "
              f"(from {tasks.stdlib_root()})", flush=True)
    return paths


def pick(spans: list[tuple[int, int, int]], k: int | None) -> list[tuple[int, int, int]]:
    """At most k of the windows, evenly spread (all of them when k is None or there are no more)."""
    if k is None or len(spans) <= k:
        return spans
    return [spans[i * len(spans) // k] for i in range(k)]


@torch.inference_mode()
def window_nll(model: nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[tuple[float, int]]:
    """(summed NLL, targets) per window: dsv2.eval.perplexity's scoring, kept per window for the paired errors."""
    model.eval()
    out = []
    for i in range(0, len(spans), BATCH):
        part = spans[i:i + BATCH]
        ids_BT, attn_BT, targets_BT = window_batch(ids, part)
        T = ids_BT.shape[1]
        logits = model(ids_BT, attention_mask=attn_BT).float()  # bf16 logits scored in fp32
        # per token over (rows, vocab) as dsv2.eval.perplexity does (a log-softmax over dim 1 of (B, V, T) logits
        # was off by 2.5e-5 of the mean NLL here), each window's sum in fp64
        nll_BT = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), ignore_index=-100, reduction="none")
        out.extend(zip(nll_BT.view(len(part), T).double().sum(1).tolist(), (targets_BT != -100).sum(1).tolist()))
    return out


def paired(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> tuple[float, float]:
    """Mean-NLL difference a - b over the same windows and its standard error, windows as the sampling unit
    (a ratio estimator: tokens within a window are not independent). exp(difference) is the perplexity ratio."""
    d = [x[0] - y[0] for x, y in zip(a, b, strict=True)]
    n = [x[1] for x in a]
    delta = sum(d) / sum(n)
    w = len(d)
    var = sum((di - delta * ni) ** 2 for di, ni in zip(d, n)) * w / max(w - 1, 1)
    return delta, math.sqrt(var) / sum(n)


# -------------------------------------------------------------------------------------------- variants
def kind(name: str, module: nn.Module) -> str:
    if name == "head":
        return "lm_head"
    if isinstance(module, Experts):
        return "routed experts"
    if ".shared." in name:
        return "shared experts"
    if ".attn." in name:
        return "attention"
    return "dense MLP"


def quantize_chosen(model: nn.Module, chosen: dict[str, Scheme]) -> nn.Module:
    """quant.quantize_ on a chosen subset of modules with chosen schemes (the same quantize + build steps)."""
    with torch.no_grad():
        for name, s in chosen.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            module = getattr(parent, child)
            parts = {p: quant.quantize(t.detach(), s) for p, t in module.named_parameters(recurse=False)}
            setattr(parent, child, quant.build(module, parts, s))
    return model


def head_int4(model_dir: Path, scheme: Scheme) -> nn.Module:
    """The scheme everywhere it applies, the lm_head included (the default puts the head in int8)."""
    model = load(model_dir, dtype=torch.float32)
    chosen = quant.targets(model, scheme)
    head = model.get_submodule("head").weight
    if not (head.shape[0] % 16 or head.shape[1] % scheme.group_size):
        chosen["head"] = scheme
    return quantize_chosen(model, chosen)


def kept(model_dir: Path, scheme: Scheme, keep: str, keep_scheme: Scheme | None) -> nn.Module:
    """The scheme everywhere but one module kind, which is kept dense (keep_scheme None) or in keep_scheme."""
    model = load(model_dir, dtype=torch.float32)
    chosen = {}
    for name, s in quant.targets(model, scheme).items():
        if kind(name, model.get_submodule(name)) != keep:
            chosen[name] = s
        elif keep_scheme is not None:
            chosen[name] = keep_scheme
    return quantize_chosen(model, chosen)


def ppl_variants(model_dir: Path, ablation: bool) -> dict[str, Callable[[], nn.Module]]:
    v: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: load(model_dir, dtype=torch.float32),
        "bf16": lambda: load(model_dir, dtype=torch.bfloat16),
    }
    for name, s in FORMATS.items():
        v[name] = lambda s=s: load(model_dir, dtype=torch.float32, quantization=s)
    v[HEAD4] = lambda: head_int4(model_dir, FORMATS["int4 g64"])
    if ablation:
        for k in KINDS:
            v[f"int4 g64, {k} fp32"] = lambda k=k: kept(model_dir, FORMATS["int4 g64"], k, None)
        for k in KINDS[:-1]:  # the head is int8 already
            v[f"int4 g64, {k} int8"] = lambda k=k: kept(model_dir, FORMATS["int4 g64"], k, FORMATS["int8"])
    return v


def same_as_load(model_dir: Path, ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> float:
    """Max |logit difference| between quantize_chosen (the head / ablation variants' path) with the default targets
    and load(quantization=int4 g64) on one batch of windows: 0 means the two paths build the same model."""
    s = FORMATS["int4 g64"]
    a = load(model_dir, dtype=torch.float32, quantization=s)
    dense = load(model_dir, dtype=torch.float32)
    b = quantize_chosen(dense, quant.targets(dense, s))
    x = torch.stack([ids[start:end] for start, end, _ in spans[:4] if end - start == WINDOW])
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())


# ------------------------------------------------------------------------------------------- weight error
def weight_errors(model_dir: Path) -> list[dict[str, Any]]:
    """One row per (tensor, format): relative error of the portable and of the runtime (bf16-scale) forms."""
    model = load(model_dir, dtype=torch.float32)
    rows = []
    for name, _ in quant.targets(model, Scheme("int8")).items():
        module = model.get_submodule(name)
        for pname, p in module.named_parameters(recurse=False):
            stack = p.detach().float()
            mats = list(stack.unbind(0)) if stack.dim() == 3 else [stack]
            for e, w in enumerate(mats):
                tensor = f"{name}.{pname}" + (f"[{e}]" if stack.dim() == 3 else "")
                norm = w.norm()
                for fmt, s in FORMATS.items():
                    n, k = w.shape
                    if s.method == "int4" and (n % 16 or k % s.group_size):
                        continue  # quant.targets would put this one in int8
                    qt = quant.quantize(w, s)
                    portable = (w - quant.dequantize(qt, s)).norm() / norm
                    runtime = (w - quant.runtime_weights(qt, s).dequantize(torch.float32)).norm() / norm
                    rows.append({"tensor": tensor, "kind": kind(name, module), "shape": [n, k], "format": fmt,
                                 "rel_error": float(portable), "rel_error_runtime": float(runtime)})
    return rows


def error_summary(rows: list[dict[str, Any]], key: str = "rel_error") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for fmt in FORMATS:
        mine = [r for r in rows if r["format"] == fmt]
        groups = {"all": mine} | {k: [r for r in mine if r["kind"] == k] for k in KINDS}
        out[fmt] = {g: {"median": statistics.median(r[key] for r in rs), "max": max(r[key] for r in rs),
                        "tensors": len(rs)} for g, rs in groups.items() if rs}
    return out


# ------------------------------------------------------------------------------------------- arithmetic
def arithmetic(model_dir: Path, n: int, max_tokens: int, max_num_seqs: int) -> dict[str, dict[str, Any]]:
    batch = tasks.problems("test", n, 0)
    k = {"dtype": "float32", "max_num_seqs": max_num_seqs}
    variants: dict[str, Callable[[], LLM]] = {
        "fp32": lambda: LLM(model_dir, **k),
        "int8": lambda: LLM(model_dir, quantization=FORMATS["int8"], **k),
        "int4 g64": lambda: LLM(model_dir, quantization=FORMATS["int4 g64"], **k),
        HEAD4: lambda: LLM(head_int4(model_dir, FORMATS["int4 g64"]), tokenizer=model_dir, **k),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, make in variants.items():
        llm = make()
        texts: list[str] = []
        chat = llm.chat

        def recording(*a: Any, _chat: Callable[..., Any] = chat, **k: Any) -> Any:
            outputs = _chat(*a, **k)
            texts.extend(o.outputs[0].text for o in outputs)
            return outputs

        llm.chat = recording  # type: ignore[method-assign]  # to keep each problem's verdict
        t = time.perf_counter()
        r = arithmetic_accuracy(llm, batch, max_tokens, "chat")
        r["seconds"] = time.perf_counter() - t
        r["per_problem"] = tasks.exact_match(texts, [p.answer for p in batch])
        if name != "fp32":
            base = out["fp32"]["per_problem"]
            r["fixed"] = sum(c and not b for b, c in zip(base, r["per_problem"]))
            r["broken"] = sum(b and not c for b, c in zip(base, r["per_problem"]))
        out[name] = r
        print(f"arithmetic {name}: {r['correct']}/{r['n']} ({r['seconds']:.0f} s)", flush=True)
        del llm
    return out


# ------------------------------------------------------------------------------------------------ report
def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def pct(x: float, se: float | None = None) -> str:
    return f"{(x - 1) * 100:+.2f}%" + ("" if not se else f" ± {se * 100:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped dsv2-tiny)")
    ap.add_argument("--data", default="data/tiny", help="directory of validation-text.jsonl and "
                    "stdlib-heldout.jsonl; built there when missing")
    ap.add_argument("--max-windows", type=int, default=128, help="windows scored per file, spread evenly")
    ap.add_argument("--full", action="store_true", help="score every window (as eval.json does)")
    ap.add_argument("--arith", type=int, default=500, metavar="N", help="test problems; 0 skips arithmetic")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16,
                    help="sequences decoded at once (at most native.MAX_ROWS = 16: every decode product then runs on "
                         "dsv2's kernels, as a single user's decode does; past it the weights are dequantized)")
    ap.add_argument("--ablation", action="store_true", help="also int4 g64 with one module kind kept in fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = Path(a.model) if a.model else default_model_dir()
    machine, date = cpu_name(), datetime.date.today().isoformat()
    started = time.perf_counter()
    print(f"# {model_dir}, {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date}",
          flush=True)
    shipped = json.loads((model_dir / "eval.json").read_text()) if (model_dir / "eval.json").is_file() else {}
    shipped_ppl = {Path(p["file"]).name: p for p in shipped.get("perplexity", [])}

    tok = Tokenizer.from_dir(model_dir)
    data: dict[str, dict[str, Any]] = {}
    for name, path in ensure_data(Path(a.data)).items():
        ids = heldout_tokens(tok, path)
        spans = windows(len(ids), WINDOW, WINDOW)
        chosen = pick(spans, None if a.full else a.max_windows)
        data[name] = {"path": str(path), "ids": torch.tensor(ids), "spans": chosen, "windows_total": len(spans),
                      "tokens_total": len(ids) - 1, "windows": len(chosen)}

    result: dict[str, Any] = {"model": str(model_dir), "machine": machine, "date": date,
                              "threads": torch.get_num_threads(), "torch": torch.__version__, "window": WINDOW,
                              "data": {k: {x: d[x] for x in ("path", "windows", "windows_total", "tokens_total")}
                                       for k, d in data.items()}}
    first = next(iter(data.values()))
    result["quantize_chosen_vs_load_max_abs_logit_diff"] = same_as_load(model_dir, first["ids"], first["spans"])

    # 3. weight error (fast; first)
    rows = weight_errors(model_dir)
    result["weight_error"] = {"portable": error_summary(rows), "runtime": error_summary(rows, "rel_error_runtime"),
                              "tensors": rows}

    # 1. perplexity
    ppl: dict[str, dict[str, Any]] = {}
    for vname, make in ppl_variants(model_dir, a.ablation).items():
        t = time.perf_counter()
        model = make()
        entry: dict[str, Any] = {"weight_bytes": quant.model_weight_bytes(model)}
        for fname, d in data.items():
            per_window = window_nll(model, d["ids"], d["spans"])
            total, count = sum(x[0] for x in per_window), sum(x[1] for x in per_window)
            entry[fname] = {"mean_nll": total / count, "perplexity": math.exp(total / count), "tokens": count,
                            "per_window": per_window}
        entry["seconds"] = time.perf_counter() - t
        ppl[vname] = entry
        print(f"ppl {vname}: " + ", ".join(f"{f} {entry[f]['perplexity']:.4f}" for f in data)
              + f" ({entry['seconds']:.0f} s)", flush=True)
        del model
    for v in ppl.values():
        for f in data:
            for base in ("fp32", "bf16"):
                delta, se = paired(v[f]["per_window"], ppl[base][f]["per_window"])
                v[f][f"ratio_{base}"], v[f][f"ratio_{base}_se"] = math.exp(delta), se  # se of log(ratio)
    for v in ppl.values():
        for f in data:
            v[f].pop("per_window")
    result["perplexity"] = ppl

    # 2. arithmetic
    if a.arith:
        result["arithmetic"] = arithmetic(model_dir, a.arith, a.max_tokens, a.max_num_seqs)
    result["seconds"] = time.perf_counter() - started

    # ---- tables
    short = {"validation-text.jsonl": "held-out problems", "stdlib-heldout.jsonl": "stdlib tests"}
    print(f"\nmachine: {machine}, {result['threads']} threads, torch {torch.__version__}; model {model_dir.name}; "
          f"quantize_chosen vs load() max |logit diff| {result['quantize_chosen_vs_load_max_abs_logit_diff']:.1e}")
    for f, d in data.items():
        line = f"{f}: {d['windows']} of {d['windows_total']} windows of {WINDOW}, {d['tokens_total']:,} tokens in all"
        if f in shipped_ppl and d["windows"] == d["windows_total"]:
            line += (f"; eval.json: ppl {shipped_ppl[f]['perplexity']:.4f} over {shipped_ppl[f]['tokens']:,} tokens "
                     f"(fp32 here {ppl['fp32'][f]['perplexity']:.4f} over {ppl['fp32'][f]['tokens']:,})")
        print(line)
    print("(vs fp32 / bf16: perplexity ratio - 1, ± one standard error of the paired difference over windows)")
    cols = " | ".join(f"{short.get(f, f)} ppl | vs fp32 | vs bf16" for f in data)
    print(f"\n| date | machine | weights | MiB | {cols} | target |")
    print("|---|---|---|---|" + "---|---|---|" * len(data) + "---|")
    for vname, v in ppl.items():
        cells = " | ".join(f"{v[f]['perplexity']:.4f} | {pct(v[f]['ratio_fp32'], v[f]['ratio_fp32_se'])} | "
                           f"{pct(v[f]['ratio_bf16'], v[f]['ratio_bf16_se'])}" for f in data)
        worst = max(v[f]["ratio_bf16"] for f in data)
        limit = 1.005 if vname == "int8" else 1.03 if vname.startswith("int4") else None
        target = "" if limit is None else f"{'met' if worst <= limit else 'MISSED'} (+{(limit - 1) * 100:.1f}%)"
        print(f"| {date} | {machine} | {vname} | {v['weight_bytes'] / 2**20:.1f} | {cells} | {target} |")

    if a.arith:
        ar = result["arithmetic"]
        print(f"\n| date | machine | weights | arithmetic exact-match ({a.arith} test) | vs fp32 | "
              "fixed / broken vs fp32 |")
        print("|---|---|---|---|---|---|")
        for vname, r in ar.items():
            delta = "" if vname == "fp32" else f"{(r['accuracy'] - ar['fp32']['accuracy']) * 100:+.1f} pt"
            flips = "" if vname == "fp32" else f"{r['fixed']} / {r['broken']}"
            print(f"| {date} | {machine} | {vname} | {r['accuracy'] * 100:.1f}% ({r['correct']}) | {delta} | "
                  f"{flips} |")

    for form, title in (("portable", "fp32 scales"), ("runtime", "scales/zeros in bf16, as the kernels hold them")):
        summ = result["weight_error"][form]
        print(f"\nRelative weight error ||W - W_q|| / ||W||, median / max over tensors, % ({title}):\n")
        print("| format | all | " + " | ".join(KINDS) + " |")
        print("|---|---|" + "---|" * len(KINDS))
        for fmt, groups in summ.items():
            cells = [f"{groups[g]['median'] * 100:.2f} / {groups[g]['max'] * 100:.2f}" if g in groups else "-"
                     for g in ("all", *KINDS)]
            print(f"| {fmt} | " + " | ".join(cells) + " |")
    counts = result["weight_error"]["portable"]["int8"]
    print("\ntensors: " + ", ".join(f"{g} {counts[g]['tensors']}" for g in ("all", *KINDS) if g in counts)
          + f"; total {result['seconds'] / 60:.1f} min")

    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
