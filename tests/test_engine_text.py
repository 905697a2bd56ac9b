"""The engine with the real DeepSeek-V2 tokenizer: text prompts, stop strings, streaming, the chat template,
and the `dsv2 generate` / `dsv2 chat` commands."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch

from dsv2 import Transformer, save
from dsv2.cli import main
from dsv2.infer import LLM, SamplingParams
from dsv2.infer.commands import run_chat
from dsv2.tokenizer import Tokenizer, named_tokenizer_dir
from tests.conftest import randomize_, small_config

CFG = small_config(vocab_size=102400, bos_token_id=100000, eos_token_id=100001)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    save(randomize_(Transformer(CFG), seed=4), path)
    src = named_tokenizer_dir("deepseek-v2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> LLM:
    return LLM(ckpt, dtype=torch.float32, max_cache_tokens=4096)


def test_text_prompt_is_tokenized_with_bos(llm: LLM) -> None:
    [out] = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    tok = llm.tokenizer
    assert out.prompt_token_ids == tok.encode("The capital of France is") and out.prompt_token_ids[0] == tok.bos_id
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_stop_string_trims_output_and_streaming_never_retracts(llm: LLM) -> None:
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    [full] = llm.generate("Once upon a time", params)
    text = full.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    rid = llm.add_request("Once upon a time", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                             stop=[stop]))
    seen = []
    while llm.has_unfinished():
        seen += [o.outputs[0].text for o in llm.step() if o.request_id == rid]
    final = seen[-1]
    assert final == text[: text.find(stop)]
    assert all(final.startswith(s) for s in seen)  # a streamed prefix is never taken back
    assert all(stop not in s for s in seen)


def test_chat_uses_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    [out] = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))
    assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True)
    assert out.prompt_token_ids.count(llm.tokenizer.bos_id) == 1


def test_generate_command_streams_the_same_text(ckpt: Path, llm: LLM, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(ckpt), "--prompt", "Hello", "--max-tokens", "6", "--temperature", "0",
                 "--dtype", "float32"]) == 0
    [ref] = llm.generate("Hello", SamplingParams(max_tokens=6, temperature=0))
    assert capsys.readouterr().out == ref.outputs[0].text + "\n"


def test_chat_command_keeps_the_conversation(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv2.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", str(ckpt), "--dtype", "float32", "--max-cache-tokens", "2048",
                                      "--system", "Be brief.", "--max-tokens", "5", "--temperature", "0"])
    seen: list[list[int]] = []
    original = LLM.add_request
    monkeypatch.setattr(LLM, "add_request", lambda self, p, sp=None, rid=None: seen.append(p) or original(self, p, sp))
    out = io.StringIO()
    assert run_chat(args, io.StringIO("Hello\nWhat next?\n/exit\n"), out) == 0
    tok = Tokenizer.from_dir(ckpt)
    second = tok.decode(seen[1])
    assert second.startswith(tok.bos_token + "Be brief.\n\nUser: Hello\n\nAssistant:")
    assert second.endswith("User: What next?\n\nAssistant:") and tok.eos_token in second
    assert out.getvalue().count("> ") == 3


def test_commands_name_a_missing_tokenizer(tmp_path: Path) -> None:
    save(Transformer(small_config()), tmp_path)
    with pytest.raises(SystemExit, match="has no tokenizer.json"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["chat", "--model", str(tmp_path / "nowhere")])
