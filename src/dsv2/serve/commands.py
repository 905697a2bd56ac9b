"""`dsv2 serve`: the OpenAI-compatible API on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from dsv2.infer.commands import DTYPES, add_compile_arg, number, positive_int


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API under /v1")
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json, *.safetensors, tokenizer) or a llama.cpp .gguf file "
                        "(default: the shipped dsv2-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use in 'model' (default: the model directory's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set DSV2_API_KEY)")
    p.add_argument("--max-concurrent", type=positive_int, default=64, help="requests computed at once")
    p.add_argument("--max-queue", type=number(int, 0), default=256, help="requests waiting beyond those before 429")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-cache-tokens", type=positive_int, default=None,
                   help="latent cache size in tokens (default: a fifth of the free memory)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + output (default: the model's context, capped to what the cache holds)")
    p.add_argument("--cache-dtype", default=None, help="'fp8' to store the latent cache in fp8 e4m3")
    add_compile_arg(p)
    p.add_argument("--graceful-timeout", type=number(float, 0), default=5.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long in-flight requests may run before they are aborted")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no access-log line per request (method, path, status, tokens, latency)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from dsv2.default_model import default_model_dir
    from dsv2.infer import LLM
    from dsv2.serve import ServerConfig, create_app

    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_file() and not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: {model_dir} is not a checkpoint directory (no config.json) or a .gguf file")
    _log_to_stderr()
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_cache_tokens=args.max_cache_tokens,
              max_model_len=args.max_model_len, cache_dtype=args.cache_dtype, max_num_seqs=args.max_concurrent, compile=args.compile,
              gemm=args.gemm, quantization=args.quantization)
    if args.compile:
        print("dsv2: compiling the decode graphs (once, before serving)...", flush=True)
        llm.warm_up()
    names = args.served_model_name or [model_dir.resolve().stem if model_dir.is_file() else model_dir.resolve().name]
    config = ServerConfig(names, api_key=args.api_key or os.environ.get("DSV2_API_KEY") or None,
                          max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                          log_requests=not args.disable_log_requests)
    fatal: list[BaseException] = []
    server: list[Any] = []

    def on_fatal(error: BaseException) -> None:  # the engine thread is gone: stop serving, exit non-zero
        fatal.append(error)
        if server:
            server[0].should_exit = True

    app = create_app(llm, config, on_fatal)
    print(f"dsv2: serving {names[0]} at http://{args.host}:{args.port}/v1", flush=True)
    _run_uvicorn(app, args.host, args.port, args.graceful_timeout, server)
    if fatal:
        print(f"dsv2: stopped: the engine failed ({fatal[0]})", file=sys.stderr, flush=True)
        return 1
    return 0


def _log_to_stderr() -> None:
    """The "dsv2" loggers (engine warnings, the access log) to stderr, time-stamped like uvicorn's own lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", datefmt="%m-%d %H:%M:%S"))
    log = logging.getLogger("dsv2")
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _run_uvicorn(app: Any, host: str, port: int, grace_s: float, holder: list[Any]) -> None:  # noqa: ANN401
    """uvicorn, but on SIGINT/SIGTERM in-flight requests get `grace_s` seconds to finish, then the engine aborts
    the rest, so every stream still ends with an error event and [DONE] rather than a cut connection. uvicorn
    alone waits its graceful timeout and then cuts connections mid-stream; its timeout here is longer than the
    grace, so the abort events go out first. The server is put in `holder` for the engine's fatal callback."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: ANN401
            if not self.should_exit:
                print(f"dsv2: shutting down; in-flight requests have {grace_s:g} s to finish", flush=True)
                timer = threading.Timer(grace_s, app.state.engine.stop)
                timer.daemon = True  # an idle server exits at once, without waiting for it
                timer.start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=grace_s + 5))
    holder.append(server)
    server.run()
