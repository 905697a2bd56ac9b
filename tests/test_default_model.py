"""The model shipped in the package: complete, loadable, and answering arithmetic through `dsv2 serve`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai

from dsv2 import LLM, SamplingParams, load
from dsv2.default_model import DEFAULT_MODEL_NAME, default_model_dir
from dsv2.infer.sampling import generation_defaults
from dsv2.train.tasks import exact_match, problems
from tests.test_server import _start, _stop

# Held-out problems the server is asked; the shipped eval.json measured the model on 500 of the same split.
QUESTIONS = problems("test", 24, seed=1)
MIN_CORRECT = 8  # a third; the shipped model scores 60% on the test split (eval.json), a model without arithmetic ~0%


def test_shipped_checkpoint_is_complete_and_small() -> None:
    d = default_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "eval.json"):
        assert (d / name).is_file(), name
    assert sum(f.stat().st_size for f in d.iterdir()) < 64 * 2**20  # "tens of MB at most"
    cfg = load(d).cfg
    # A DeepSeek-V2 in miniature: latent attention, a dense first layer, routed and shared experts.
    assert cfg.kv_lora_rank > 0 and cfg.first_k_dense_replace >= 1
    assert cfg.n_routed_experts > cfg.num_experts_per_tok and cfg.n_shared_experts >= 1
    result = json.loads((d / "eval.json").read_text())
    assert result["arithmetic"]["n"] >= 500 and result["arithmetic"]["split"] == "test"
    # dsv2 chat / generate answer greedily by default, as the model was evaluated.
    assert generation_defaults(d) == {"temperature": 0.0}


def test_llm_without_a_path_loads_the_shipped_model() -> None:
    llm = LLM(max_cache_tokens=1024)
    out = llm.chat([{"role": "user", "content": QUESTIONS[0].question}], SamplingParams(max_tokens=64, temperature=0))
    assert "The answer is" in out[0].outputs[0].text


def test_serve_without_model_answers_arithmetic() -> None:
    proc, port = _start(None)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]

        def ask(question: str) -> str:
            resp = client.chat.completions.create(model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=64,
                                                  messages=[{"role": "user", "content": question}])
            return resp.choices[0].message.content

        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent requests, batched by the engine
            answers = list(pool.map(ask, [p.question for p in QUESTIONS]))
    finally:
        _stop(proc)
    correct = exact_match(answers, [p.answer for p in QUESTIONS])
    assert sum(correct) >= MIN_CORRECT, list(zip([p.question for p in QUESTIONS], answers))
