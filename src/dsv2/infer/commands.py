"""`dsv2 generate` and `dsv2 chat`: the engine from a terminal, streaming tokens as they come."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from dsv2.model import onednn


def add_commands(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="complete a prompt with a model, streaming the output")
    _model_args(gen)
    gen.add_argument("--prompt", required=True, help="the text to complete")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    _sampling_args(gen)
    gen.set_defaults(func=run_generate)

    chat = sub.add_parser("chat", help="talk to a model in the terminal (/reset starts over, /exit quits)")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    _sampling_args(chat)
    chat.set_defaults(func=run_chat)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json, *.safetensors, tokenizer; default: the shipped dsv2-tiny)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-cache-tokens", type=int, default=None)
    p.add_argument("--cache-dtype", default=None, help="'fp8' to store the latent cache in fp8 e4m3")
    add_compile_arg(p)


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """The engine's speed options, shared by generate, chat and serve."""
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through a torch.compile'd model (faster per token; the first "
                        "decodes wait for compilation, about a minute for a 100M-parameter model on CPU)")
    p.add_argument("--gemm", choices=onednn.CHOICES, default="auto",
                   help="fp32 products: 'onednn' with weights packed once, 'torch' (F.linear), 'auto' = oneDNN on "
                        "x86 CPUs unless --compile")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 for greedy (default: generation_config.json's, else 1.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="number of completions (generate only)")


def _generation_defaults(model_dir: Path) -> dict[str, float]:
    """The checkpoint's own sampling defaults (DeepSeek-V2 ships temperature 0.3, top_p 0.95)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    return {k: float(cfg[k]) for k in ("temperature", "top_p") if k in cfg}


def _params(args: argparse.Namespace, n: int = 1) -> Any:  # noqa: ANN401 (SamplingParams, imported lazily)
    from dsv2.infer import SamplingParams

    defaults = _generation_defaults(_model_dir(args))
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature if args.temperature is not None else defaults.get("temperature", 1.0),
        top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop), seed=args.seed, n=n,
    )


def _model_dir(args: argparse.Namespace) -> Path:
    from dsv2.default_model import default_model_dir

    return Path(args.model) if args.model else default_model_dir()


def _load(args: argparse.Namespace) -> Any:  # noqa: ANN401
    model_dir = _model_dir(args)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: {model_dir} is not a checkpoint directory (no config.json)")
    if not (model_dir / "tokenizer.json").is_file():
        raise SystemExit(f"error: {model_dir} has no tokenizer.json; generate and chat need the model's tokenizer "
                         "(copy tokenizer.json and tokenizer_config.json next to the weights)")
    from dsv2.infer import LLM

    if args.compile:  # stderr, so that piped output stays the model's text only
        print("dsv2: decoding is compiled on first use; the first tokens can take a minute", file=sys.stderr)
    return LLM(model_dir, dtype=args.dtype, device=args.device, max_cache_tokens=args.max_cache_tokens,
               cache_dtype=args.cache_dtype, compile=args.compile, gemm=args.gemm)


def _stream(llm: Any, prompt: str | list[int], params: Any, out: TextIO) -> list[Any]:  # noqa: ANN401
    """Run one request, printing completion 0's new text as it arrives; returns the final completions."""
    rid = llm.add_request(prompt, params)
    shown = 0
    while True:
        for result in llm.step():
            if result.request_id != rid:
                continue
            text = result.outputs[0].text
            out.write(text[shown:])
            out.flush()
            shown = len(text)
            if result.finished:
                return result.outputs


def run_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _params(args, n=args.n)
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    outputs = _stream(llm, prompt, params, sys.stdout)
    sys.stdout.write("\n")
    for extra in outputs[1:]:
        sys.stdout.write(f"--- completion {extra.index}\n{extra.text}\n")
    return 0


def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    llm = _load(args)
    params = _params(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    out.write("dsv2 chat: type a message; /reset starts over, /exit quits.\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        [reply] = _stream(llm, prompt, params, out)[:1]
        out.write("\n")
        messages.append({"role": "assistant", "content": reply.text.strip()})
