"""GRPO, as in DeepSeekMath §4.1 (eqs. 3-4) with outcome supervision, and `dsv2 grpo`.

One step: P prompts -> G completions each, sampled by the dsv2 engine (`LLM`) from a copy of the policy ->
rule-based rewards, summed with weights -> advantages normalised within each group of G (no value model) ->
the policy's per-token log-probabilities, recomputed in fp32 by the training model -> the clipped-ratio
objective minus β times the per-token k3 KL to a frozen reference -> AdamW -> the new weights pushed into
the engine. This is the one module of train/ that imports infer/, and only its public API.

The loss per token, to be minimised, is  -(min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â) - β·KL_k3),  ρ = π_θ / π_old. It is
averaged per completion and then over completions ("sequence", DeepSeekMath's 1/G Σ 1/|o_i| Σ_t), or over
all completion tokens of the batch ("token", DAPO / TRL's default, which removes the bias toward short
completions that the per-completion mean has).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dsv2.checkpoint import load, save
from dsv2.hardware import check_device, keep_freed_memory
from dsv2.infer import LLM, SamplingParams
from dsv2.kernels import onednn
from dsv2.model import Transformer
from dsv2.tokenizer import Tokenizer
from dsv2.train import checkpoints as ckpt
from dsv2.train.metrics import MetricsLog
from dsv2.train.optim import OptimConfig, build_optimizer
from dsv2.train.sft import copy_tokenizer_files
from dsv2.train.tasks import extract_answer, has_answer_format, read_jsonl

LOSS_NORMS = ("sequence", "token")


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # G, completions per prompt (DeepSeekMath: 64)
    prompts_per_step: int = 4
    steps: int = 100
    beta: float = 0.04  # KL coefficient (DeepSeekMath 0.04; 0 skips the reference model)
    epsilon: float = 0.2  # clip range (not stated in DeepSeekMath; TRL's default)
    lr: float = 1e-6  # DeepSeekMath's; a tiny model learns at ~1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    updates_per_batch: int = 1  # μ: policy updates per sampled batch (DeepSeekMath: 1)
    loss_norm: str = "sequence"
    max_tokens: int = 64  # completion length limit
    temperature: float = 1.0
    top_p: float = 1.0
    adv_eps: float = 1e-4  # (r - mean) / (std + adv_eps), as TRL
    seed: int = 0
    gemm: str = "auto"  # fp32 products through oneDNN ("onednn", "auto" = on x86 CPUs) or F.linear ("torch")
    checkpoint_every: int = 50  # steps between resumable checkpoints in out_dir/checkpoints (0: none)

    def __post_init__(self) -> None:
        _check(self.group_size >= 2, "group_size", "must be >= 2 (a group of one has no baseline)")
        for name in ("prompts_per_step", "steps", "updates_per_batch", "max_tokens"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.beta >= 0, "beta", "must be >= 0")
        _check(self.epsilon > 0, "epsilon", "must be > 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.loss_norm in LOSS_NORMS, "loss_norm", f"must be one of {LOSS_NORMS}")
        _check(self.temperature > 0, "temperature", "must be > 0 (GRPO needs diverse samples)")
        _check(self.gemm in onednn.CHOICES, "gemm", f"must be one of {onednn.CHOICES}")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")


def _check(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"GRPO option {name!r} {reason}")


# ------------------------------------------------------------------------------------------ rewards


@dataclass(frozen=True)
class Sample:
    """One completion and the dataset example it answers (rewards read e.g. example["answer"])."""

    example: Mapping[str, Any]
    text: str
    token_ids: list[int]


RewardFn = Callable[[Sample], float]


def accuracy_reward(sample: Sample) -> float:
    """1 if the last "The answer is N" equals the example's integer answer, else 0."""
    return float(extract_answer(sample.text) == int(sample.example["answer"]))


def format_reward(sample: Sample) -> float:
    """1 if the completion states its result as "The answer is N.", else 0."""
    return float(has_answer_format(sample.text))


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def parse_reward_weights(spec: str) -> dict[str, float]:
    """"accuracy=1,format=0.1" -> {"accuracy": 1.0, "format": 0.1}, names checked against REWARDS."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in REWARDS:
            raise ValueError(f"reward weights: {item!r} is not NAME=WEIGHT with NAME in {sorted(REWARDS)}")
        weights[name] = float(value)
    if not weights:
        raise ValueError("reward weights: none given")
    return weights


# ------------------------------------------------------------------------------------------ the objective


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) per row of (P, G) rewards; a constant group gives zeros. std is the
    sample (n - 1) std, as TRL computes it (DeepSeekMath does not say which)."""
    mean = rewards_PG.mean(dim=1, keepdim=True)
    std = rewards_PG.std(dim=1, keepdim=True)
    return (rewards_PG - mean) / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref) per sampled token: π_ref/π_θ - log(π_ref/π_θ) - 1. It is
    >= 0 (e^x >= 1 + x), unbiased for tokens drawn from π_θ, and 0 with zero gradient where π_θ = π_ref."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float
                      ) -> torch.Tensor:
    """Per-token min(ρ·A, clip(ρ, 1-ε, 1+ε)·A), ρ = exp(logp - old_logp). The min makes it pessimistic: once ρ
    has moved past the clip bound in the direction A rewards, the clipped term wins and the gradient is 0."""
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)


def grpo_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor | None,
              advantages_B: torch.Tensor, mask_BT: torch.Tensor, beta: float, epsilon: float, loss_norm: str
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (to minimise) over B completions padded to T tokens; mask_BT marks real tokens."""
    mask = mask_BT.to(logp_BT.dtype)
    per_token = -clipped_objective(logp_BT, old_logp_BT, advantages_B[:, None], epsilon)
    kl = k3_kl(logp_BT, ref_logp_BT) if ref_logp_BT is not None else torch.zeros_like(logp_BT)
    if beta > 0:
        per_token = per_token + beta * kl
    if loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_norm == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    ratio = torch.exp(logp_BT - old_logp_BT).detach()
    clipped = ((ratio - 1).abs() > epsilon) & mask_BT
    stats = {"loss": loss.item(), "kl": _masked_mean(kl.detach(), mask),
             "clip_fraction": clipped.sum().item() / max(mask_BT.sum().item(), 1)}
    return loss, stats


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return (x * mask).sum().item() / max(mask.sum().item(), 1)


def completion_logprobs(model: Transformer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(completion token | everything before it) for each completion, (B, T) with T the longest completion,
    and the (B, T) bool mask of real tokens. Rows are prompt + completion, right-padded, so positions start at 0
    for every row and the padding mask hides the pad keys. π is the distribution the engine samples at
    `temperature` (softmax of logits / temperature), so that the ratio and the KL are of the sampling policy."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    B, L = len(rows), max(map(len, rows))
    ids_BL = torch.zeros(B, L, dtype=torch.long)
    attn_BL = torch.zeros(B, L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BL[b, :len(row)] = torch.tensor(row)
        attn_BL[b, :len(row)] = 1
    dev = next(model.parameters()).device
    ids_BL, attn_BL = ids_BL.to(dev), attn_BL.to(dev)
    logits_BLV = model(ids_BL, attention_mask=attn_BL)
    # logp_next[b, t] = log p(token t+1 | tokens <= t)
    logp_next = torch.log_softmax(logits_BLV[:, :-1].float() / temperature, dim=-1)
    logp_next = logp_next.gather(-1, ids_BL[:, 1:, None])[..., 0]
    T = max(1, max(map(len, completions)))
    offsets = torch.arange(T, device=dev)
    starts = torch.tensor([len(p) - 1 for p in prompts], device=dev)  # completion token j sits at len(p) + j
    index_BT = (starts[:, None] + offsets[None, :]).clamp(max=L - 2)
    mask_BT = offsets[None, :] < torch.tensor([len(c) for c in completions], device=dev)[:, None]
    return logp_next.gather(1, index_BT), mask_BT


# ------------------------------------------------------------------------------------------ the trainer


def prompt_ids(example: Mapping[str, Any], tokenizer: Tokenizer | None) -> list[int]:
    """An example's prompt: "prompt_ids" as given, else "messages" (or a "prompt" string as one user turn)
    rendered with the chat template and its generation prompt."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    if tokenizer is None:
        raise ValueError("examples without prompt_ids need a tokenizer")
    if "messages" in example:
        messages = example["messages"]
    elif "prompt" in example:
        messages = [{"role": "user", "content": example["prompt"]}]
    else:
        raise ValueError(f"an example needs 'messages', 'prompt' or 'prompt_ids'; got keys {sorted(example)}")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


@dataclass
class Rollouts:
    """P*G completions, group-major (the G completions of prompt 0 first)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    rewards_PG: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, per reward function


class GRPOTrainer:
    """Holds the policy (trained in place, fp32), the frozen reference, the sampling engine and the optimizer."""

    def __init__(self, policy: Transformer, cfg: GRPOConfig, reward_weights: Mapping[str, float],
                 rewards: Mapping[str, RewardFn] = REWARDS, tokenizer: Tokenizer | None = None,
                 max_cache_tokens: int | None = None) -> None:
        unknown = set(reward_weights) - set(rewards)
        if unknown:
            raise ValueError(f"reward weights name unknown reward functions {sorted(unknown)}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rewards = {name: (rewards[name], w) for name, w in reward_weights.items()}
        self.policy = policy.float().train()
        fast = onednn.wanted(cfg.gemm, next(policy.parameters()).device)
        if fast:
            onednn.use_for_training_(self.policy)
        self.reference = _frozen_copy(policy) if cfg.beta > 0 else None
        if fast and self.reference is not None:
            onednn.pack_for_inference_(self.reference)
        # The engine samples from its own copy: LLM keeps a reference to the model it is given and switches it to
        # eval mode (and with oneDNN packs its weights), and update_weights copies new values in after each step.
        self.engine = LLM(_frozen_copy(policy), tokenizer=tokenizer, max_cache_tokens=max_cache_tokens,
                          max_num_seqs=max(64, cfg.prompts_per_step * cfg.group_size),
                          gemm="onednn" if fast else "torch")
        self.optimizer = build_optimizer(self.policy, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                                  warmup_steps=0))
        self.steps_done = 0

    def sample(self, examples: Sequence[Mapping[str, Any]]) -> Rollouts:
        cfg = self.cfg
        prompts = [prompt_ids(e, self.tokenizer) for e in examples]
        # One seed per (step, prompt): a run is reproducible, and no two steps draw the same completions.
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 n=cfg.group_size, seed=hash((cfg.seed, self.steps_done, i)) & (2**62 - 1))
                  for i in range(len(prompts))]
        outputs = self.engine.generate(prompts, params)
        samples = [Sample(e, o.text, list(o.token_ids)) for e, out in zip(examples, outputs) for o in out.outputs]
        components = {name: torch.tensor([fn(s) for s in samples]).view(len(examples), cfg.group_size)
                      for name, (fn, _) in self.rewards.items()}
        rewards = sum(w * components[name] for name, (_, w) in self.rewards.items())
        return Rollouts([p for p in prompts for _ in range(cfg.group_size)], [s.token_ids for s in samples],
                        rewards, components)

    def step(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Sample, score, update the policy μ times, push its weights into the engine; returns statistics."""
        cfg = self.cfg
        rollouts = self.sample(examples)
        advantages = group_advantages(rollouts.rewards_PG, cfg.adv_eps).flatten()
        ref_logp = old_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp, _ = completion_logprobs(self.reference, rollouts.prompts, rollouts.completions,
                                                  cfg.temperature)
        if cfg.updates_per_batch > 1:  # π_old is the policy that sampled, fixed across the μ updates
            with torch.no_grad():
                old_logp, _ = completion_logprobs(self.policy, rollouts.prompts, rollouts.completions,
                                                  cfg.temperature)
        for _ in range(cfg.updates_per_batch):
            stats = self._update(rollouts, advantages, old_logp, ref_logp)
        self.engine.update_weights(self.policy.state_dict())
        self.steps_done += 1
        lengths = torch.tensor([len(c) for c in rollouts.completions], dtype=torch.float)
        return {"step": self.steps_done, **stats, "reward": rollouts.rewards_PG.mean().item(),
                **{f"reward_{k}": v.mean().item() for k, v in rollouts.components.items()},
                "completion_tokens": lengths.mean().item()}

    def _update(self, rollouts: Rollouts, advantages: torch.Tensor, old_logp: torch.Tensor | None,
                ref_logp: torch.Tensor | None) -> dict[str, float]:
        cfg = self.cfg
        logp, mask = completion_logprobs(self.policy, rollouts.prompts, rollouts.completions, cfg.temperature)
        # With μ = 1 the sampling policy *is* the current one: its detached log-probs are π_old exactly (ρ = 1,
        # and the gradient of ρ is the gradient of log π), without a second forward pass.
        old = logp.detach() if old_logp is None else old_logp
        loss, stats = grpo_loss(logp, old, ref_logp, advantages.to(logp.device), mask, cfg.beta, cfg.epsilon,
                                cfg.loss_norm)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip).item()
        self.optimizer.step()
        return stats


def _frozen_copy(model: Transformer) -> Transformer:
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def batches(examples: Sequence[Mapping[str, Any]], size: int, seed: int) -> Any:  # noqa: ANN401 (an iterator)
    """Endless batches of `size` examples, reshuffled every epoch by a seeded generator."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [examples[j] for j in order[i:i + size]]


# Options a resumed run may change: how long it runs and how often it saves. Any other difference would make the
# continued run a different experiment than the one its checkpoint belongs to.
_RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every"})


def train_grpo(model_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: GRPOConfig,
               reward_weights: Mapping[str, float], progress: bool = True, resume: bool = False,
               rewards: Mapping[str, RewardFn] = REWARDS, device: torch.device | str = "cpu") -> Path:
    """GRPO from a checkpoint on a JSONL of prompts (e.g. tasks.grpo_record); writes out_dir/final, a
    metrics.jsonl of one line per step and, every cfg.checkpoint_every steps, a resumable checkpoint (policy,
    optimizer, step) in out_dir/checkpoints. resume=True continues from the newest one exactly: the reference
    is model_dir again, the prompts and sampling seeds are functions of (seed, step), so the continued steps
    are the ones an uninterrupted run takes."""
    examples = read_jsonl(data)
    if len(examples) < cfg.prompts_per_step:
        raise ValueError(f"{data} holds {len(examples)} prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    out = Path(out_dir)
    root = out / "checkpoints"
    found = ckpt.latest(root) if root.is_dir() else None
    if found is not None and not resume:
        raise ValueError(f"{out} already holds GRPO checkpoints; pass --resume or choose another --out")
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_dir(model_dir)
    policy = load(model_dir, dtype=torch.float32, device=check_device(device))
    trainer = GRPOTrainer(policy, cfg, reward_weights, rewards, tokenizer=tokenizer)
    record = asdict(cfg) | {"reward_weights": dict(reward_weights)}
    log = MetricsLog(out / "metrics.jsonl")
    if found is not None:
        _resume(trainer, found, record)
        log.truncate_after(trainer.steps_done)
    else:
        out.mkdir(parents=True, exist_ok=True)
        log.path.unlink(missing_ok=True)
    (out / "grpo_config.json").write_text(json.dumps(record, indent=2) + "\n")
    source = batches(examples, cfg.prompts_per_step, cfg.seed)
    for _ in range(trainer.steps_done):  # the batches already used, drawn again so the next one is the same
        next(source)
    with tqdm(total=cfg.steps, initial=min(trainer.steps_done, cfg.steps), unit="step",
              disable=not progress) as bar:
        while trainer.steps_done < cfg.steps:
            stats = trainer.step(next(source))
            log.write(stats)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.4f}")
            if cfg.checkpoint_every and (trainer.steps_done % cfg.checkpoint_every == 0
                                         or trainer.steps_done == cfg.steps):
                _save_checkpoint(trainer, root, record)
    final = out / "final"
    save(trainer.policy, final)
    copy_tokenizer_files(model_dir, final)
    return final


def _save_checkpoint(trainer: GRPOTrainer, root: Path, record: Mapping[str, Any]) -> None:
    state = {"step": trainer.steps_done, "model": ckpt.model_state(trainer.policy),
             "optimizer": ckpt.optimizer_state(trainer.optimizer), "config": json.dumps(record)}
    ckpt.write_rank_state(root, trainer.steps_done, 0, state)
    ckpt.publish(root, trainer.steps_done, keep=1)


def _resume(trainer: GRPOTrainer, directory: Path, record: Mapping[str, Any]) -> None:
    state = ckpt.read_rank_state(directory, 0)
    saved = json.loads(state["config"])
    changed = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k) and
                     k not in _RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"{directory} was written with other GRPO options ({', '.join(changed)}: "
                         f"{[saved.get(k) for k in changed]} there, {[record.get(k) for k in changed]} now); "
                         "resume with the same ones")
    ckpt.load_model_state(trainer.policy, state["model"])
    ckpt.load_optimizer_state(trainer.optimizer, state["optimizer"])
    trainer.steps_done = int(state["step"])
    trainer.engine.update_weights(trainer.policy.state_dict())


# ------------------------------------------------------------------------------------------ command line


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = GRPOConfig()
    p = sub.add_parser("grpo", help="reinforce a model with GRPO on prompts with rule-checked answers",
                       description="GRPO (DeepSeekMath): G sampled completions per prompt, group-normalised "
                                   "rule-based rewards, clipped ratio, k3 KL to the starting model.")
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer (the policy's start)")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...], 'answer': N} prompts")
    p.add_argument("--out", required=True, help="output directory (final/ and metrics.jsonl)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--group-size", type=int, default=d.group_size, help="G, completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (0: no reference model)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="clip range of the probability ratio")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--updates-per-batch", type=int, default=d.updates_per_batch, help="μ")
    p.add_argument("--loss-norm", choices=LOSS_NORMS, default=d.loss_norm,
                   help="sequence: mean per completion, then over completions (DeepSeekMath); "
                        "token: mean over all completion tokens (DAPO/TRL)")
    p.add_argument("--reward-weights", default="accuracy=1,format=0.1", help="NAME=WEIGHT,... over "
                   f"{sorted(REWARDS)}")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="completion length limit")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between resumable checkpoints in OUT/checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N'): the policy, the reference and "
                   "the sampling engine")
    p.add_argument("--gemm", choices=onednn.CHOICES, default=d.gemm,
                   help="fp32 products: 'onednn', 'torch' (F.linear), 'auto' = oneDNN on x86 CPUs")
    p.set_defaults(func=run_grpo)


def run_grpo(args: argparse.Namespace) -> int:
    keep_freed_memory()
    try:
        cfg = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step, steps=args.steps,
                         beta=args.beta, epsilon=args.epsilon, lr=args.lr, updates_per_batch=args.updates_per_batch,
                         loss_norm=args.loss_norm, max_tokens=args.max_tokens, temperature=args.temperature,
                         seed=args.seed, gemm=args.gemm, checkpoint_every=args.checkpoint_every)
        weights = parse_reward_weights(args.reward_weights)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    try:
        final = train_grpo(args.model, args.data, args.out, cfg, weights, resume=args.resume, device=args.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"done: {final}")
    return 0
