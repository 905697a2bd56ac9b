"""Supervised fine-tuning on chat conversations, and `dsv2 sft`.

Rendering. A conversation is rendered with the tokenizer's chat template and tokenized turn by turn: the text
up to each assistant turn's generation prompt ("...Assistant:" in V2's template) is one segment, the turn's
own text (" content" + EOS) the next. The prompt segments are therefore token-for-token what the engine feeds
the model at inference (it tokenizes exactly that prompt), and the loss falls on the assistant segments only:
labels are the token ids there and -100 (ignored) everywhere else -- BOS, system, user turns, "Assistant:".

Batching without cross-contamination. The model's attention_mask is a (B, T) padding mask, so two
conversations packed into one row would attend to each other. Each row therefore holds exactly one
conversation, right-padded (pads: attention 0, label -100); to waste little compute on padding, batches are
formed from conversations of similar length (sorted within shuffled chunks). Packing several conversations per
row would need per-conversation positions and a block-diagonal mask in the model's forward.

Conversations longer than seq_len are cut to seq_len tokens; one with no assistant token left is dropped.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dsv2.checkpoint import load, save
from dsv2.hardware import check_device, keep_freed_memory
from dsv2.kernels import onednn
from dsv2.model import Transformer
from dsv2.model.loss import IGNORE_INDEX
from dsv2.tokenizer import Tokenizer
from dsv2.train.optim import OptimConfig, StepDecay, build_optimizer, set_lr
from dsv2.train.tasks import read_jsonl

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_SORT_CHUNK = 8  # batches per length-sorted chunk: little padding, yet batches still vary in their mix

Row = tuple[list[int], list[int]]  # (token ids, labels)


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 200
    batch_size: int = 8  # conversations per step
    seq_len: int = 512  # longest row; longer conversations are cut
    lr: float = 1e-4  # V2's SFT used 5e-6 on 236B parameters (§4.1); a few-million-parameter model needs more
    warmup_steps: int = 10
    decay_at: tuple[float, ...] = (0.6, 0.9)  # V2's step decay (x0.316), as in pretraining
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    gemm: str = "auto"  # fp32 products through oneDNN ("onednn", "auto" = on x86 CPUs) or F.linear ("torch")

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, decay_at=self.decay_at,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip)


def render_with_labels(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> Row:
    """(ids, labels) of a conversation: labels equal ids on every assistant turn (content and EOS), else -100.
    Messages after the last assistant turn teach nothing and are left out."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a conversation needs at least one assistant message to learn from")
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text tokenized so far
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant message")
        prompt = _render(tokenizer, messages[:i], True)
        turn = _render(tokenizer, messages[:i + 1], False)
        for text, learn in ((_suffix(prompt, done), False), (_suffix(turn, prompt), True)):
            piece = tokenizer.encode(text, add_bos=False, add_eos=False)
            ids += piece
            labels += piece if learn else [IGNORE_INDEX] * len(piece)
        done = turn
    return ids, labels


def _render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    return cast(str, tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt))


def _suffix(text: str, prefix: str) -> str:
    # Turn-by-turn tokenization needs each rendering to extend the previous one; V2's template does.
    if not text.startswith(prefix):
        raise ValueError("the chat template renders a conversation's prefix differently from the whole "
                         "conversation; cannot separate assistant turns")
    return text[len(prefix):]


def prepare(tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]], seq_len: int) -> list[Row]:
    """Rendered, labelled rows cut to seq_len; conversations left without any label are dropped."""
    rows = []
    for messages in conversations:
        ids, labels = render_with_labels(tokenizer, messages)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # the first token is never a target
            rows.append((ids, labels))
    return rows


def collate(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One conversation per row, right-padded: (ids, labels, attention_mask), each (B, T)."""
    T = max(len(ids) for ids, _ in rows)
    ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attn_BT = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        ids_BT[b, :len(ids)] = torch.tensor(ids)
        labels_BT[b, :len(ids)] = torch.tensor(labels)
        attn_BT[b, :len(ids)] = 1
    return ids_BT, labels_BT, attn_BT


def epoch_batches(rows: Sequence[Row], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch as batches of row indices: shuffled, then sorted by length within chunks of a few batches
    (so rows in a batch have similar lengths), then the batches shuffled. Every row appears exactly once."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = batch_size * _SORT_CHUNK
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(rows[i][0]))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(rows: Sequence[Row], batch_size: int, seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    while True:
        yield from epoch_batches(rows, batch_size, rng)


def sft_loss(model: Transformer, ids_BT: torch.Tensor, labels_BT: torch.Tensor, attn_BT: torch.Tensor
             ) -> torch.Tensor:
    """Mean cross-entropy over the labelled (assistant) tokens of the batch: token-weighted, so a long answer
    counts in proportion to its tokens."""
    # position t predicts token t + 1; the last position predicts nothing
    shifted = F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)
    dev = next(model.parameters()).device
    return model(ids_BT.to(dev), attention_mask=attn_BT.to(dev), labels=shifted.to(dev))


def fit(model: Transformer, rows: Sequence[Row], cfg: SFTConfig, pad_id: int,
        on_step: Callable[[dict[str, float]], None] | None = None) -> list[float]:
    """Train `model` in place for cfg.steps; returns the loss of every step."""
    if not rows:
        raise ValueError("no training rows")
    torch.manual_seed(cfg.seed)
    model.train()
    if onednn.wanted(cfg.gemm, next(model.parameters()).device):
        onednn.use_for_training_(model)
    optim_cfg = cfg.optim()
    optimizer = build_optimizer(model, optim_cfg)
    schedule = StepDecay.for_run(optim_cfg, [cfg.batch_size] * cfg.steps, cfg.seq_len)
    stream = batch_stream(rows, cfg.batch_size, cfg.seed)
    losses = []
    for step in range(cfg.steps):
        loss = sft_loss(model, *collate([rows[i] for i in next(stream)], pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
        set_lr(optimizer, schedule.lr(step))
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step({"step": step + 1, "loss": losses[-1], "grad_norm": grad_norm, "lr": schedule.lr(step)})
    return losses


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, Path(dst) / name)


def train_sft(model_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: SFTConfig, progress: bool = True,
              device: torch.device | str = "cpu") -> Path:
    """SFT a checkpoint on a JSONL of {"messages": [...]} conversations on `device`; writes out_dir/final
    (weights and tokenizer) and out_dir/metrics.jsonl."""
    device = check_device(device)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = prepare(tokenizer, [r["messages"] for r in read_jsonl(data)], cfg.seq_len)
    model = load(model_dir, dtype=torch.float32, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # any id: pads are masked and unlabelled
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as log, \
            tqdm(total=cfg.steps, unit="step", disable=not progress) as bar:
        def on_step(record: dict[str, float]) -> None:
            log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")

        fit(model, rows, cfg, pad_id, on_step)
    final = out / "final"
    save(model, final)
    copy_tokenizer_files(model_dir, final)
    return final


# ------------------------------------------------------------------------------------------ command line


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = SFTConfig()
    p = sub.add_parser("sft", help="fine-tune a model on chat conversations (loss on assistant turns only)")
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer files")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [{'role': ..., 'content': ...}, ...]}")
    p.add_argument("--out", required=True, help="output directory (final/ and metrics.jsonl)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="conversations per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="longer conversations are cut")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--gemm", choices=onednn.CHOICES, default=d.gemm,
                   help="fp32 products: 'onednn', 'torch' (F.linear), 'auto' = oneDNN on x86 CPUs")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N')")
    p.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    keep_freed_memory()
    cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                    warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
                    gemm=args.gemm)
    try:
        final = train_sft(args.model, args.data, args.out, cfg, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"done: {final}")
    return 0
