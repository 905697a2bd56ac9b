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
    c = sub.add_parser("convert", help="a llama.cpp GGUF -> a checkpoint directory (official layout, tokenizer)")
    c.add_argument("gguf", help="MODEL.gguf (the first file of a split GGUF)")
    c.add_argument("out", help="output directory")
    c.add_argument("--quantization", choices=(*METHODS, "none"), default=None,
                   help="requantize into dsv2's int8 or int4, or 'none' for dense bfloat16 weights (default: int8 "
                        "for 5- to 8-bit files, int4 for 4 bits and below, dense for float files)")
    c.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="int4: inputs per scale")
    c.add_argument("--max-shard-size", default="2GB")
    c.set_defaults(func=run_convert)


def run_quantize(args: argparse.Namespace) -> int:
    from dsv2.checkpoint import quantize_checkpoint
    from dsv2.kernels.quant import Scheme

    if args.method == "int8" and (args.asymmetric or args.group_size != 64):
        raise ValueError("--group-size and --asymmetric apply to int4 only (int8 has one scale per row)")
    scheme = Scheme(args.method, args.group_size, not args.asymmetric)
    quantize_checkpoint(args.src, args.out, scheme, max_shard_size=args.max_shard_size, progress=True)
    print(f"wrote {args.out} ({args.method})")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsv2 import gguf
    from dsv2.checkpoint import quantize_checkpoint
    from dsv2.kernels.quant import Scheme

    path = Path(args.gguf)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if not gguf.is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    method = args.quantization or gguf.suggested_quantization(path) or "none"
    scheme = None if method == "none" else Scheme(method, args.group_size)
    quantize_checkpoint(path, args.out, scheme, max_shard_size=args.max_shard_size, progress=True)
    print(f"wrote {args.out} ({method})")
    return 0
