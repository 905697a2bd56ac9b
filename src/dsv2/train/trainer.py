"""`dsv2 train`: the pretraining loop, in one process or under torchrun (see parallel.py).

One step: the batch plan gives the step's sequences -> this rank's share in micro-batches -> forward with
routing statistics -> LM loss + enabled balance losses -> backward (accumulating) -> clip -> AdamW at the
scheduled learning rate. Logs, checkpoints and the final HF-layout model are written by the main rank.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dsv2 import save
from dsv2.checkpoint import load
from dsv2.config import ModelConfig
from dsv2.hardware import warn_if_bf16_is_slow
from dsv2 import interrupt
from dsv2.kernels import onednn
from dsv2.model import Transformer
from dsv2.model.moe import DeviceCapacity, Dropping
from dsv2.train import checkpoints as ckpt
from dsv2.train.config import TrainConfig
from dsv2.tokenizer import Tokenizer
from dsv2.train.data import BlockLoader, DataError, TokenFile, load_tokenizer, tokenize_to_file
from dsv2.train.losses import balance_losses
from dsv2.train.metrics import MetricsLog, StepStats
from dsv2.train.optim import BatchSchedule, StepDecay, build_optimizer, set_lr
from dsv2.train.parallel import Distributed, Local, apply_activation_checkpointing, from_torchrun, local_tensor
from dsv2.train.routing import device_limited, protected_blocks, record_routing

StepCallback = Callable[[int, dict[str, Any]], None]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run between two steps; `checkpoint` holds step `step`, so --resume continues exactly.
    A KeyboardInterrupt, so that a caller who does not catch it sees what it would have seen without us."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def _say_stopping() -> None:
    tqdm.write("dsv2: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)")


def resolve_devices(mcfg: ModelConfig, cfg: TrainConfig, ep: int) -> tuple[int, int]:
    """(D, M): the device groups of the balance losses, dropping and device-limited routing, and the limit."""
    moe = cfg.moe
    D = moe.n_devices or (ep if ep > 1 else mcfg.n_group)
    if ep > 1 and D != ep:
        raise ValueError(f"config field 'moe.n_devices': with expert parallelism the devices are the {ep} EP ranks, "
                         f"got {D}")
    if mcfg.n_routed_experts is not None and mcfg.n_routed_experts % D:
        raise ValueError(f"config field 'moe.n_devices': {mcfg.n_routed_experts} experts do not split over {D}")
    group_limited = mcfg.topk_method == "group_limited_greedy" and mcfg.n_group == D
    M = moe.max_devices or (mcfg.topk_group if group_limited else min(mcfg.num_experts_per_tok, D))
    if M > D:
        raise ValueError(f"config field 'moe.max_devices': {M} exceeds the {D} devices")
    return D, M


class Trainer:
    def __init__(self, cfg: TrainConfig, par: Local | Distributed) -> None:
        self.cfg, self.par = cfg, par
        run = cfg.train
        if run.batch_size % (run.micro_batch_size * par.world):
            raise ValueError(f"config field 'train.batch_size': {run.batch_size} sequences do not split into "
                             f"micro-batches of {run.micro_batch_size} on {par.world} rank(s)")
        torch.manual_seed(run.seed)
        self.device = par.device
        if run.autocast == "bfloat16":
            warn_if_bf16_is_slow(torch.bfloat16, self.device, "training under autocast",
                                 "set train.autocast = \"none\"")
        if run.threads:
            torch.set_num_threads(run.threads)
        self.out = Path(run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.loader, self.tokenizer_dir = self._data()
        self.mcfg, self.devices = self._model_config()
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.plan = BatchSchedule(end=run.batch_size, quantum=run.micro_batch_size * par.world,
                                  start=run.batch_ramp_start, ramp_tokens=run.batch_ramp_tokens
                                  ).plan(run.steps, cfg.data.seq_len)
        self.schedule = StepDecay.for_run(cfg.optim, self.plan, cfg.data.seq_len)
        self.protected = protected_blocks(self.loader.n_blocks, cfg.moe.protected_fraction, run.seed)
        self.n_moe = self.mcfg.num_moe_layers
        self.step, self.tokens = 0, 0
        self.log = MetricsLog(self.out / "metrics.jsonl")

    # ------------------------------------------------------------------------------------------ setup
    def _data(self) -> tuple[BlockLoader, Path]:
        # The main rank tokenizes (and trains a BPE if asked) first; the others then find the cached files.
        if self.par.is_main:
            tok, tok_dir, tokens = self._tokenize()
        self.par.barrier()
        if not self.par.is_main:
            tok, tok_dir, tokens = self._tokenize()
        self.vocab = tok.vocab_size
        return BlockLoader(tokens.tokens(), self.cfg.data.seq_len, self.cfg.train.seed), tok_dir

    def _tokenize(self) -> tuple[Tokenizer, Path, TokenFile]:
        data = self.cfg.data
        tok, tok_dir = load_tokenizer(data.tokenizer, list(data.paths), self.out, data.text_field)
        tokens = tokenize_to_file(list(data.paths), tok, data.cache_dir or self.out / "data", data.text_field,
                                  progress=self.cfg.train.progress and self.par.is_main)
        return tok, tok_dir, tokens

    def _model_config(self) -> tuple[ModelConfig, tuple[int, int]]:
        mcfg = self.cfg.model_config()
        if self.vocab > mcfg.vocab_size:
            raise ValueError(f"config field 'model.vocab_size': the tokenizer has {self.vocab} entries, the model "
                             f"only {mcfg.vocab_size}")
        if mcfg.n_routed_experts is None:
            return mcfg, (1, 1)
        D, M = resolve_devices(mcfg, self.cfg, self.par.ep)
        if self.cfg.moe.device_limited:
            mcfg = device_limited(mcfg, D, M)
        return mcfg, (D, M)

    def _build_model(self) -> torch.nn.Module:
        model = Transformer(self.mcfg)
        if self.cfg.init_from:
            # Weights from the checkpoint, architecture (and routing mode) from the recipe.
            try:
                model.load_state_dict(load(self.cfg.init_from, dtype=torch.float32).state_dict())
            except RuntimeError as e:
                raise ValueError(f"config field 'model.init_from': {self.cfg.init_from} does not fit [model]: {e}"
                                 ) from e
        else:
            model.init_weights(self.cfg.optim.init_std)  # N(0, 0.006) in the paper (§3.1.2)
        model.to(self.device).train()
        if onednn.wanted(self.cfg.train.gemm, self.device):
            onednn.use_for_training_(model)
        if self.cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        cf = self.cfg.moe.capacity_factor
        dropping = DeviceCapacity(self.devices[0], cf) if cf > 0 and self.mcfg.n_routed_experts else None
        self.drop_policy = self.par.drop_policy(dropping)
        return self.par.prepare(model)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, on_step: StepCallback | None = None, stop_on_sigint: bool = False) -> None:
        """Train to train.steps and save the final model. stop_on_sigint: Ctrl-C finishes the current step, saves
        a checkpoint and raises TrainingInterrupted (one process only: several ranks would have to agree on the
        step, so under torchrun Ctrl-C stays a plain KeyboardInterrupt and the newest checkpoint is the resume
        point)."""
        run = self.cfg.train
        bar = tqdm(total=run.steps, initial=self.step, unit="step", disable=not (run.progress and self.par.is_main))
        with interrupt.stop_on_sigint(stop_on_sigint and self.par.world == 1, on_first=_say_stopping) as stop:
            while self.step < run.steps:
                start = time.perf_counter()
                stats, grad_norm, lr = self.train_step()
                self.step += 1
                self.tokens += self.plan[self.step - 1] * self.cfg.data.seq_len
                record = self._record(stats, grad_norm, lr, time.perf_counter() - start)
                if self.par.is_main and (self.step % run.log_every == 0 or self.step == run.steps):
                    self.log.write(record)
                saved = self.step % run.checkpoint_every == 0 or self.step == run.steps
                if saved:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
                if on_step is not None:
                    on_step(self.step, record)
                if stop.requested and self.step < run.steps:
                    if not saved:
                        self.save_checkpoint()
                    bar.close()
                    raise TrainingInterrupted(self.step, ckpt.checkpoint_dir(self.out / "checkpoints", self.step))
        bar.close()
        self.save_final()

    def train_step(self) -> tuple[StepStats, float, float]:
        ids = self.par.shard(self.loader.next_ids(self.plan[self.step]))
        micro = np.split(ids, len(ids) // self.cfg.train.micro_batch_size)
        stats = StepStats(self.mcfg.n_routed_experts or 1, self.n_moe, self.device)
        for chunk in micro:
            self._micro_step(chunk, len(micro), stats)
        grad_norm = self._clip()
        lr = self.schedule.lr(self.step)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm, lr

    def _micro_step(self, ids: np.ndarray, n_micro: int, stats: StepStats) -> None:
        blocks = torch.from_numpy(self.loader.blocks(ids)).to(self.device)
        inputs, targets = blocks[:, :-1], blocks[:, 1:]
        dropping = None
        if self.drop_policy is not None:
            dropping = Dropping(self.drop_policy, torch.from_numpy(self.protected[ids]).to(self.device))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.autocast == "bfloat16")
        with autocast, record_routing(self.model) as routings:
            # head + cross-entropy in chunks (dsv2.model.loss)
            lm = self.model(inputs, labels=targets, dropping=dropping)
        losses = {"lm_loss": lm}
        losses |= balance_losses(routings, len(ids), self.cfg.moe.coefficients, *self.devices)
        loss = sum(losses.values())
        (loss / n_micro).backward()
        stats.add({"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}, routings)

    def _clip(self) -> float:
        """Global gradient norm (over every rank's shards), clipped as torch.nn.utils.clip_grad_norm_ does."""
        grads = [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]
        local_sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        norm = self.par.grad_norm_sq(local_sq).sqrt().item()
        if self.cfg.optim.grad_clip > 0:
            coef = min(1.0, self.cfg.optim.grad_clip / (norm + 1e-6))
            for g in grads:
                g.mul_(coef)
        return norm

    def _record(self, stats: StepStats, grad_norm: float, lr: float, seconds: float) -> dict[str, Any]:
        sums = torch.stack([stats.losses[k] for k in sorted(stats.losses)])
        sums = self.par.all_sum(sums) / self.par.world
        stats.losses = dict(zip(sorted(stats.losses), sums.unbind()))
        stats.load, stats.dropped = self.par.all_sum(stats.load), self.par.all_sum(stats.dropped)
        step_tokens = self.plan[self.step - 1] * self.cfg.data.seq_len
        return {"step": self.step, **stats.summary(), "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                "tokens_per_s": step_tokens / seconds}

    # ------------------------------------------------------------------------------------------ state
    def save_checkpoint(self) -> None:
        state = {
            "step": self.step, "tokens": self.tokens, "data": self.loader.state_dict(),
            "rng": torch.get_rng_state(), "model": ckpt.model_state(self.model),
            "optimizer": ckpt.optimizer_state(self.optimizer), "config": json.dumps(self.cfg.to_dict()),
        }
        root = self.out / "checkpoints"
        ckpt.write_rank_state(root, self.step, self.par.rank, state)
        self.par.barrier()
        if self.par.is_main:
            ckpt.publish(root, self.step, self.cfg.train.keep_checkpoints)
        self.par.barrier()

    def resume(self) -> bool:
        """Continue from the newest checkpoint; False if there is none."""
        directory = ckpt.latest(self.out / "checkpoints")
        if directory is None:
            return False
        state = ckpt.read_rank_state(directory, self.par.rank)
        if json.loads(state["config"])["train"]["seed"] != self.cfg.train.seed:
            raise ValueError(f"{directory} was written with another train.seed; resume needs the same one")
        ckpt.load_model_state(self.model, state["model"])
        ckpt.load_optimizer_state(self.optimizer, state["optimizer"])
        self.loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if self.par.is_main:
            self.log.truncate_after(self.step)
        return True

    def save_final(self) -> None:
        full = self.par.full_state_dict(self.model)
        if not self.par.is_main:
            return
        plain = Transformer(self.mcfg)
        plain.load_state_dict(full)
        final = self.out / "final"
        save(plain, final)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (self.tokenizer_dir / name).is_file():
                shutil.copy(self.tokenizer_dir / name, final / name)


def resume_point(cfg: TrainConfig) -> tuple[Path, int]:
    """The checkpoint a resumed run continues from and its step; a ValueError naming the directory if none."""
    root = Path(cfg.train.out_dir) / "checkpoints"
    directory = ckpt.latest(root)
    if directory is None:
        raise ValueError(f"no checkpoint to resume in {root}; start without --resume")
    return directory, ckpt.step_of(directory)


def check_inputs(cfg: TrainConfig) -> None:
    """What can be checked before anything is written: a mistake found later would leave a half-made run directory
    behind (and `data.paths` pointing nowhere would be found only after the tokenizer was set up)."""
    if not cfg.data.paths:
        raise DataError("no training data given (data.paths is empty)")
    for path in cfg.data.paths:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or directory (data.paths)")
    cfg.model_config()  # a bad preset, config path or field override


def train(cfg: TrainConfig, resume: bool = False, on_step: StepCallback | None = None,
          stop_on_sigint: bool = False) -> Path:
    """Run (or with resume=True continue) a training run; returns the run directory. stop_on_sigint: see
    Trainer.fit (Ctrl-C checkpoints and raises TrainingInterrupted)."""
    if cfg.moe.expert_parallel > 1 and not from_torchrun():
        raise ValueError("config field 'moe.expert_parallel': EP > 1 needs several processes (launch with torchrun)")
    out = Path(cfg.train.out_dir)
    if resume:
        resume_point(cfg)
    elif ckpt.latest(out / "checkpoints") is not None:
        raise ValueError(f"{out} already holds checkpoints; pass --resume or choose another train.out_dir")
    check_inputs(cfg)
    device = cfg.train.device
    par = Distributed(cfg.moe.expert_parallel, device) if from_torchrun() else Local(device)
    try:
        trainer = Trainer(cfg, par)
        if resume:
            trainer.resume()
        if par.is_main:
            if not resume:
                (trainer.out / "metrics.jsonl").unlink(missing_ok=True)
            (trainer.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        trainer.fit(on_step, stop_on_sigint)
        return trainer.out
    finally:
        par.close()
