"""`dsv2 generate` and `dsv2 chat`: the engine from a terminal, streaming tokens as they come."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from dsv2.interrupt import stop_on_sigint
from dsv2.kernels import onednn
from dsv2.kernels.quant import METHODS as QUANT_METHODS

# The names the engine's dtype argument takes (checked here, so that a typo fails before the model loads).
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], Any]:
    """An argparse `type`: `kind` (int or float) within [low, high] (an open end excludes its bound), so that a bad
    value is one usage error naming the option before anything loads."""
    if low is not None and high is not None:
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what = f"{'<' if high_open else '<='} {high:g}"
    else:
        what = "(finite)"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:  # noqa: ANN401 (int or float)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {noun} {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


positive_int = number(int, 1)


def add_commands(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="complete a prompt with a model, streaming the output")
    _model_args(gen)
    gen.add_argument("--prompt", required=True, help="the text to complete")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    mode.add_argument("--suffix", default=None,
                      help="fill in the middle: the prompt is the text before the hole, this the text after it "
                           "(a model with FIM tokens, such as DeepSeek-Coder-V2)")
    _sampling_args(gen)
    gen.set_defaults(func=run_generate)

    chat = sub.add_parser("chat", help="talk to a model in the terminal (/reset starts over, /exit quits)")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    _sampling_args(chat)
    chat.set_defaults(func=run_chat)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json, *.safetensors, tokenizer) or a llama.cpp .gguf file (default: "
                        "the shipped dsv2-tiny)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-cache-tokens", type=positive_int, default=None)
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + output (default: the model's context, capped to what the cache holds)")
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
    p.add_argument("--quantization", choices=QUANT_METHODS, default=None,
                   help="weight-only int8 (one scale per row) or int4 (groups of 64) projections and experts, "
                        "quantized as the checkpoint loads (a `dsv2 quantize`d checkpoint needs no flag)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    # The same bounds as SamplingParams', so that a bad value fails here, before the model loads.
    p.add_argument("--max-tokens", type=positive_int, default=256)
    # Unset sampling options take the checkpoint's generation_config.json, then SamplingParams' defaults.
    p.add_argument("--temperature", type=number(float, 0), default=None,
                   help="0 for greedy (default: generation_config.json's, else 1.0)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=None, help="in (0, 1]")
    p.add_argument("--top-k", type=number(int, -1), default=None, help="0 (or -1): off")
    p.add_argument("--min-p", type=number(float, 0, 1), default=None)
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=None)
    p.add_argument("--presence-penalty", type=number(float, -2, 2), default=0.0)
    p.add_argument("--frequency-penalty", type=number(float, -2, 2), default=0.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=positive_int, default=1, help="number of completions (generate only)")


def _params(args: argparse.Namespace, llm: Any, n: int = 1) -> Any:  # noqa: ANN401 (lazily imported types)
    """The options given on the command line, over the checkpoint's generation defaults (llm.generation_defaults:
    DeepSeek-V2 ships temperature 0.3 and top_p 0.95, dsv2-tiny greedy)."""
    from dsv2.infer import SamplingParams

    given = {name: getattr(args, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
             if getattr(args, name) is not None}
    return SamplingParams(**{**llm.generation_defaults, **given}, max_tokens=args.max_tokens,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          stop=tuple(args.stop), seed=args.seed, n=n)


def _model_dir(args: argparse.Namespace) -> Path:
    from dsv2.default_model import default_model_dir

    return Path(args.model) if args.model else default_model_dir()


def _load(args: argparse.Namespace) -> Any:  # noqa: ANN401
    model_dir = _model_dir(args)
    if model_dir.is_file():
        pass  # a GGUF file: the engine reads it (and says if it is not one), tokenizer included
    elif not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: {model_dir} is not a checkpoint directory (no config.json) or a .gguf file")
    elif not (model_dir / "tokenizer.json").is_file():
        raise SystemExit(f"error: {model_dir} has no tokenizer.json; generate and chat need the model's tokenizer "
                         "(copy tokenizer.json and tokenizer_config.json next to the weights)")
    from dsv2.infer import LLM

    if args.compile:  # stderr, so that piped output stays the model's text only
        print("dsv2: decoding is compiled on first use; the first tokens can take a minute", file=sys.stderr)
    return LLM(model_dir, dtype=args.dtype, device=args.device, max_cache_tokens=args.max_cache_tokens,
               max_model_len=args.max_model_len,
               cache_dtype=args.cache_dtype, compile=args.compile, gemm=args.gemm,
               quantization=args.quantization)


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
    params = _params(args, llm, n=args.n)
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    elif args.suffix is not None:
        if not llm.tokenizer.supports_fim:
            raise SystemExit(f"error: --suffix: {_model_dir(args)}'s tokenizer has no fill-in-the-middle tokens")
        prompt = llm.tokenizer.fim_prompt(args.prompt, args.suffix)
    outputs = _stream(llm, prompt, params, sys.stdout)  # Ctrl-C: cli.main exits with 130
    sys.stdout.write("\n")
    for extra in outputs[1:]:
        sys.stdout.write(f"--- completion {extra.index}\n{extra.text}\n")
    return 0


def _stream_reply(llm: Any, prompt: list[int], params: Any, out: TextIO) -> tuple[str, bool]:  # noqa: ANN401
    """Stream one chat reply; returns (the text shown, whether Ctrl-C stopped it). A stopped reply is aborted in
    the engine, so its cache blocks are free for the next turn."""
    rid = llm.add_request(prompt, params)
    shown = ""
    with stop_on_sigint() as stop:  # the first Ctrl-C stops the reply after the step under way
        try:
            while not stop.requested:
                for result in llm.step():
                    if result.request_id != rid:
                        continue
                    text = result.outputs[0].text
                    out.write(text[len(shown):])
                    out.flush()
                    shown = text
                    if result.finished:
                        return shown, False
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised by the output stream itself
            pass
    llm.abort(rid)
    return shown, True


def _fit_context(llm: Any, messages: list[dict[str, str]], keep: int, params: Any, out: TextIO  # noqa: ANN401
                 ) -> tuple[list[int] | None, list[dict[str, str]]]:
    """The prompt for `messages`, dropping the oldest turns (never the first `keep`, the system message) until it
    leaves room for a reply in the model's context; (None, the messages before the newest) if even the newest
    user message alone does not fit. Returns the prompt and the messages it was made of."""
    n_ctx = llm.max_model_len
    # Room for a reply: max_tokens, but at most half the context, so that a long --max-tokens keeps some history.
    limit = n_ctx - min(params.max_tokens, n_ctx // 2)
    given, messages = messages, list(messages)
    dropped = 0
    while True:
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if len(prompt) <= limit:
            break
        if len(messages) - keep <= 1:
            out.write(f"[your message does not fit the context of {n_ctx} tokens with room for a reply "
                      f"({len(prompt)} tokens, the limit is {limit}); it was dropped, try a shorter one]\n")
            return None, given[:-1]  # the conversation as it was, older turns included
        # One turn: a user message and the reply after it (empty or missing if that reply was stopped).
        end = keep + 1
        while end < len(messages) - 1 and messages[end]["role"] != "user":
            end += 1
        del messages[keep:end]
        dropped += 1
    if dropped:
        turns = "oldest turn" if dropped == 1 else f"{dropped} oldest turns"
        out.write(f"[dropped the {turns} to fit the context of {n_ctx} tokens]\n")
    return prompt, messages


def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    llm = _load(args)
    params = _params(args, llm)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    out.write("dsv2 chat: type a message; /reset starts over, /exit quits, Ctrl-C stops a reply.\n")
    while True:
        out.write("> ")
        out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits, as EOF does
            out.write("\n")
            return 0
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        prompt, messages = _fit_context(llm, [*messages, {"role": "user", "content": line.rstrip("\n")}],
                                        len(start), params, out)
        if prompt is None:
            continue
        reply, stopped = _stream_reply(llm, prompt, params, out)
        out.write("\n")
        if stopped:
            out.write("[reply stopped; the partial reply stays in the conversation]\n")
        messages.append({"role": "assistant", "content": reply.strip()})
