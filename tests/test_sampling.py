"""The batched sampler on hand-made logits: logit_bias, the exponential race's zero-noise corner, and the
checkpoint's generation_config.json as sampling defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv2.infer.sampling import SamplerInput, SamplingParams, generation_defaults, sample

V = 32


def _rows(*params: SamplingParams, seed: int = 0, output_ids: tuple[int, ...] = ()) -> list[SamplerInput]:
    return [SamplerInput(p, None if p.greedy else torch.Generator().manual_seed(seed + i), [3, 4], list(output_ids))
            for i, p in enumerate(params)]


def _logits(n: int = 1) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(5))


def test_logit_bias_is_stored_sorted_and_hashable() -> None:
    p = SamplingParams(logit_bias={9: 1, 2: -100})
    assert p.logit_bias == ((2, -100.0), (9, 1.0))
    assert hash(p) == hash(SamplingParams(logit_bias=[(9, 1.0), (2, -100)]))
    assert SamplingParams().logit_bias == ()


@pytest.mark.parametrize("bias", [{-1: 1.0}, {1: 100.5}, {1: -101}, {1: float("nan")}, {1.5: 1}, {True: 1},
                                  {1: "2"}, [(1, 2.0), (1, 3.0)], "x", [(1, 2, 3)]])
def test_logit_bias_validation(bias: object) -> None:
    with pytest.raises(ValueError, match="SamplingParams.logit_bias must be"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_flips_greedy_and_only_in_its_row() -> None:
    logits = _logits(2)
    target = int(logits[0].argmin())
    tokens, _ = sample(logits, _rows(SamplingParams(temperature=0, logit_bias={target: 100}),
                                     SamplingParams(temperature=0)))
    assert tokens == [target, int(logits[1].argmax())]
    # Sampled rows too, whatever the seed.
    for seed in range(10):
        tokens, _ = sample(logits[:1], _rows(SamplingParams(temperature=1.0, logit_bias={target: 100}), seed=seed))
        assert tokens == [target]


def test_logit_bias_minus_100_bans_a_token() -> None:
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # by far the likeliest
    tokens, _ = sample(logits, _rows(SamplingParams(temperature=0, logit_bias={7: -100})))
    assert tokens != [7]
    for seed in range(50):
        tokens, _ = sample(logits, _rows(SamplingParams(temperature=2.0, logit_bias={7: -100}), seed=seed))
        assert tokens != [7]


def test_logit_bias_comes_before_penalties() -> None:
    # Token 3 (in the prompt) at 2.0, token 5 at 2.5. Bias first: (2 + 2) / 2 = 2 < 2.5, token 5 wins;
    # penalty first would give 2 / 2 + 2 = 3 and token 3.
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 5] = 2.0, 2.5
    tokens, _ = sample(logits, _rows(SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={3: 2.0})))
    assert tokens == [5]


def test_logit_bias_leaves_the_callers_logits_and_reported_logprobs_alone() -> None:
    logits = _logits()
    before = logits.clone()
    tokens, [lp] = sample(logits, _rows(SamplingParams(temperature=0, logprobs=1, logit_bias={0: 50})))
    assert tokens == [0] and torch.equal(logits, before)
    assert lp.logprob == pytest.approx(float(torch.log_softmax(before, -1)[0, 0]))


def test_logit_bias_outside_the_vocabulary_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=f"logit_bias names token id {V}, outside the vocabulary"):
        sample(_logits(), _rows(SamplingParams(temperature=0, logit_bias={V: 1})))


@pytest.mark.parametrize("noise", ["zeros", "zero_on_excluded"])
@pytest.mark.parametrize("params", [SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams(min_p=0.5),
                                    SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1)])
def test_filtered_out_tokens_are_never_drawn_even_on_zero_noise(monkeypatch: pytest.MonkeyPatch, params:
                                                                SamplingParams, noise: str) -> None:
    # Exp(1) noise of exactly 0 made p / E inf for kept tokens and 0 / 0 = NaN for filtered-out ones, and
    # argmax picks a NaN: a token top-k / top-p / min-p had excluded.
    logits = torch.linspace(4.0, -4.0, V)[None, :]  # token 0 likeliest, then 1, ...

    def fake_exponential(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if noise == "zeros":
            return self.zero_()
        self.fill_(1.0)
        self[V // 2:] = 0.0  # zero exactly where the filters cut
        return self

    monkeypatch.setattr(torch.Tensor, "exponential_", fake_exponential)
    [token], _ = sample(logits, _rows(params))
    probs = torch.softmax(logits[0] / params.temperature, -1)
    allowed = set(range(params.top_k or V))
    allowed &= {i for i in range(V) if float(probs[:i].sum()) < params.top_p}
    allowed &= {i for i in range(V) if float(probs[i]) >= params.min_p * float(probs[0])}
    assert token in allowed, (token, sorted(allowed))


def test_generation_defaults(tmp_path: Path) -> None:
    def defaults(cfg: object | str) -> dict:
        (tmp_path / "generation_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return generation_defaults(tmp_path)

    assert generation_defaults(tmp_path / "absent") == {}
    assert generation_defaults(tmp_path) == {}
    # DeepSeek-V2's own file
    assert defaults({"bos_token_id": 100000, "eos_token_id": 100001, "do_sample": True, "temperature": 0.3,
                     "top_p": 0.95}) == {"temperature": 0.3, "top_p": 0.95}
    assert defaults({"do_sample": False}) == {"temperature": 0.0}
    # greedy in transformers still applies the repetition penalty, and ignores the sampling-only keys
    assert defaults({"do_sample": False, "temperature": 0.6, "top_k": 5, "repetition_penalty": 1.1}) == {
        "temperature": 0.0, "repetition_penalty": 1.1}
    got = defaults({"temperature": 1, "top_k": 40.0, "min_p": 0.05, "repetition_penalty": 1, "top_p": None})
    assert got == {"temperature": 1.0, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.0}
    assert type(got["temperature"]) is float and type(got["top_k"]) is int
    assert SamplingParams(**got).top_k == 40
    assert defaults({"top_k": 0, "top_p": 1}) == {"top_p": 1.0}
    for bad, match in (("{not json", "is not a readable JSON file"), ("[1]", "must hold a JSON object"),
                       ({"temperature": "hot"}, "temperature must be a number"),
                       ({"top_k": 2.5}, "top_k must be an integer"), ({"top_p": True}, "top_p must be a number"),
                       ({"top_p": 0}, "SamplingParams.top_p must be in")):
        with pytest.raises(ValueError, match=match) as e:
            defaults(bad)
        assert str(tmp_path / "generation_config.json") in str(e.value)
