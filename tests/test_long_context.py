"""Long contexts: prefill attention in key blocks (dsv2.infer.attention) against the single-shot naive MLA, and the
engine on a prompt of thousands of tokens against the model's plain forward."""

from __future__ import annotations

import random

import pytest
import torch

from dsv2 import Transformer
from dsv2.infer import LLM, SamplingParams
from dsv2.infer import runner as runner_module
from dsv2.infer.attention import chunk_attention
from dsv2.infer.runner import ModelRunner
from dsv2.model.mla import MLA
from tests.conftest import YARN_0707, randomize_, small_config

CFG = small_config(max_position_embeddings=4096, rope_scaling=YARN_0707)


@pytest.fixture(scope="module")
def attn() -> MLA:
    assert CFG.softmax_scale != CFG.qk_head_dim ** -0.5  # YaRN's mscale is in the scale under test
    return randomize_(MLA(CFG), seed=3).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "scores"])
@pytest.mark.parametrize(("n", "ctx", "block"), [
    (64, 64, 16),  # the whole sequence, ctx a multiple of the block
    (200, 200, 64),  # the whole sequence, a partial last block
    (50, 333, 64),  # a chunk in the middle of a sequence: fully visible blocks, then ones on the diagonal
    (7, 300, 128),  # a few rows behind a long prefix
    (1, 130, 64),  # one row: every block fully visible
    (100, 300, 1),  # one key per block
])
def test_blocked_prefill_equals_single_shot(attn: MLA, n: int, ctx: int, block: int, fused: bool) -> None:
    g = torch.Generator().manual_seed(ctx + n)
    q_nope = torch.randn(n, attn.n_heads, attn.nope_dim, generator=g)
    q_pe = torch.randn(n, attn.n_heads, attn.rope_dim, generator=g)
    latent_SW = torch.randn(ctx, attn.kv_rank + attn.rope_dim, generator=g)
    reads = []

    def latents(k0: int, k1: int) -> torch.Tensor:
        reads.append((k0, k1))
        return latent_SW[k0:k1]

    with torch.no_grad():
        got = chunk_attention(attn, q_nope, q_pe, latents, ctx, key_block=block, fused=fused)
        mask = (torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None])[None, None]  # (1, 1, n, ctx)
        want = attn.attend_naive(q_nope[None], q_pe[None], latent_SW[None, :, : attn.kv_rank],
                                 latent_SW[None, :, attn.kv_rank :], mask)[0]
    assert got.shape == want.shape == (n, attn.n_heads, attn.v_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert reads == [(k, min(k + block, ctx)) for k in range(0, ctx, block)]  # each key read once, in blocks


def test_blocked_prefill_in_bf16_stays_close(attn: MLA) -> None:
    """The merge accumulates in fp32 whatever the activations' dtype."""
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(40, attn.n_heads, attn.nope_dim, generator=g)
    q_pe = torch.randn(40, attn.n_heads, attn.rope_dim, generator=g)
    latent_SW = torch.randn(500, attn.kv_rank + attn.rope_dim, generator=g)
    with torch.no_grad():
        want = chunk_attention(attn, q_nope, q_pe, lambda a, b: latent_SW[a:b], 500, key_block=64)
        a16 = MLA(CFG).to(torch.bfloat16).eval()
        a16.load_state_dict(attn.state_dict())
        got = chunk_attention(a16, q_nope.bfloat16(), q_pe.bfloat16(), lambda a, b: latent_SW[a:b].bfloat16(), 500,
                              key_block=64)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def test_engine_on_a_long_prompt_matches_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2,999-token prompt prefilled in 512-token chunks over 256-key blocks, beside a short request (so that
    decode rows and blocked chunks share steps): greedy tokens and their logprobs equal the plain forward's,
    teacher-forced."""
    model = randomize_(Transformer(CFG), seed=11).eval()
    rng = random.Random(4)
    long_prompt = [rng.randrange(2, CFG.vocab_size) for _ in range(2999)]
    short_prompt = [rng.randrange(2, CFG.vocab_size) for _ in range(20)]
    llm = LLM(model, max_cache_tokens=4096, max_num_batched_tokens=512, prefix_caching=False)
    llm.runner = ModelRunner(llm.model, llm.cache, key_block=256)
    blocked = []
    monkeypatch.setattr(runner_module, "chunk_attention",
                        lambda *a, **k: blocked.append(a[4]) or chunk_attention(*a, **k))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([short_prompt, long_prompt], params)
    assert max(blocked) == 2999 and min(blocked) <= 512  # the first chunk too (ctx 512 > 256 keys)
    with torch.no_grad():
        for prompt, out in zip([short_prompt, long_prompt], outs):
            got = out.outputs[0].token_ids
            logprobs = model(torch.tensor([prompt + got[:-1]]))[0, len(prompt) - 1 :].log_softmax(-1)
            assert got == logprobs.argmax(-1).tolist()
            want = logprobs.gather(-1, torch.tensor(got)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor([t.logprob for t in out.outputs[0].logprobs]), want,
                                       atol=1e-4, rtol=0)
