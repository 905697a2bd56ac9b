"""Schedule, batch ramp and parameter groups."""

from __future__ import annotations

import pytest

from dsv2 import Transformer
from dsv2.train.optim import BatchSchedule, OptimConfig, StepDecay, build_optimizer, param_groups
from tests.conftest import small_config


def test_warmup_then_step_decay_at_token_fractions() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay_at=(0.6, 0.9), decay_factor=0.316)
    sched = StepDecay.for_run(cfg, batch_plan=[2] * 10, seq_len=5)  # 10 steps of 10 tokens, 100 in all
    lrs = [sched.lr(s) for s in range(10)]
    # steps 0-3 ramp to the peak; step s has seen 10 s tokens: >= 60 from step 6, >= 90 from step 9
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.316, 0.316, 0.316, 0.316**2])


def test_decay_follows_tokens_not_steps_under_a_batch_ramp() -> None:
    ramp = BatchSchedule(end=8, quantum=2, start=2, ramp_tokens=40)
    plan = ramp.plan(steps=6, seq_len=4)
    # tokens before each step 0, 8, 16, 32, 56, 88: sequences 2, 2 + 6*8/40 = 3.2 -> 2 (multiple of 2),
    # 2 + 6*16/40 = 4.4 -> 4, 2 + 6*32/40 = 6.8 -> 6, then the ramp is over: 8, 8
    assert plan == [2, 2, 4, 6, 8, 8]
    sched = StepDecay.for_run(OptimConfig(lr=1.0, warmup_steps=0, decay_at=(0.5,)), plan, seq_len=4)
    # 120 tokens in all; half is 60, first reached before step 5 (88 seen; step 4 has seen 56)
    assert [sched.lr(s) for s in range(6)] == pytest.approx([1, 1, 1, 1, 1, 0.316])
    assert BatchSchedule(end=6).plan(3, 10) == [6, 6, 6]


def test_norm_gains_are_not_decayed() -> None:
    model = Transformer(small_config())
    decay, no_decay = param_groups(model, 0.1)
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimConfig())
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize(("field", "value"), [("lr", 0.0), ("decay_at", (0.9, 0.6)), ("decay_factor", 1.5),
                                              ("grad_clip", -1.0), ("warmup_steps", -1)])
def test_bad_optim_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(**{field: value})
