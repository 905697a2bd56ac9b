"""Distributed equivalence on CPU: torchrun, 2 gloo ranks, FSDP2 data parallel + expert parallel (EP = 2),
against one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv2 import load
from dsv2.train.metrics import read_metrics
from tests.test_train_run import write_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dp_ep2_matches_single_process(tmp_path: Path) -> None:
    """4 sequences per step: one process runs them as one micro-batch; each of the 2 ranks runs 2, sends tokens
    to the other rank's 4 experts by all-to-all, and decides dropping over both ranks' assignments.
    Devices are the EP ranks (D = 2, M = 1); every balance loss and dropping are on."""
    recipe = write_recipe(tmp_path, steps=5)
    common = ["--moe.n_devices=2", "--moe.max_devices=1", "--train.checkpoint_every=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ep = tmp_path / "single", tmp_path / "ep"
    one = subprocess.run([sys.executable, "-m", "dsv2.cli", "train", "--config", str(recipe), *common,
                          f"--train.out_dir={single}", "--train.micro_batch_size=4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={free_port()}", "-m", "dsv2.cli", "train", "--config", str(recipe), *common,
                          f"--train.out_dir={ep}", "--train.micro_batch_size=2", "--moe.expert_parallel=2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    want, got = read_metrics(single / "metrics.jsonl"), read_metrics(ep / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(want, got):
        for key in ("loss", "lm_loss", "expert_balance", "device_balance", "communication_balance"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
        assert [layer["load"] for layer in a["moe"]] == [layer["load"] for layer in b["moe"]]
        assert [layer["dropped"] for layer in a["moe"]] == [layer["dropped"] for layer in b["moe"]]
    assert any(layer["dropped"] > 0 for r in want for layer in r["moe"])
    # the gathered final model (FSDP shards and both EP halves of the experts) is the single-process one
    final_one, final_two = load(single / "final"), load(ep / "final")
    for (name, p), q in zip(final_one.state_dict().items(), final_two.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-4), name
