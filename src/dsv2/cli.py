"""`dsv2 <command>`: thin dispatch to the library modules."""

from __future__ import annotations

import argparse
import sys

from dsv2 import tokenizer
from dsv2.eval import commands as eval_commands
from dsv2.infer import commands as infer_commands
from dsv2.serve import commands as serve_commands
from dsv2.train import commands as train_commands
from dsv2.train import grpo, sft


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each command module adds its own subparsers and sets `func`; heavy imports happen inside `func`.
    infer_commands.add_commands(sub)
    serve_commands.add_commands(sub)
    tokenizer.add_commands(sub)
    train_commands.add_commands(sub)
    sft.add_commands(sub)
    grpo.add_commands(sub)
    eval_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `dsv2 train` takes free-form --section.key=value recipe overrides; every other command is strict.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
