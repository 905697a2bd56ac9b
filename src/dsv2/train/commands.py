"""`dsv2 train` and `dsv2 plot`: argument parsing only; the work is in trainer.py and plot.py."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="pretrain a model from a TOML recipe (one process, or many under torchrun)",
        description="Pretrain from a recipe. Any recipe value can be overridden as --section.key=value, "
                    "e.g. --train.steps=200 --moe.expert_balance=0.003 --data.paths='[\"corpus/\"]'.")
    train.add_argument("--config", required=True, help="recipe TOML file, e.g. recipes/tiny.toml")
    train.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    train.set_defaults(func=run_train, accepts_overrides=True)

    plot = sub.add_parser("plot", help="write loss-curve and expert-load PNGs of a training run")
    plot.add_argument("run_dir", help="the run's train.out_dir (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="where to write the PNGs (default: the run directory)")
    plot.set_defaults(func=run_plot)


def run_train(args: argparse.Namespace) -> int:
    from dsv2.hardware import keep_freed_memory
    from dsv2.train import checkpoints
    from dsv2.train.config import TrainConfig
    from dsv2.train.trainer import TrainingInterrupted, resume_point, train

    keep_freed_memory()
    given = list(getattr(args, "overrides", []))
    cfg = TrainConfig.from_toml(args.config, [o.removeprefix("--") for o in given])
    if args.resume:
        directory, step = resume_point(cfg)  # no checkpoint: a ValueError, before anything is written
        print(f"resuming from {directory} (step {step})", flush=True)
    # The user's own command line, so that the line printed on Ctrl-C can be pasted back as it is.
    command = ["dsv2", "train", "--config", args.config, *given]
    try:
        out = train(cfg, resume=args.resume, stop_on_sigint=True)
    except TrainingInterrupted as stop:
        print(f"interrupted at step {stop.step}; continue with: {shlex.join([*command, '--resume'])}",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C mid-step, or one during setup (tokenizing, building the model)
        newest = checkpoints.latest(Path(cfg.train.out_dir) / "checkpoints")
        if newest is None:
            print(f"interrupted before the first checkpoint; start again with: {shlex.join(command)}",
                  file=sys.stderr)
        else:
            print(f"interrupted; continue from step {checkpoints.step_of(newest)} with: "
                  f"{shlex.join([*command, '--resume'])}", file=sys.stderr)
        return 130
    print(f"done: {out}/final")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from dsv2.train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
