"""Long-context evaluation: needle in a haystack (DeepSeek-V2's Figure 4, scaled down) and loss by position.

Needle in a haystack: for every (context length, depth) cell, `n` prompts of that many tokens, each a fresh
pass key (dsv2.train.longdocs.Needle: a random name and five digits) planted at that depth of held-out filler
and asked for at the end; a prompt counts as retrieved when the greedy continuation starts with the key. The
grid's lengths may exceed the checkpoint's `max_position_embeddings`: the model is then rebuilt with a longer
context (rotary positions are computed, not tabled, so the weights are unchanged) and those columns are
marked as extrapolated in the result.

Copy: the loss on a span of held-out text seen a second time against the loss on its first reading. A model
that can look a token sequence up in its context (an induction head, what a needle's key needs) predicts the
second copy almost for free; one that cannot pays the same twice. Beside it, the attention weights that show
which heads look at the previous token and which look up the copy.

Loss by position: the mean next-token loss at each position of long held-out documents, read from their first
token, in power-of-two position buckets: whether more context keeps helping, and where it stops helping.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsv2.infer import LLM, SamplingParams
from dsv2.model import Transformer
from dsv2.train.longdocs import Filler, draw_needle, haystack

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = 11  # 0%, 10%, ..., 100%, as the paper's grid
ANSWER_TOKENS = 8  # a five-digit key and its full stop, whatever the tokenizer's digit merges


def depth_grid(k: int) -> list[float]:
    if k < 1:
        raise ValueError(f"need at least one depth, got {k}")
    return [i / (k - 1) for i in range(k)] if k > 1 else [0.5]


def with_context(model: Transformer, n_positions: int) -> Transformer:
    """The model itself if its config covers n_positions, else the same weights under a config that does
    (the engine sizes requests by max_position_embeddings; nothing in the weights depends on it)."""
    if model.cfg.max_position_embeddings >= n_positions:
        return model
    longer = Transformer(model.cfg.replace(max_position_embeddings=n_positions))
    longer.load_state_dict(model.state_dict())
    return longer.to(next(model.parameters()).dtype).eval()


def retrieved(text: str, key: int) -> bool:
    """The continuation's first number is the key (" 12345." and "12345" count; " 1234", "123456" do not)."""
    m = re.match(r"\s*(\d+)", text)
    return m is not None and int(m.group(1)) == key


def needle_grid(llm: LLM, filler: Filler, lengths: Sequence[int] = DEFAULT_LENGTHS,
                depths: Sequence[float] = tuple(depth_grid(DEFAULT_DEPTHS)), n: int = 4, seed: int = 0,
                trained_context: int | None = None) -> dict[str, Any]:
    """Retrieval accuracy per (depth, length) cell, every prompt of the grid decoded greedily in one
    continuous batch. trained_context: the checkpoint's own max_position_embeddings, beyond which a column
    is extrapolated (default: the engine's model's)."""
    if n < 1:
        raise ValueError(f"need at least one needle per cell, got {n}")
    cells, prompts, keys = [], [], []
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            # One generator per cell: a cell's needles and filler do not depend on which other cells are run.
            rng = random.Random(f"{seed}/{length}/{depth:.6f}")
            for _ in range(n):
                needle = draw_needle(rng)
                prompts.append(haystack(filler, needle, length, depth, rng))
                keys.append(needle.key)
                cells.append((i, j))
    outputs = llm.generate(prompts, SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0))
    hits = [[0] * len(lengths) for _ in depths]
    failures = []
    for (i, j), key, out in zip(cells, keys, outputs):
        text = out.outputs[0].text
        if retrieved(text, key):
            hits[i][j] += 1
        elif len(failures) < 5:
            failures.append({"length": lengths[j], "depth": depths[i], "key": key, "output": text})
    context = trained_context or llm.cfg.max_position_embeddings
    accuracy = [[h / n for h in row] for row in hits]
    return {
        "lengths": list(lengths), "depths": list(depths), "n_per_cell": n, "seed": seed,
        "accuracy": accuracy,  # [depth][length]
        "by_length": {str(L): sum(row[j] for row in accuracy) / len(depths) for j, L in enumerate(lengths)},
        "overall": sum(map(sum, accuracy)) / (len(depths) * len(lengths)),
        "context": context, "extrapolated": [L for L in lengths if L > context],
        "failures": failures,
    }


@torch.inference_mode()
def loss_by_position(model: Transformer, documents: Sequence[Sequence[int]], length: int,
                     max_documents: int = 16) -> dict[str, Any]:
    """Mean next-token loss (nats) per power-of-two position bucket over the first `length` tokens of each
    document that has that many (up to max_documents of them), each read from its own first token."""
    docs = [list(d[:length]) for d in documents if len(d) >= length][:max_documents]
    if not docs:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(f"no held-out document has {length} tokens (the longest has {longest}); "
                         "give a shorter length or longer documents")
    model.eval()
    dev = next(model.parameters()).device
    total = torch.zeros(length - 1, dtype=torch.float64, device=dev)
    for doc in docs:
        ids = torch.tensor(doc, device=dev)[None]
        logits = model(ids[:, :-1])
        total += F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none").double()
    mean = total / len(docs)  # mean[p]: the loss of predicting token p + 1 from tokens 0..p
    edges = [0, *(2**k for k in range(int(math.log2(length - 1)) + 1))]
    if edges[-1] < length - 1:
        edges.append(length - 1)
    buckets = [{"positions": [lo, hi], "mean_nll": float(mean[lo:hi].mean())} for lo, hi in zip(edges, edges[1:])]
    return {"length": length, "documents": len(docs), "buckets": buckets}


@torch.inference_mode()
def copy_loss(model: Transformer, filler: Filler, n: int = 40, span: int = 64, gap: int = 32,
              seed: int = 0) -> dict[str, Any]:
    """Mean next-token loss (nats) on the first and on the second copy of `span` tokens of filler repeated after
    `gap` other tokens (BOS, span, gap, span), over n draws; each copy's first token, which nothing announces,
    is left out. `gain` = first - second: near 0 without copying, near `first` with perfect copying.

    `heads`: per layer and head, the mean attention weight (from the same forward passes) on the previous token
    (`previous_token`, over every position) and, from each token of the second copy, on the token that followed
    it in the first (`induction`): an induction head, which copying needs, puts most of its weight there; it
    usually reads a previous-token head of an earlier layer."""
    if n < 1 or span < 2 or gap < 0:
        raise ValueError(f"need n >= 1, span >= 2 and gap >= 0, got {n}, {span} and {gap}")
    tok = filler.tokenizer
    model.eval()
    dev = next(model.parameters()).device
    rng = random.Random(f"copy/{seed}")
    bos = [] if tok.bos_id is None else [tok.bos_id]
    first = second = 0.0
    previous = induction = torch.zeros(())
    for _ in range(n):
        a = tok.encode("".join(filler.take(span, rng)), add_bos=False, add_eos=False)[:span]
        b = tok.encode("".join(filler.take(gap, rng)), add_bos=False, add_eos=False)[:gap] if gap else []
        ids = torch.tensor([bos + a + b + a], device=dev)
        logits, probs = attention_probs(model, ids[:, :-1])
        nll = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")
        # nll[p] is the loss of token p + 1; with o = len(bos), the copies are tokens o .. o+A-1 and o+A+G ..
        o = len(bos)
        first += float(nll[o: o + len(a) - 1].mean())
        second += float(nll[o + len(a) + len(b):].mean())
        p_prev, p_ind = head_scores(probs, o, len(a), len(b))
        previous, induction = previous + p_prev / n, induction + p_ind / n
    return {"n": n, "span": span, "gap": gap, "first": first / n, "second": second / n,
            "gain": (first - second) / n,
            "heads": {"previous_token": _rounded(previous), "induction": _rounded(induction)}}


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(v, 3) for v in row] for row in t.tolist()]


def attention_probs(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one sequence ids (1, T) and every layer's causal attention weights (L, heads, T, T),
    recomputed from what each MLA receives (forward pre-hooks; the model is not changed)."""
    from dsv2.model.mla import MLA

    inputs: list[tuple[MLA, tuple[Any, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args)))
             for m in model.modules() if isinstance(m, MLA)]
    try:
        logits = model(ids)
    finally:
        for h in hooks:
            h.remove()
    probs = []
    for attn, (x, cos, sin, *_) in inputs:
        q_nope, q_pe, c_kv, k_pe = attn.project(x, cos, sin)
        B, T, nh, _ = q_nope.shape
        k_nope = attn.wkv_b(c_kv).view(B, T, nh, -1)[..., : attn.nope_dim]
        scores = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * attn.softmax_scale
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        probs.append(scores.float().masked_fill(~causal, float("-inf")).softmax(-1)[0])
    T = ids.shape[1]
    return logits, torch.stack(probs) if probs else torch.zeros(0, 0, T, T)  # (a model without MLA: no heads)


def head_scores(probs: torch.Tensor, start: int, span: int, gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (L, heads, T, T) over [start tokens, span, gap, span] -> (L, heads) mean weight on the previous
    token, and from the second copy's token i on the first copy's token i + 1."""
    T = probs.shape[-1]
    t = torch.arange(1, T)
    previous = probs[..., t, t - 1].mean(-1)
    i = torch.arange(min(span - 1, T - start - span - gap))
    induction = probs[..., start + span + gap + i, start + i + 1].mean(-1)
    return previous, induction


def plot_grid(result: dict[str, Any], path: str | Path, title: str) -> Path:
    """A heatmap of the grid as in the paper's Figure 4: depth down, context length across, green = found."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    acc, lengths, depths = result["accuracy"], result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.42 * len(depths) + 1.8))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L:,}" for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}".rstrip("0").rstrip(".") if value not in (0, 1) else f"{value:.0f}",
                    ha="center", va="center", fontsize=7)
    beyond = [j for j, L in enumerate(lengths) if L > result["context"]]
    if beyond:  # where the checkpoint's own context ends
        ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1)
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def n_positions_needed(lengths: Sequence[int]) -> int:
    """The context a grid needs: its longest prompt plus the answer, rounded up to a cache block."""
    return 16 * math.ceil((max(lengths) + ANSWER_TOKENS) / 16)
