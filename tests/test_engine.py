"""The inference engine: greedy parity with transformers' generate, batch invariance, preemption, prefix
caching, fp8 cache, stop handling, and the allocator's invariants under random load."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from dsv2 import ModelConfig, Transformer, save
from dsv2.infer import LLM, EngineDeadError, SamplingParams
from tests.conftest import randomize_, small_config

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
CFG = small_config(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0)


TINY = small_config(hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, vocab_size=64, rope_scaling=None)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize_(Transformer(CFG), seed=21).eval()


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    """A model whose step costs a millisecond, for property tests that run thousands of steps."""
    return randomize_(Transformer(TINY), seed=5).eval()


def _prompts(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, CFG.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _tokens(outputs) -> list[list[int]]:  # noqa: ANN001
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers_generate(tmp_path: Path) -> None:
    """8 prompts of different lengths submitted together, 64 new tokens each, fp32."""
    cfg = small_config(q_lora_rank=None, eos_token_id=None, bos_token_id=None)
    ref = randomize_(DeepseekV2ForCausalLM(DeepseekV2Config(**cfg.to_hf())), seed=8).eval()
    ref.save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype=torch.float32, max_cache_tokens=2048)
    prompts = [p for p in _prompts(8, seed=3, hi=60)]
    ours = _tokens(llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0)))
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_greedy_matches_naive_forward_and_is_batch_invariant(model: Transformer) -> None:
    prompts = _prompts(16, seed=1)
    together = _tokens(LLM(model, max_cache_tokens=4096).generate(prompts, GREEDY))
    for i in (0, 7, 15):
        alone = _tokens(LLM(model, max_cache_tokens=4096).generate([prompts[i]], GREEDY))[0]
        assert alone == together[i]
    ids = list(prompts[3])
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert together[3] == ids[len(prompts[3]):]


def test_seeded_sampling_is_batch_invariant(model: Transformer) -> None:
    prompts = _prompts(12, seed=2)
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=100 + i) for i in range(12)]
    together = _tokens(LLM(model, max_cache_tokens=4096).generate(prompts, params))
    alone = _tokens(LLM(model, max_cache_tokens=4096).generate([prompts[5]], params[5]))[0]
    assert alone == together[5]
    again = _tokens(LLM(model, max_cache_tokens=4096).generate(prompts[:6], params[:6]))
    assert again == together[:6]
    assert len({tuple(t) for t in together}) > 1
    unseeded = _tokens(LLM(model).generate([prompts[0]] * 4, SamplingParams(max_tokens=16, temperature=1.0)))
    assert len({tuple(t) for t in unseeded}) > 1  # independent draws without a seed


def test_preemption_does_not_change_greedy_outputs(model: Transformer) -> None:
    prompts = _prompts(10, seed=4, lo=20, hi=40)
    roomy = _tokens(LLM(model, max_cache_tokens=4096).generate(prompts, GREEDY))
    tight = LLM(model, max_cache_tokens=160, block_size=16)  # 10 blocks: two or three sequences at a time
    assert _tokens(tight.generate(prompts, GREEDY)) == roomy
    assert tight.stats()["preemptions"] > 0
    assert tight.stats()["cache_blocks_used"] == 0


def test_chunked_prefill_does_not_change_outputs(model: Transformer) -> None:
    prompts = _prompts(6, seed=5, lo=30, hi=70)
    whole = _tokens(LLM(model, max_cache_tokens=4096).generate(prompts, GREEDY))
    chunked = _tokens(LLM(model, max_cache_tokens=4096, max_num_batched_tokens=24).generate(prompts, GREEDY))
    assert chunked == whole


def test_prefix_cache_hits_do_not_change_outputs(model: Transformer) -> None:
    shared = _prompts(1, seed=6, lo=50, hi=50)[0]
    prompts = [shared + tail for tail in _prompts(5, seed=7, lo=1, hi=10)]
    cold = _tokens(LLM(model, max_cache_tokens=4096, prefix_caching=False).generate(prompts, GREEDY))
    llm = LLM(model, max_cache_tokens=4096)
    first = _tokens(llm.generate(prompts[:1], GREEDY))
    rest = _tokens(llm.generate(prompts[1:], GREEDY))
    assert first + rest == cold
    assert llm.stats()["prefix_cache_hit_blocks"] >= 4 * (50 // 16)
    assert _tokens(llm.generate(prompts, GREEDY)) == cold  # fully warm, including the identical first prompt


def test_fp8_cache_agrees_with_model_dtype_cache(model: Transformer) -> None:
    """Teacher-forced: along greedy continuations made with a bf16 cache, the fp8 cache picks the same next
    token at most positions. (Free-running comparisons drift apart after the first difference, and a random
    model amplifies differences far more than a trained one.)"""
    m16 = randomize_(Transformer(CFG), seed=21).eval().to(torch.bfloat16)
    prompts = _prompts(6, seed=9)
    bf16 = LLM(m16, max_cache_tokens=4096)
    conts = _tokens(bf16.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)))
    fp8 = LLM(m16, max_cache_tokens=8192, cache_dtype="fp8")
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    hits = total = 0
    for prompt, cont in zip(prompts, conts):
        seq = prompt + cont
        prefixes = [seq[:k] for k in range(len(prompt), len(seq))]
        picks = [t[0] for t in _tokens(fp8.generate(prefixes, one))]
        hits += sum(a == b for a, b in zip(picks, cont))
        total += len(cont)
    assert hits / total >= 0.85, hits / total
    assert fp8.cache_bytes_per_token == CFG.num_hidden_layers * ((32 + 8) * 1 + 8)  # values + two fp32 scales
    assert bf16.cache_bytes_per_token == CFG.kv_cache_bytes_per_token(torch.bfloat16)


def test_n_logprobs_and_finish_reasons(model: Transformer) -> None:
    llm = LLM(model, max_cache_tokens=4096)
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.8, seed=1, n=3, logprobs=2))
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids) and o.finish_reason in ("length", "stop")
        for lp in o.logprobs:
            assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] and lp.logprob <= 0
    [greedy] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, logprobs=1, ignore_eos=True))
    lp = greedy.outputs[0].logprobs
    assert all(t.token_id == t.top[0][0] for t in lp)  # greedy picks the most likely token
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([[5, 6, 7]]))[0, -1], -1)
    assert abs(lp[0].logprob - ref.max().item()) < 1e-4
    stop_tok = greedy.outputs[0].token_ids[2]
    [stopped] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[stop_tok]))
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_tok
    assert stopped.outputs[0].token_ids[-1] == stop_tok


def test_abort_frees_blocks_at_once(model: Transformer) -> None:
    llm = LLM(model, max_cache_tokens=1024)
    rid = llm.add_request(list(range(2, 60)), SamplingParams(max_tokens=100, temperature=0))
    llm.step()
    assert llm.stats()["cache_blocks_used"] > 0
    out = llm.abort(rid)
    assert out.outputs[0].finish_reason == "abort" and llm.stats()["cache_blocks_used"] == 0
    assert not llm.has_unfinished() and llm.abort(rid) is None


def test_random_requests_with_aborts_leave_every_block_free(model: Transformer) -> None:
    """1,000 requests of random sizes arriving over time, 30% of steps abort one, a cache small enough to
    preempt: the allocator's invariants hold after every step and everything is free at the end."""
    rng = random.Random(0)
    llm = LLM(model, max_cache_tokens=480, block_size=8, max_num_seqs=16, max_num_batched_tokens=96)
    live: list[str] = []
    submitted = 0
    while submitted < 1000 or llm.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if submitted < 1000:
                prompt = [rng.randrange(2, CFG.vocab_size) for _ in range(rng.randint(1, 30))]
                live.append(llm.add_request(prompt, SamplingParams(max_tokens=rng.randint(1, 12), temperature=1.0,
                                                                   n=rng.choice([1, 1, 2]))))
                submitted += 1
        if live and rng.random() < 0.3:
            llm.abort(live.pop(rng.randrange(len(live))))
        for out in llm.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        llm.allocator.check_invariants()
    assert llm.stats()["cache_blocks_used"] == 0
    assert all(c == 0 for c in llm.allocator.ref_counts)


def test_request_errors(model: Transformer) -> None:
    llm = LLM(model, max_cache_tokens=256)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([1, CFG.vocab_size])
    assert llm.max_model_len == 256  # capped to what the cache holds
    with pytest.raises(ValueError, match="prompt of 298 tokens leaves no room for output in a context of 256"):
        llm.add_request(list(range(2, 300)))
    with pytest.raises(ValueError, match="leaves no room for output in a context of 2560"):
        LLM(model, max_cache_tokens=4096).add_request([2] * CFG.max_position_embeddings)
    with pytest.raises(ValueError, match="max_model_len=3000 must be in \\[1, 2560\\]"):
        LLM(model, max_cache_tokens=256, max_model_len=3000)
    with pytest.raises(ValueError, match="3 prompts but 2 SamplingParams"):
        llm.generate([[2], [3], [4]], [GREEDY, GREEDY])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"),
     ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
     ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"stop": [""]}, "stop"), ({"n": 0}, "n"),
     ({"logprobs": 21}, "logprobs"), ({"seed": 1.5}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
     ({"max_tokens": True}, "max_tokens")],
)
def test_sampling_params_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{name} must be"):
        SamplingParams(**kwargs)


def test_checkpoint_directory_round_trip(model: Transformer, tmp_path: Path) -> None:
    save(model, tmp_path)
    llm = LLM(tmp_path, dtype="float32", max_cache_tokens=512)
    assert _tokens(llm.generate([[4, 5, 6]], GREEDY)) == _tokens(LLM(model, max_cache_tokens=512).generate([[4, 5, 6]],
                                                                                                            GREEDY))
    assert llm.cache_bytes_per_token == ModelConfig.kv_cache_bytes_per_token(CFG, torch.float32)


def test_gemv_layout_changes_storage_not_values() -> None:
    from dsv2.infer.runner import transpose_weights_for_gemv_

    model = randomize_(Transformer(CFG), seed=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        transpose_weights_for_gemv_(model)
        got = model(ids)
    assert not model.layers[0].attn.wo.weight.is_contiguous()
    assert model.layers[0].attn.wo.weight.t().is_contiguous()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (got - ref).abs().max().item() < 1e-5


def test_compiled_decode_matches_eager(model: Transformer) -> None:
    """torch.compile'd decode steps give the eager engine's greedy tokens: batch 1 (experts fused in the graph),
    2 (matrix-vector experts in the opaque op) and 4 (grouped experts in the op, 4 x 3 > 8 assignments)."""
    eager, compiled = LLM(model, max_cache_tokens=4096), LLM(model, max_cache_tokens=4096, compile=True)
    compiled.warm_up()  # compiles both graphs: one decode step of batch 1, one of batch 2
    assert compiled.runner.compiled_steps == 2 and compiled.stats()["cache_blocks_used"] == 0
    for prompts in (_prompts(1, seed=3), _prompts(2, seed=4), _prompts(4, seed=6)):
        assert _tokens(compiled.generate(prompts, GREEDY)) == _tokens(eager.generate(prompts, GREEDY))
    # every step after each batch's prefill went through the compiled graph, none fell back to eager
    assert compiled.runner.compiled_steps == 2 + 3 * (GREEDY.max_tokens - 1)
    assert eager.runner.compiled_steps == 0


def test_failed_compilation_falls_back_to_eager(model: Transformer) -> None:
    eager = LLM(model, max_cache_tokens=4096)
    llm = LLM(model, max_cache_tokens=4096, compile=True)

    def no_compiler(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 -- how dynamo reports inductor's failures
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")

    llm.runner._compiled = no_compiler
    prompts = _prompts(1, seed=5)
    with pytest.warns(UserWarning, match="compiled decode failed .*no C\\+\\+ compiler.*decoding eagerly"):
        out = llm.generate(prompts, GREEDY)
    assert _tokens(out) == _tokens(eager.generate(prompts, GREEDY))
    assert llm.runner._compiled is None and llm.runner.compiled_steps == 0


def test_a_bug_in_the_compiled_graph_is_not_taken_for_a_missing_compiler(model: Transformer) -> None:
    """Only the compiler's own errors switch compiled decode off; any other error fails that step's requests."""
    llm = LLM(model, max_cache_tokens=4096, compile=True)

    def buggy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("shape mismatch in a kernel")

    llm.runner._compiled = buggy
    [out] = llm.generate(_prompts(1, seed=5), GREEDY)
    assert out.outputs[0].finish_reason == "error" and "RuntimeError" in out.error
    assert llm.runner.compiles and llm.stats()["cache_blocks_used"] == 0


def test_a_lone_request_longer_than_the_cache_finishes_instead_of_hanging(model: Transformer) -> None:
    """Before: the sequence outgrew a 64-token cache, preempted itself and was never readmitted (step() returned
    [] forever). Now max_model_len is capped to the cache, and the request ends with "length" at 64 tokens."""
    llm = LLM(model, max_cache_tokens=64)
    assert llm.max_model_len == 64
    rid = llm.add_request(list(range(2, 12)), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    for _ in range(100):
        done = [o for o in llm.step() if o.finished]
        if done:
            break
    else:
        raise AssertionError("the request did not finish in 100 steps")
    assert done[0].request_id == rid and done[0].outputs[0].finish_reason == "length"
    assert len(done[0].outputs[0].token_ids) == 64 - 10 and llm.stats()["cache_blocks_used"] == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cache_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 4, 8]), budget=st.integers(1, 40),
       max_seqs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_every_request_finishes_whatever_the_cache_size(tiny: Transformer, cache_blocks: int, block_size: int,
                                                        budget: int, max_seqs: int, seed: int) -> None:
    """Random cache sizes x random requests (any length the engine accepts, n up to 3) x random aborts: every
    request ends with stop/length/abort within a bounded number of steps, and nothing stays referenced."""
    rng = random.Random(seed)
    llm = LLM(tiny, max_cache_tokens=max(2, cache_blocks * block_size), block_size=block_size, max_num_seqs=max_seqs,
              max_num_batched_tokens=budget)
    live, finished, submitted, steps = set(), {}, 0, 0
    while submitted < 12 or llm.has_unfinished():
        if submitted < 12 and rng.random() < 0.5:
            prompt = [rng.randrange(2, TINY.vocab_size) for _ in range(rng.randint(1, llm.max_model_len - 1))]
            params = SamplingParams(max_tokens=rng.randint(1, 3 * llm.max_model_len), temperature=rng.choice([0, 1]),
                                    ignore_eos=rng.random() < 0.5, n=rng.choice([1, 1, 3]))
            live.add(llm.add_request(prompt, params))
            submitted += 1
        if live and rng.random() < 0.1:
            rid = rng.choice(sorted(live))
            finished[rid] = llm.abort(rid)
            live.discard(rid)
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out
                live.discard(out.request_id)
        llm.allocator.check_invariants()
        steps += 1
        assert steps < 20_000, "the engine stopped making progress"
    assert len(finished) == submitted and not live
    for out in finished.values():
        for o in out.outputs:
            assert o.finish_reason in ("stop", "length", "abort")
            assert o.finish_reason == "abort" or len(out.prompt_token_ids) + len(o.token_ids) <= llm.max_model_len
    assert llm.stats()["cache_blocks_used"] == 0 and all(c == 0 for c in llm.allocator.ref_counts)


def _fail_on_calls(llm: LLM, calls: set[int]) -> None:
    """Make the model raise on the given calls of the runner (1-based), as a bad kernel or a bad input would."""
    run, count = llm.runner.run, [0]

    def faulty(batch):  # noqa: ANN001, ANN202
        count[0] += 1
        if count[0] in calls:
            raise RuntimeError(f"injected fault on call {count[0]}")
        return run(batch)

    llm.runner.run = faulty


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model: Transformer) -> None:
    llm = LLM(model, max_cache_tokens=1024, max_num_seqs=2)
    first = [llm.add_request(p, GREEDY) for p in _prompts(2, seed=7)]  # run together in steps 1..
    later = [llm.add_request(p, GREEDY) for p in _prompts(2, seed=8)]  # wait for a free slot
    _fail_on_calls(llm, {3})
    outs = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                outs[out.request_id] = out
        llm.allocator.check_invariants()
    for rid in first:
        assert outs[rid].outputs[0].finish_reason == "error"
        assert outs[rid].error == "RuntimeError while computing this request"
        assert len(outs[rid].outputs[0].token_ids) == 2  # sampled by steps 1 (prefill) and 2, before the fault
    ref = LLM(model, max_cache_tokens=1024).generate(_prompts(2, seed=8), GREEDY)
    assert [outs[rid].outputs[0].token_ids for rid in later] == _tokens(ref)
    assert llm.stats()["cache_blocks_used"] == 0 and llm.stats()["failed_steps"] == 1


def test_an_engine_whose_every_step_fails_is_declared_dead(model: Transformer) -> None:
    llm = LLM(model, max_cache_tokens=1024)
    _fail_on_calls(llm, {1, 2, 3, 4})
    for p in _prompts(3, seed=9):
        llm.add_request(p, GREEDY)
    assert [o.outputs[0].finish_reason for o in llm.step()] == ["error"] * 3  # one failure: contained
    for p in _prompts(3, seed=10):
        llm.add_request(p, GREEDY)
    llm.step()
    for p in _prompts(1, seed=11):
        llm.add_request(p, GREEDY)
    with pytest.raises(EngineDeadError, match="3 engine steps failed in a row; last: RuntimeError: injected"):
        llm.step()


def test_bad_engine_options_are_clear_errors(model: Transformer) -> None:
    with pytest.raises(ValueError, match="cache dtype 'int4' is not supported"):
        LLM(model, max_cache_tokens=256, cache_dtype="int4")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        LLM(model, max_cache_tokens=256, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available"):
            LLM(model, max_cache_tokens=256, device="cuda")
    with torch.device("meta"):
        on_meta = Transformer(TINY)
    with pytest.raises(ValueError, match="the model passed in is on meta"):
        LLM(on_meta, max_cache_tokens=256, device="cpu")


def test_the_engine_creates_no_tensor_on_the_default_device(model: Transformer) -> None:
    """Every tensor of a step is made on the engine's device. With the default device set to meta, one made
    without a device would be a meta tensor, and mixing it with the model's would raise (or give no values).
    The engine takes its device from the model passed in."""
    llm = LLM(model, max_cache_tokens=512)
    assert llm.cache.layers[0].device == next(model.parameters()).device
    prompts = _prompts(4, seed=3)
    params = [GREEDY, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=20, seed=4,
                                     presence_penalty=0.5, repetition_penalty=1.2, logprobs=2)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, [params[i % 2] for i in range(4)])]
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        outs = llm.generate(prompts, [params[i % 2] for i in range(4)])
    finally:
        torch.set_default_device(previous)
    assert [o.error for o in outs] == [None] * 4
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("cache_dtype", [None, "fp8"])
def test_decode_kernels_give_the_torch_paths_tokens(model: Transformer, cache_dtype: str | None) -> None:
    """The paged decode kernels (dsv2.kernels.native's CPU one; dsv2.kernels.gpu.mla_decode, under Triton's
    interpreter here) in the engine: ragged contexts over shuffled blocks, decodes beside prefill chunks, the same
    greedy tokens as the gather path."""
    from dsv2.infer.runner import ModelRunner

    prompts = _prompts(5, seed=11, lo=3, hi=30)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = []
    for attention in ("torch", "native", "triton"):
        llm = LLM(model, max_cache_tokens=512, block_size=4, cache_dtype=cache_dtype, max_num_batched_tokens=24)
        llm.runner = ModelRunner(llm.model, llm.cache, decode_attention=attention)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1] == outs[2]
    with pytest.raises(ValueError, match="decode attention 'flash'"):
        ModelRunner(model, llm.cache, decode_attention="flash")


def test_decode_kernel_choice() -> None:
    """"auto" takes dsv2's CPU kernel where it runs and reads the cache, torch's path otherwise; asking for the
    native kernel where it cannot run says why."""
    from dsv2.infer.runner import decode_kernel_for
    from dsv2.kernels import native

    cpu = torch.device("cpu")
    assert decode_kernel_for("torch", cpu, torch.float32) is None
    assert decode_kernel_for("auto", cpu, torch.float16) is None
    with pytest.raises(ValueError, match="'native': it does not read torch.float16 caches"):
        decode_kernel_for("native", cpu, torch.float16)
    with pytest.raises(ValueError, match="'native': it runs on the CPU, the model is on cuda"):
        decode_kernel_for("native", torch.device("cuda"), torch.float32)
    if native.available():
        assert decode_kernel_for("auto", cpu, torch.bfloat16) is native.mla_decode


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [None, "fp8"])
def test_engine_on_cuda_gives_the_cpu_engines_tokens(model: Transformer, cache_dtype: str | None) -> None:
    """The whole engine on the GPU (Triton decode attention, the cache and every step's tensors on cuda) against
    the CPU engine on the same fp32 weights."""
    import copy

    prompts = _prompts(6, seed=5, lo=3, hi=40)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = []
    for m in (model, copy.deepcopy(model).cuda()):
        llm = LLM(m, max_cache_tokens=1024, cache_dtype=cache_dtype)
        assert llm.cache.layers[0].device.type == next(m.parameters()).device.type
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]


def test_triton_experts_give_the_engine_the_same_tokens(model: Transformer) -> None:
    """The grouped-GEMM experts (under Triton's interpreter here) swapped into a copy of the model: same greedy
    tokens from prefill chunks and batched decodes, same parameters, and training still takes Experts' path."""
    import copy

    from dsv2.kernels.gpu.experts import TritonExperts, use_triton_experts_

    triton_model = copy.deepcopy(model)
    assert use_triton_experts_(triton_model) == model.cfg.num_moe_layers
    assert triton_model.state_dict().keys() == model.state_dict().keys()
    prompts = _prompts(4, seed=8, lo=3, hi=20)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = [[o.outputs[0].token_ids for o in LLM(m, max_cache_tokens=512).generate(prompts, params)]
            for m in (model, triton_model)]
    assert outs[0] == outs[1]
    experts = next(m for m in triton_model.modules() if isinstance(m, TritonExperts))
    x = torch.randn(3, model.cfg.hidden_size, requires_grad=True)
    routing = triton_model.layers[1].ffn.gate(x)
    experts(x, routing).sum().backward()  # the autograd path: fused_moe has no backward
    assert experts.w13.grad is not None
