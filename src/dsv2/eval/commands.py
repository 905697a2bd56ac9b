"""`dsv2 eval`: perplexity, arithmetic exact-match, HumanEval pass@1 and the long-context measures (needle in a
haystack, loss by position) of one checkpoint, printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dsv2.eval.needle import DEFAULT_DEPTHS, DEFAULT_LENGTHS
from dsv2.eval.tasks import ARITH_FORMATS
from dsv2.train.data import documents


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, arithmetic exact-match, HumanEval pass@1, "
                                    "FIM exact match, long context")
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer files")
    p.add_argument("--ppl-text", nargs="+", default=[], metavar="FILE",
                   help="held-out text for perplexity, one result per file: UTF-8 text, or JSONL whose 'text' "
                        "fields are documents (joined by EOS, as the pretraining loader packs them)")
    p.add_argument("--ppl-window", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--ppl-stride", type=int, default=None, help="window slide (default: the window, no overlap)")
    p.add_argument("--arith", type=int, default=0, metavar="N", help="N held-out (test split) arithmetic problems")
    p.add_argument("--arith-split", default="test", choices=("validation", "test"))
    p.add_argument("--arith-seed", type=int, default=0)
    p.add_argument("--arith-format", default="chat", choices=ARITH_FORMATS,
                   help="chat: a user turn (fine-tuned models); text: plain completion (base models)")
    p.add_argument("--humaneval", action="store_true", help="HumanEval pass@1 (greedy; runs generated code)")
    p.add_argument("--humaneval-limit", type=int, default=None, metavar="K", help="only the first K problems")
    p.add_argument("--fim", type=int, default=0, metavar="N",
                   help="N fill-in-the-middle cases: a line removed from held-out code, filled greedily (exact "
                        "match, and the same line written from the prefix alone as the baseline)")
    p.add_argument("--fim-source", default=None, metavar="FILE",
                   help="held-out code for --fim (.jsonl or text; default: the stdlib's test files)")
    p.add_argument("--fim-seed", type=int, default=0)
    p.add_argument("--needle", action="store_true",
                   help="needle in a haystack over --needle-lengths x --needle-depths (dsv2.eval.needle)")
    p.add_argument("--needle-lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="T",
                   help="prompt lengths in tokens; beyond the checkpoint's context they are extrapolated")
    p.add_argument("--needle-depths", type=int, default=DEFAULT_DEPTHS, metavar="K",
                   help="K depths evenly from the first line (0%%) to just before the question (100%%)")
    p.add_argument("--needle-n", type=int, default=4, metavar="N", help="fresh needles per cell")
    p.add_argument("--needle-seed", type=int, default=0)
    p.add_argument("--needle-filler", default=None, metavar="FILE",
                   help="held-out filler: JSONL 'text' documents or a text file (default: the stdlib's test "
                        "suites, which pretraining leaves out)")
    p.add_argument("--needle-plot", default=None, metavar="PNG",
                   help="the heatmap (default: beside --out, its name with .needle.png, when --out is given)")
    p.add_argument("--copy", action="store_true",
                   help="loss on a repeated span of held-out filler, first vs second reading: whether the model "
                   "can copy from its context at all (dsv2.eval.needle.copy_loss)")
    p.add_argument("--loss-by-position", default=None, metavar="FILE",
                   help="held-out documents (JSONL 'text' or a text file) for the loss at each position")
    p.add_argument("--loss-by-position-length", type=int, default=8192, metavar="T",
                   help="tokens read from each document that has at least that many")
    p.add_argument("--max-tokens", type=int, default=256, help="generation limit for the generated tasks")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N')")
    p.add_argument("--quantization", choices=("int8", "int4"), default=None,
                   help="evaluate with weight-only int8 or int4 projections and experts (int4: groups of 64)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result here")
    p.set_defaults(func=run_eval)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dsv2 import LLM, Tokenizer, load
    from dsv2.eval.perplexity import perplexity
    from dsv2.eval.tasks import arithmetic_accuracy, humaneval_pass_at_1, humaneval_problems
    from dsv2.train.tasks import problems

    model_dir = Path(args.model)
    result: dict[str, Any] = {"model": str(model_dir)}
    if args.ppl_text:
        tok = Tokenizer.from_dir(model_dir)
        model = load(model_dir, dtype=torch.float32, device=args.device, quantization=args.quantization)
        result["perplexity"] = []
        for path in args.ppl_text:
            ppl = perplexity(model, heldout_tokens(tok, Path(path)), args.ppl_window, args.ppl_stride)
            result["perplexity"].append({"file": path, "perplexity": ppl.perplexity, "mean_nll": ppl.mean_nll,
                                         "tokens": ppl.tokens, "window": args.ppl_window})
    if args.arith or args.humaneval or args.fim:
        llm = LLM(model_dir, dtype=args.dtype, device=args.device, quantization=args.quantization)
        if args.arith:
            batch = problems(args.arith_split, args.arith, args.arith_seed)
            result["arithmetic"] = (arithmetic_accuracy(llm, batch, args.max_tokens, args.arith_format)
                                    | {"split": args.arith_split})
        if args.humaneval:
            result["humaneval"] = humaneval_pass_at_1(llm, humaneval_problems(args.humaneval_limit), args.max_tokens)
        if args.fim:
            result["fim"] = fim(args, llm)
    if args.needle or args.copy or args.loss_by_position:
        result |= long_context(args, model_dir)
    return result


def heldout_code(path: str | None) -> list[str]:
    """Documents of held-out code: a file's, or the stdlib's test files (which pretraining leaves out)."""
    from dsv2.train.tasks import stdlib_files

    if path:
        return list(documents(Path(path)))
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(tests=True)]


def fim(args: argparse.Namespace, llm: Any) -> dict[str, Any]:  # noqa: ANN401 -- an LLM
    import random

    from dsv2.eval.tasks import fim_exact_match
    from dsv2.train.fim import heldout_holes

    try:
        holes = heldout_holes(heldout_code(args.fim_source), args.fim, random.Random(f"fim/{args.fim_seed}"))
    except ValueError as e:
        raise SystemExit(f"error: --fim: {e}") from None
    return fim_exact_match(llm, holes, min(args.max_tokens, 64)) | {"seed": args.fim_seed}


def long_context(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import torch

    from dsv2 import LLM, Tokenizer, load
    from dsv2.eval import needle
    from dsv2.train.longdocs import Filler

    out: dict[str, Any] = {}
    tok = Tokenizer.from_dir(model_dir)
    model = load(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    context = model.cfg.max_position_embeddings
    if args.needle or args.copy:
        filler = Filler(heldout_code(args.needle_filler), tok)
    if args.copy:
        out["copy"] = needle.copy_loss(model, filler)
    if args.needle:
        positions = needle.n_positions_needed(args.needle_lengths)
        llm = LLM(needle.with_context(model, positions), tokenizer=tok, quantization=args.quantization,
                  max_model_len=positions)
        grid = needle.needle_grid(llm, filler, args.needle_lengths,
                                  needle.depth_grid(args.needle_depths), args.needle_n, args.needle_seed, context)
        plot = args.needle_plot or (str(Path(args.out).with_suffix(".needle.png")) if args.out else None)
        if plot:
            name = "/".join(model_dir.resolve().parts[-2:])  # runs/tiny/long/final -> long/final
            grid["plot"] = str(needle.plot_grid(grid, plot, f"{name}: {100 * grid['overall']:.1f}% "
                                                f"retrieved (context {context:,})"))
        out["needle"] = grid
    if args.loss_by_position:
        ids = tok.encode_batch(list(documents(Path(args.loss_by_position))), add_eos=False)
        out["loss_by_position"] = needle.loss_by_position(model, ids, args.loss_by_position_length)
        out["loss_by_position"]["context"] = context
    return out


def heldout_tokens(tokenizer: Any, path: Path) -> list[int]:
    """A file's token ids: plain text encoded whole, or a JSONL file's 'text' documents each encoded as the
    pretraining loader does (BOS per the tokenizer config, EOS after each)."""
    if path.suffix != ".jsonl":
        return tokenizer.encode(path.read_text(encoding="utf-8"))
    return [i for doc in tokenizer.encode_batch(list(documents(path)), add_eos=True) for i in doc]


def run_eval(args: argparse.Namespace) -> int:
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"error: {args.model} is not a checkpoint directory (no config.json)")
    if not (args.ppl_text or args.arith or args.humaneval or args.fim or args.needle or args.copy
            or args.loss_by_position):
        raise SystemExit("error: nothing to evaluate; give --ppl-text, --arith N, --humaneval, --fim N, --needle, "
                         "--copy and/or --loss-by-position")
    if args.fim < 0:
        raise SystemExit(f"error: --fim must not be negative, got {args.fim}")
    for flag, path in (("--fim-source", args.fim_source), ("--needle-filler", args.needle_filler)):
        if path and not Path(path).is_file():
            raise SystemExit(f"error: {flag}: no such file: {path}")
    if args.fim:
        from dsv2 import Tokenizer

        if not Tokenizer.from_dir(args.model).supports_fim:
            raise SystemExit(f"error: --fim: the tokenizer of {args.model} has no fill-in-the-middle tokens")
    from dsv2.hardware import check_device

    check_device(args.device)
    text = json.dumps(evaluate(args), indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0
