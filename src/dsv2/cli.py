"""`dsv2 <command>`: thin dispatch to the library modules."""

from __future__ import annotations

import argparse
import os
import sys

from dsv2 import convert, tokenizer
from dsv2.eval import commands as eval_commands
from dsv2.infer import commands as infer_commands
from dsv2.serve import commands as serve_commands
from dsv2.train import commands as train_commands
from dsv2.train import grpo, sft

TRACEBACK_ENV = "DSV2_TRACEBACK"
EPILOG = (f"Mistakes in the input (bad values, missing files) are reported as one 'error:' line, exit code 2. "
          f"Set {TRACEBACK_ENV}=1 to see the full Python traceback instead (for bug reports).")

# What a user's input causes: bad values (SamplingParams, ModelConfig, LLM, TrainConfig and the data loader raise
# ValueError for those) and paths that are missing or unreadable. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in PyTorch", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    # Each command module adds its own subparsers and sets `func`; heavy imports happen inside `func`.
    infer_commands.add_commands(sub)
    serve_commands.add_commands(sub)
    tokenizer.add_commands(sub)
    convert.add_commands(sub)
    train_commands.add_commands(sub)
    sft.add_commands(sub)
    grpo.add_commands(sub)
    eval_commands.add_commands(sub)
    for command in sub.choices.values():
        command.epilog = command.epilog or EPILOG
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `dsv2 train` takes free-form --section.key=value recipe overrides; every other command is strict.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Commands that can say more (train: how to resume; chat: back to the prompt) catch it themselves.
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:  # "[Errno 2] ..." -> "x: No such file or directory"
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
