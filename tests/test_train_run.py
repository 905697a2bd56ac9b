"""End-to-end `dsv2 train`: a run killed by SIGKILL between checkpoints and resumed equals an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv2 import load
from dsv2.train.config import TrainConfig
from dsv2.train.metrics import read_metrics
from dsv2.train.parallel import Local
from dsv2.train.trainer import Trainer, train
from tests.conftest import small_config

WORDS = ("the expert router sends each token to a few devices and the shared experts see every token while "
         "balance losses keep the load even across layers so that no device waits").split()


def write_corpus(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for f in range(3):
        docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (60,), generator=g).tolist())
                for _ in range(20)]
        (corpus / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return corpus


def write_recipe(root: Path, steps: int = 8) -> Path:
    """A small MoE (8 experts on 4 devices, M = 2), every balance loss, dropping, accumulation of 2."""
    model = root / "model.json"
    model.write_text(json.dumps(small_config(vocab_size=320).to_hf()))
    recipe = root / "recipe.toml"
    recipe.write_text(f"""
[model]
config = "{model}"
[data]
paths = ["{write_corpus(root)}"]
tokenizer = "bpe:300"
seq_len = 32
[train]
steps = {steps}
batch_size = 4
micro_batch_size = 2
checkpoint_every = 3
threads = 1
progress = false
[optim]
lr = 3e-3
warmup_steps = 2
[moe]
n_devices = 4
max_devices = 2
device_limited = true
expert_balance = 0.01
device_balance = 0.05
communication_balance = 0.02
capacity_factor = 1.0
protected_fraction = 0.25
""")
    return recipe


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsv2.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)


KILL_AT_STEP_5 = """
import os, signal, sys
from dsv2.train.config import TrainConfig
from dsv2.train.trainer import train
def on_step(step, record):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig.from_toml(sys.argv[1], [f"train.out_dir={sys.argv[2]}"]), on_step=on_step)
"""


def test_killed_run_resumes_to_the_same_losses(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = run_cli("--config", str(recipe), f"--train.out_dir={full}")
    assert done.returncode == 0, done.stderr
    dead = subprocess.run([sys.executable, "-c", KILL_AT_STEP_5, str(recipe), str(killed)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000003"]  # 6 never written
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    again = run_cli("--config", str(recipe), f"--train.out_dir={killed}", "--resume")
    assert again.returncode == 0, again.stderr

    want, got = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(want, got):
        for key in ("loss", "lm_loss", "expert_balance", "device_balance", "communication_balance", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
        assert [layer["load"] for layer in a["moe"]] == [layer["load"] for layer in b["moe"]]
    assert any(layer["dropped"] > 0 for r in want for layer in r["moe"])  # dropping was really exercised
    final_a, final_b = load(full / "final"), load(killed / "final")
    for (name, p), q in zip(final_a.state_dict().items(), final_b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    # the final model routes as it was trained: device-limited = group_limited_greedy over the 4 devices
    assert (final_a.cfg.topk_method, final_a.cfg.n_group, final_a.cfg.topk_group) == ("group_limited_greedy", 4, 2)


def test_existing_run_needs_resume_and_bad_overrides_are_named(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, steps=3)
    out = tmp_path / "run"
    assert run_cli("--config", str(recipe), f"--train.out_dir={out}").returncode == 0
    again = run_cli("--config", str(recipe), f"--train.out_dir={out}")
    assert again.returncode != 0 and "pass --resume" in again.stderr
    with pytest.raises(ValueError, match="'train.stepz'"):
        TrainConfig.from_toml(recipe, ["train.stepz=3"])
    with pytest.raises(ValueError, match="'moe.capacity_factor'"):
        TrainConfig.from_toml(recipe, ["moe.capacity_factor=-1"])
    with pytest.raises(ValueError, match="'train.device'"):
        TrainConfig.from_toml(recipe, ["train.device=gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'train.device': device 'cuda' is not available"):
            train(TrainConfig.from_toml(recipe, [f"train.out_dir={tmp_path / 'cuda'}", "train.device=cuda"]))


def test_a_training_step_creates_no_tensor_on_the_default_device(tmp_path: Path) -> None:
    """Dropping, device-limited routing, every balance loss and the step statistics, with the default device set
    to meta: a tensor made without the training device would be a meta tensor and fail the step."""
    cfg = TrainConfig.from_toml(write_recipe(tmp_path, steps=2), [f"train.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, Local(cfg.train.device))
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        stats, grad_norm, _ = trainer.train_step()
        record = stats.summary()
    finally:
        torch.set_default_device(previous)
    assert math.isfinite(grad_norm) and grad_norm > 0
    assert math.isfinite(record["loss"]) and sum(record["moe"][0]["load"]) > 0
    assert next(trainer.model.parameters()).device.type == "cpu"


@pytest.mark.gpu
def test_a_training_step_on_cuda(tmp_path: Path) -> None:
    """The trainer on the GPU: model, batches, dropping masks and statistics on cuda; losses near the CPU's."""
    recipe = write_recipe(tmp_path, steps=2)
    losses = []
    for device in ("cpu", "cuda"):
        cfg = TrainConfig.from_toml(recipe, [f"train.out_dir={tmp_path / device}", f"train.device={device}",
                                             "train.gemm=torch"])
        trainer = Trainer(cfg, Local(device))
        stats, grad_norm, _ = trainer.train_step()
        assert next(trainer.model.parameters()).device.type == device and math.isfinite(grad_norm)
        losses.append(stats.summary()["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
