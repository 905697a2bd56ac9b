"""`dsv2 train` and `dsv2 plot`: argument parsing only; the work is in trainer.py and plot.py."""

from __future__ import annotations

import argparse


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
    from dsv2.train.config import TrainConfig
    from dsv2.train.trainer import train

    keep_freed_memory()
    overrides = [o.removeprefix("--") for o in getattr(args, "overrides", [])]
    out = train(TrainConfig.from_toml(args.config, overrides), resume=args.resume)
    print(f"done: {out}/final")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from dsv2.train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
