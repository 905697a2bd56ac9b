"""The command line's answers to user mistakes and Ctrl-C: one `error:` line and a non-zero exit, never a traceback;
a training recipe's values checked against their declared types; chat that outlives its context."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv2.cli import build_parser, main
from dsv2.default_model import default_model_dir
from dsv2.infer import LLM
from dsv2.infer.commands import run_chat
from dsv2.tokenizer import Tokenizer
from dsv2.train.config import DataConfig, TrainConfig
from tests.test_train_run import write_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = str(ROOT / "recipes" / "tiny.toml")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DSV2_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "dsv2.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def error_lines(stderr: str) -> list[str]:
    """`error: ...` (ours) or `dsv2 CMD: error: ...` (argparse's, after its usage lines)."""
    return [line for line in stderr.splitlines() if re.match(r"^(dsv2( \w+)?: )?error: ", line)]


def assert_one_error(stderr: str, returncode: int, contains: str) -> None:
    assert returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and contains in lines[0], stderr
    others = [line for line in stderr.splitlines() if line not in lines]
    if lines[0].startswith("error: "):  # ours: that line alone
        assert others == [], stderr
    else:  # argparse's: its usage (first line, then indented continuations) before the error line
        assert others[0].startswith("usage: dsv2 ") and all(line.startswith(" ") for line in others[1:]), stderr


def survives_ctrl_c(command: Any, *args: Any) -> Any:  # noqa: ANN401
    """command(*args), failing the test (not pytest's whole session, as a KeyboardInterrupt would) if Ctrl-C escapes."""
    try:
        return command(*args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command")


# ------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("option, value, contains", [
    ("--temperature", "-1", "--temperature: must be a number >= 0, got -1"),
    ("--max-tokens", "0", "--max-tokens: must be an integer >= 1, got 0"),
    ("--top-p", "0", "--top-p: must be a number in (0, 1], got 0"),
    ("--dtype", "float64x", "--dtype: invalid choice: 'float64x'"),
    ("--max-cache-tokens", "lots", "--max-cache-tokens: expected an integer, got 'lots'"),
])
def test_generate_rejects_bad_values_before_loading(option: str, value: str, contains: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--prompt", "hi", option, value])
    assert stop.value.code == 2
    assert_one_error(capsys.readouterr().err, 2, contains)


def test_a_bad_value_in_a_real_process_is_a_usage_error() -> None:
    done = run_cli("generate", "--prompt", "hi", "--temperature", "-1")
    assert done.returncode == 2
    assert_one_error(done.stderr, done.returncode, "dsv2 generate: error: argument --temperature: must be a number")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
def test_generate_on_a_missing_device_is_one_error_line() -> None:
    done = run_cli("generate", "--prompt", "hi", "--device", "cuda")  # depends on LLM raising a ValueError
    assert done.returncode == 2
    assert_one_error(done.stderr, done.returncode, "error: device 'cuda' is not available")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
@pytest.mark.parametrize("command", ["sft", "grpo", "eval"])
def test_training_and_eval_on_a_missing_device_are_one_error_line(command: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1"}], "answer": 2}\n' * 4)
    model = str(default_model_dir())
    args = {"sft": ["--model", model, "--data", str(data), "--out", str(tmp_path / "o")],
            "grpo": ["--model", model, "--data", str(data), "--out", str(tmp_path / "o"), "--prompts-per-step", "1"],
            "eval": ["--model", model, "--arith", "2"]}[command]
    try:  # the commands report a user error either by main's return code or by SystemExit("error: ...")
        code, err = main([command, *args, "--device", "cuda"]), capsys.readouterr().err
    except SystemExit as stop:
        code, err = 2, str(stop.code)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "device 'cuda' is not available" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_library_value_errors_are_one_error_line(capsys: pytest.CaptureFixture) -> None:
    # An unsupported cache dtype (LLM) and a prompt longer than the shipped model's context of 1024 (add_request).
    assert main(["generate", "--prompt", "hi", "--cache-dtype", "int4"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == err.splitlines() and len(err.splitlines()) == 1 and "int4" in err
    assert main(["generate", "--prompt", "hi " * 1500, "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt of ") and "context of 1024" in err and len(err.splitlines()) == 1


@pytest.fixture
def in_process_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dsv2 train` in this process: without its process-wide malloc settings (hardware.keep_freed_memory)."""
    monkeypatch.setenv("DSV2_MALLOC", "default")


def test_missing_paths_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          in_process_train: None) -> None:
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err == f"error: training config {tmp_path / 'none.toml'} does not exist\n"


def test_traceback_env_keeps_the_traceback(monkeypatch: pytest.MonkeyPatch, in_process_train: None) -> None:
    monkeypatch.setenv("DSV2_TRACEBACK", "1")
    with pytest.raises(ValueError, match="'train.steps': expected an integer, got 'abc'"):
        main(["train", "--config", TINY_RECIPE, "--train.steps=abc"])


def test_help_documents_the_traceback_switch() -> None:
    assert "DSV2_TRACEBACK=1" in build_parser().format_help()


def test_generate_ctrl_c_exits_130_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(self: LLM) -> list:
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "step", interrupted)
    assert survives_ctrl_c(main, ["generate", "--prompt", "hi", "--max-tokens", "4"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# ------------------------------------------------------------------------------------------ recipe types


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "config field 'train.steps': expected an integer, got 'abc'"),
    ("train.steps=2.5", "config field 'train.steps': expected an integer, got 2.5"),
    ("train.steps=true", "config field 'train.steps': expected an integer, got true"),
    ("train.progress=1", "config field 'train.progress': expected true or false, got 1"),
    ("optim.lr=fast", "config field 'optim.lr': expected a number, got 'fast'"),
    ("optim.lr=nan", "config field 'optim.lr': expected a number, got nan"),
    ("optim.decay_at=[0.5, 'x']", "config field 'optim.decay_at[1]': expected a number, got 'x'"),
    ("moe.n_devices=four", "config field 'moe.n_devices': expected an integer, got 'four'"),
    ("data.seq_len=[1]", "config field 'data.seq_len': expected an integer, got [1]"),
    ("data.paths=[\"a.txt\", 3]", "config field 'data.paths[1]': expected a string, got 3"),
    ("data.tokenizer=5", "config field 'data.tokenizer': expected a string, got 5"),
])
def test_recipe_values_are_checked_against_their_types(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_toml(TINY_RECIPE, [override])


def test_recipe_values_of_the_right_type_pass() -> None:
    cfg = TrainConfig.from_dict({"train": {"steps": 5, "batch_ramp_start": None, "progress": False},
                                 "optim": {"lr": 1, "decay_at": [1]}, "moe": {"n_devices": 2}})
    assert cfg.train.steps == 5 and cfg.train.batch_ramp_start is None and cfg.train.progress is False
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.decay_at == (1.0,)
    assert cfg.moe.n_devices == 2


def test_train_command_names_a_mistyped_override() -> None:
    done = run_cli("train", "--config", TINY_RECIPE, "--train.steps=abc")
    assert done.returncode == 2
    assert_one_error(done.stderr, done.returncode, "error: config field 'train.steps': expected an integer, got 'abc'")


def test_one_string_of_data_paths_is_one_path() -> None:
    cfg = TrainConfig.from_toml(TINY_RECIPE, ["data.paths=corpus.txt"])
    assert cfg.data.paths == ("corpus.txt",)
    assert TrainConfig.from_dict({"data": {"paths": "/"}}).data.paths == ("/",)  # never walked as "/" itself
    assert DataConfig(paths="a.txt").paths == ("a.txt",)


# ------------------------------------------------------------------------------------------ train runs


def test_resume_without_a_checkpoint_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    in_process_train: None) -> None:
    recipe = write_recipe(tmp_path, steps=3)
    out = tmp_path / "run"
    done = run_cli("train", "--config", str(recipe), f"--train.out_dir={out}", "--resume")
    assert done.returncode == 2
    assert_one_error(done.stderr, done.returncode,
                     f"error: no checkpoint to resume in {out / 'checkpoints'}; start without --resume")
    assert not out.exists()
    assert main(["train", "--config", str(recipe), f"--train.out_dir={out}", "--data.paths=nowhere.txt"]) == 2
    assert_one_error(capsys.readouterr().err, 2, "error: nowhere.txt: no such file or directory")
    assert not out.exists() and not (tmp_path / "nowhere.txt").exists()


def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, steps=500)  # far more steps than the test waits for
    out = tmp_path / "run"
    command = ["train", "--config", str(recipe), f"--train.out_dir={out}", "--train.checkpoint_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "dsv2.cli", *command], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    match = re.search(r"^interrupted at step (\d+); continue with: (.*)$", stderr, re.M)
    assert match, stderr
    step = int(match.group(1))
    assert match.group(2) == " ".join(["dsv2", *command, "--resume"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{step:08d}"]  # saved at the stop
    # The printed command resumes from there (cut short so that the test stays quick).
    again = run_cli(*match.group(2).split()[1:], f"--train.steps={step + 1}")
    assert again.returncode == 0, again.stderr
    assert f"resuming from {out / 'checkpoints' / f'step-{step:08d}'} (step {step})" in again.stdout


# ------------------------------------------------------------------------------------------ chat


def chat_args(*extra: str) -> Any:  # noqa: ANN401 (argparse.Namespace)
    return build_parser().parse_args(["chat", "--temperature", "0", *extra])


def test_chat_drops_the_oldest_turns_to_fit_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[list[int]] = []
    original = LLM.add_request
    monkeypatch.setattr(LLM, "add_request", lambda self, p, sp=None: prompts.append(p) or original(self, p, sp))
    long = " ".join(["tell me about the weather today"] * 40)  # ~370 tokens: two such turns fit, three do not
    stdin = io.StringIO(f"alpha {long}\nbravo {long}\ncharlie {long}\n{'x ' * 2000}\nshort\n/exit\n")
    out = io.StringIO()
    assert run_chat(chat_args("--system", "Be brief.", "--max-tokens", "8"), stdin, out) == 0
    text = out.getvalue()
    assert "[dropped the oldest turn to fit the context of 1024 tokens]" in text
    assert "[your message does not fit the context of 1024 tokens" in text
    assert len(prompts) == 4  # the oversized message was never sent, the conversation went on
    assert all(len(p) <= 1024 - 8 for p in prompts)
    tok = Tokenizer.from_dir(default_model_dir())
    third, last = tok.decode(prompts[2]), tok.decode(prompts[3])
    assert "Be brief." in third and "alpha" not in third and "bravo" in third and "charlie" in third
    assert "Be brief." in last and "bravo" in last and "short" in last and "x x x" not in last


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, aborted = {"n": 0, "done": 0}, []
    step, abort = LLM.step, LLM.abort

    def step_with_ctrl_c(self: LLM) -> list:
        calls["n"] += 1
        if calls["n"] == 3:  # a real SIGINT in the middle of the first reply's third step
            os.kill(os.getpid(), signal.SIGINT)
        outputs = step(self)
        calls["done"] += 1  # the step under way still completes: the engine is never left half-updated
        return outputs

    monkeypatch.setattr(LLM, "step", step_with_ctrl_c)
    monkeypatch.setattr(LLM, "abort", lambda self, rid: aborted.append(rid) or abort(self, rid))
    prompts: list[list[int]] = []
    original = LLM.add_request
    monkeypatch.setattr(LLM, "add_request", lambda self, p, sp=None: prompts.append(p) or original(self, p, sp))
    out = io.StringIO()
    args = chat_args("--max-tokens", "50", "--repetition-penalty", "1.3")
    assert survives_ctrl_c(run_chat, args, io.StringIO("Hello\nAnd then?\n/exit\n"), out) == 0
    assert aborted == ["0"] and calls["done"] == calls["n"]
    assert "[reply stopped; the partial reply stays in the conversation]" in out.getvalue()
    assert len(prompts) == 2 and prompts[1][: len(prompts[0])] == prompts[0]  # the second turn kept the first


def test_ctrl_c_raised_while_printing_stops_the_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        pressed = False

        def write(self, s: str) -> int:
            # The first piece of reply text: the user presses Ctrl-C while it prints.
            if not self.pressed and s.strip() and not s.startswith(("dsv2 chat", ">", "[")):
                self.pressed = True
                raise KeyboardInterrupt
            return super().write(s)

    out = Terminal()
    stdin = io.StringIO("Hello\nAgain\n/exit\n")
    assert survives_ctrl_c(run_chat, chat_args("--max-tokens", "20"), stdin, out) == 0
    assert out.getvalue().count("[reply stopped") == 1 and out.getvalue().count("> ") == 3


def test_ctrl_c_at_the_prompt_quits_cleanly() -> None:
    class Keyboard(io.StringIO):
        def readline(self, size: int | None = -1) -> str:
            raise KeyboardInterrupt

    assert survives_ctrl_c(run_chat, chat_args(), Keyboard(), io.StringIO()) == 0
