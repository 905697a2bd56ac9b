"""Can dsv2's Transformer learn to copy from its context, and how soon? (README, Long context.)

The tiny config (the shipped model's shape) from random N(0, --init-std) weights, trained in a plain loop (AdamW,
--lr 1e-3, no weight decay, no schedule) on sequences of --length random symbols (of --symbols) repeated once. The
first half is unpredictable (ln symbols nats per token at best); the second half costs nothing to a model that
copies. Prints both halves' training loss every 100 steps.

    python benchmarks/copy_toy.py --init-std 0.02
    python benchmarks/copy_toy.py --init-std 0.006   # the tiny recipe's init
    python benchmarks/copy_toy.py --length 32 --steps 900   # longer spans: a later onset
    python benchmarks/copy_toy.py --length 32 --symbols 512   # a larger alphabet: none within 300 steps
    python benchmarks/copy_toy.py --length 32 --steps 700 --then-symbols 4000   # a curriculum
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dsv2 import Transformer
from dsv2.default_model import default_model_dir
from dsv2.config import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--symbols", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--then-symbols", type=int, default=None, metavar="N",
                   help="a curriculum: after --steps, --then-steps more on symbols drawn from N (a superset)")
    p.add_argument("--then-steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = Transformer(ModelConfig.from_hf(default_model_dir()))
    for param in model.parameters():
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=args.init_std)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    L = args.length
    phases = [(0, args.steps, args.symbols)]
    if args.then_symbols:
        phases.append((args.steps + 1, args.steps + args.then_steps, args.then_symbols))
    for step, symbols in ((s, n) for lo, hi, n in phases for s in range(lo, hi + 1)):
        seq = torch.randint(10, 10 + symbols, (args.batch_size, L))
        ids = torch.cat([seq, seq], 1)
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(
            args.batch_size, -1)
        nll.mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:  # nll[:, p] predicts token p + 1: the first half is p < L - 1, the second p >= L
            print(f"step {step} ({symbols} symbols): first half {nll[:, : L - 1].mean().item():.2f} nats/token, "
                  f"second half {nll[:, L:].mean().item():.2f}", flush=True)


if __name__ == "__main__":
    main()
