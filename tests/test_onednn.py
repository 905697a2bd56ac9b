"""oneDNN products (dsv2.kernels.onednn): the training linear against F.linear in values and gradients, packed
inference models against dense ones, their state_dict round trip, and the engine and trainer wired to them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv2 import Transformer
from dsv2.infer import LLM, SamplingParams
from dsv2.kernels import onednn
from dsv2.model.moe import Experts
from dsv2.kernels.onednn import PackedExperts, PackedLinear
from dsv2.train.config import TrainConfig
from dsv2.train.metrics import read_metrics
from dsv2.train.trainer import train
from tests.conftest import randomize_, small_config
from tests.test_train_run import write_recipe

pytestmark = pytest.mark.skipif(not onednn.available(), reason="needs an x86 CPU with torch's oneDNN")

CFG = small_config(topk_method="group_limited_greedy", n_group=4, topk_group=2)
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("shape", [(2, 7, 24), (5, 24), (0, 24)])
def test_linear_matches_f_linear_in_values_and_gradients(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-1], 48, generator=g)[..., 10:34]  # a strided (non-contiguous) input
    w = torch.randn(40, 24, generator=g)
    grad_out = torch.randn(*shape[:-1], 40, generator=g)
    results = []
    for fn in (onednn.linear, F.linear):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(grad_out)
        results.append((y, xi.grad, wi.grad))
    x64, w64 = x.double(), w.double()
    exact = (x64 @ w64.T, grad_out.double() @ w64, grad_out.double().reshape(-1, 40).T @ x64.reshape(-1, 24))
    for got, ref, want in zip(results[0], results[1], exact):
        assert got.shape == ref.shape
        # within fp32 rounding of the exact product, as F.linear is (empty inputs: zero weight gradient)
        err, ref_err = (torch.cat([(t.double() - want.reshape(t.shape)).abs().flatten(), torch.zeros(1)]).max()
                        for t in (got, ref))
        assert err <= 4 * ref_err + 1e-5


def test_linear_leaves_other_dtypes_and_autocast_to_f_linear() -> None:
    x, w = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(onednn.linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn.linear(x.float(), w.float()).dtype == torch.bfloat16


def test_training_model_keeps_its_parameters_and_gradients() -> None:
    dense = randomize_(Transformer(CFG), seed=1)
    fast = copy.deepcopy(dense)
    params_before = list(fast.parameters())
    onednn.use_for_training_(fast)
    assert list(fast.parameters()) == params_before  # the same tensors: optimizer and FSDP see no change
    assert isinstance(fast.layers[0].attn.wo, onednn.Linear)
    experts = [m for m in fast.modules() if isinstance(m, Experts)]
    assert experts and all(isinstance(m, onednn.TrainingExperts) for m in experts)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    for m in (dense, fast):
        F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    for (name, p), q in zip(dense.named_parameters(), fast.parameters()):
        assert q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_packed_model_matches_dense_and_round_trips_its_state_dict() -> None:
    dense = randomize_(Transformer(CFG), seed=3).eval()
    packed = copy.deepcopy(dense)
    onednn.pack_for_inference_(packed)
    attn = packed.layers[0].attn
    assert isinstance(attn.wo, PackedLinear) and isinstance(packed.head, PackedLinear)
    assert not isinstance(attn.wkv_b, PackedLinear)  # the absorbed decode reads it per head
    assert isinstance(packed.layers[1].ffn.experts, PackedExperts)
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = dense(ids)
        assert (packed(ids) - want).abs().max() < 1e-4
        ref = packed.layers[1].ffn(torch.randn(1, 5, CFG.hidden_size), reference=True)
        assert ref.shape == (1, 5, CFG.hidden_size)  # the loop reference runs on packed experts too
    state = dense.state_dict()
    assert packed.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in packed.state_dict().items())

    other = randomize_(Transformer(CFG), seed=9).eval()
    onednn.pack_for_inference_(other)
    other.load_state_dict(state)  # repacks: update_weights relies on this
    with torch.no_grad():
        assert (other(ids) - want).abs().max() < 1e-4
    bad = {**state, "head.weight": state["head.weight"][:-1]}
    with pytest.raises(RuntimeError, match="size mismatch for head.weight"):
        other.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key.*layers.1.ffn.experts.w13"):
        other.load_state_dict({k: v for k, v in state.items() if k != "layers.1.ffn.experts.w13"})
    with pytest.raises(RuntimeError, match="inference only"):
        packed(ids)  # autograd on


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(2, CFG.vocab_size, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 40, (n,), generator=g)]


def test_engine_with_packed_weights_gives_the_torch_engines_tokens() -> None:
    model = randomize_(Transformer(CFG), seed=21).eval()
    prompts = _prompts(12)
    want = [o.outputs[0].token_ids for o in LLM(model, max_cache_tokens=4096, gemm="torch").generate(prompts, GREEDY)]
    llm = LLM(copy.deepcopy(model), max_cache_tokens=4096, gemm="onednn")
    assert isinstance(llm.model.head, PackedLinear)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want
    alone = llm.generate([prompts[4]], GREEDY)[0].outputs[0].token_ids
    assert alone == want[4]
    # update_weights repacks: new weights give the new model's tokens
    new = randomize_(Transformer(CFG), seed=22).eval()
    llm.update_weights(new.state_dict())
    fresh = LLM(new, max_cache_tokens=4096, gemm="torch").generate(prompts[:3], GREEDY)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[:3], GREEDY)] == [o.outputs[0].token_ids
                                                                                  for o in fresh]


def test_engine_packs_only_what_it_loads_and_rejects_bad_choices(tmp_path: Path) -> None:
    model = randomize_(Transformer(CFG), seed=5).eval()
    assert not isinstance(LLM(model, max_cache_tokens=512).model.head, PackedLinear)  # a caller's model: untouched
    from dsv2 import save

    save(model, tmp_path)
    assert isinstance(LLM(tmp_path, max_cache_tokens=512).model.head, PackedLinear)
    assert not isinstance(LLM(tmp_path, max_cache_tokens=512, gemm="torch").model.head, PackedLinear)
    with pytest.raises(ValueError, match="compile=True and gemm='onednn' are alternatives"):
        LLM(tmp_path, max_cache_tokens=512, gemm="onednn", compile=True)
    with pytest.raises(ValueError, match="gemm must be one of .*, got 'mkl'"):
        LLM(tmp_path, max_cache_tokens=512, gemm="mkl")


def test_training_runs_agree_across_gemm_libraries(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, steps=3)
    runs = {}
    for gemm in ("onednn", "torch"):
        out = tmp_path / gemm
        train(TrainConfig.from_toml(recipe, [f"train.out_dir={out}", f"train.gemm={gemm}"]))
        runs[gemm] = read_metrics(out / "metrics.jsonl")
    for a, b in zip(runs["onednn"], runs["torch"]):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], abs=1e-4)
    with pytest.raises(ValueError, match="'train.gemm'"):
        TrainConfig.from_toml(recipe, ["train.gemm=mkl"])
