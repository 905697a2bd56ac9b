"""Optimisation as in DeepSeek-V2 §3.1.2: N(0, 0.006) init, AdamW (0.9, 0.95, wd 0.1), linear warm-up then
step decay (x0.316 after ~60% and ~90% of the training tokens), clipping at 1.0, optional batch-size ramp.

The learning rate is a pure function of (step, tokens seen), so a resumed run needs only the step counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 4.2e-4  # V2-Lite's peak; V2 used 2.4e-4
    warmup_steps: int = 2000
    decay_at: tuple[float, ...] = (0.6, 0.9)  # fractions of the run's tokens (V2-Lite: 0.8, 0.9)
    decay_factor: float = 0.316
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    init_std: float = 0.006

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay_at", tuple(self.decay_at))
        _check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(all(0 < f <= 1 for f in self.decay_at) and list(self.decay_at) == sorted(self.decay_at),
               "optim.decay_at", f"must be increasing fractions in (0, 1], got {self.decay_at}")
        _check(0 < self.decay_factor <= 1, "optim.decay_factor", f"must be in (0, 1], got {self.decay_factor}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1",
               f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.init_std > 0, "optim.init_std", f"must be positive, got {self.init_std}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every matrix (projections, experts, router, embeddings); not the 1-D RMSNorm gains, whose decay
    toward 0 would shrink activations rather than regularise (the model has no biases). The paper does not
    say; this is the GPT-2/nanoGPT convention."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # fused: one kernel per parameter, no temporaries. The unfused CPU path allocates sqrt/div results the size
    # of each parameter; the stacked experts' (E, 2I, H) ones are past glibc's mmap threshold, so every step
    # page-faults them in afresh (2x the time of transformers' AdamW over per-expert tensors, measured).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=True)


@dataclass(frozen=True)
class BatchSchedule:
    """Sequences per optimizer step: `start` rising linearly to `end` over the first `ramp_tokens` tokens
    (V2: 2304 -> 9216 over 225B), then `end`; always a multiple of `quantum` (micro-batch x data ranks)."""

    end: int
    quantum: int = 1
    start: int | None = None  # None: no ramp
    ramp_tokens: int = 0

    def sequences(self, tokens_seen: int) -> int:
        if self.start is None or tokens_seen >= self.ramp_tokens:
            return self.end
        n = self.start + (self.end - self.start) * tokens_seen / self.ramp_tokens
        return max(self.quantum, int(n) // self.quantum * self.quantum)

    def plan(self, steps: int, seq_len: int) -> list[int]:
        """Sequences of every step of a `steps`-step run."""
        out, tokens = [], 0
        for _ in range(steps):
            out.append(self.sequences(tokens))
            tokens += out[-1] * seq_len
        return out


@dataclass(frozen=True)
class StepDecay:
    """lr(step) = peak * (step + 1) / warmup during warm-up, then peak * factor^(milestones passed), where a
    milestone is passed once the tokens seen before the step reach its fraction of the run's tokens."""

    peak: float
    warmup_steps: int
    milestones: tuple[int, ...]  # token counts
    factor: float
    tokens_before: Sequence[int] = field(repr=False, default=())  # tokens seen before each step

    @classmethod
    def for_run(cls, cfg: OptimConfig, batch_plan: list[int], seq_len: int) -> StepDecay:
        before = [0]
        for n in batch_plan:
            before.append(before[-1] + n * seq_len)
        total = before[-1]
        return cls(cfg.lr, cfg.warmup_steps, tuple(math.ceil(f * total) for f in cfg.decay_at), cfg.decay_factor,
                   tuple(before[:-1]))

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        passed = sum(self.tokens_before[step] >= m for m in self.milestones)
        return self.peak * self.factor ** passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"config field {name!r}: {reason}")
