"""Perplexity of a model on a token sequence, with sliding fixed-length windows.

Every token after the first is predicted exactly once. The first window covers the first `window` targets
with all the context before them; each later window slides by `stride` and scores only its last `stride`
targets, each seen with `window - stride` to `window - 1` tokens of context. stride = window gives
non-overlapping windows (cheapest; tokens early in a window see little context); smaller strides cost more
forwards and approach the full-context perplexity. The result is token-weighted: exp(total NLL / targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv2.model import Transformer


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed over targets, nats
    tokens: int  # targets scored

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.mean_nll).exp())


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: inputs tokens[start:end], targets tokens[start+1:end+1], of which
    positions >= first_scored (indices into the token sequence) are scored."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    out, scored = [], 1  # token 0 has no context and is never a target
    end = min(window, n_tokens - 1)
    while scored < n_tokens:
        out.append((max(0, end - window), end, scored))
        scored, end = end + 1, min(end + stride, n_tokens - 1)
    return out


@torch.inference_mode()
def perplexity(model: Transformer, token_ids: Sequence[int], window: int = 256, stride: int | None = None,
               batch_size: int = 8) -> Perplexity:
    """Token-weighted perplexity of `token_ids` under `model` (see the module docstring for the windows)."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    model.eval()
    tokens = torch.tensor(list(token_ids), dtype=torch.long)
    spans = windows(len(tokens), window, stride or window)
    nll, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        part = spans[i:i + batch_size]
        n, c = _score_batch(model, tokens, part)
        nll, count = nll + n, count + c
    return Perplexity(nll, count)


def window_batch(tokens: torch.Tensor, spans: list[tuple[int, int, int]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few windows right-padded into one batch: input ids, attention mask and targets (B, T), the targets
    -100 where a position is padding or not scored."""
    T = max(end - start for start, end, _ in spans)
    ids_BT = torch.zeros(len(spans), T, dtype=torch.long)
    attn_BT = torch.zeros(len(spans), T, dtype=torch.long)
    targets_BT = torch.full((len(spans), T), -100, dtype=torch.long)
    for b, (start, end, first) in enumerate(spans):
        ids_BT[b, :end - start] = tokens[start:end]
        attn_BT[b, :end - start] = 1
        targets_BT[b, first - start - 1:end - start] = tokens[first:end + 1]
    return ids_BT, attn_BT, targets_BT


def _score_batch(model: Transformer, tokens: torch.Tensor, spans: list[tuple[int, int, int]]) -> tuple[float, int]:
    """Summed NLL and count of the scored targets of a few windows, right-padded into one batch."""
    dev = next(model.parameters()).device
    ids_BT, attn_BT, targets_BT = (t.to(dev) for t in window_batch(tokens, spans))
    logits = model(ids_BT, attention_mask=attn_BT)
    nll = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), ignore_index=-100, reduction="sum")
    return nll.item(), int((targets_BT != -100).sum())
