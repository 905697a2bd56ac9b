"""`dsv2 quantize` and `dsv2 convert`: checkpoints from one format to another, streamed tensor by tensor."""

from __future__ import annotations

import argparse

from dsv2.kernels.quant import GROUP_SIZES, METHODS


def add_commands(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="write a checkpoint with int8 or int4 weight-only projections and experts")
    q.add_argument("src", help="checkpoint directory (config.json + safetensors)")
    q.add_argument("out", help="output directory (loads with LLM(out) / --model out, no flag needed)")
    q.add_argument("--method", choices=METHODS, required=True)
    q.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="int4: inputs per scale")
    q.add_argument("--asymmetric", action="store_true", help="int4: a zero point per group as well as a scale")
    q.add_argument("--max-shard-size", default="2GB")
    q.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from dsv2.checkpoint import quantize_checkpoint
    from dsv2.kernels.quant import Scheme

    if args.method == "int8" and (args.asymmetric or args.group_size != 64):
        raise ValueError("--group-size and --asymmetric apply to int4 only (int8 has one scale per row)")
    scheme = Scheme(args.method, args.group_size, not args.asymmetric)
    quantize_checkpoint(args.src, args.out, scheme, max_shard_size=args.max_shard_size, progress=True)
    print(f"wrote {args.out} ({args.method})")
    return 0
