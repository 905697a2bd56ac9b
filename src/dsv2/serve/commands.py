"""`dsv2 serve`: the OpenAI-compatible API on uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API under /v1")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use in 'model' (default: the model directory's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set DSV2_API_KEY)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests computed at once")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those before 429")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-cache-tokens", type=int, default=None)
    p.add_argument("--cache-dtype", default=None)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dsv2.infer import LLM
    from dsv2.serve import ServerConfig, create_app

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: {model_dir} is not a checkpoint directory (no config.json)")
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_cache_tokens=args.max_cache_tokens,
              cache_dtype=args.cache_dtype, max_num_seqs=args.max_concurrent)
    names = args.served_model_name or [model_dir.resolve().name]
    config = ServerConfig(names, api_key=args.api_key or os.environ.get("DSV2_API_KEY") or None,
                          max_concurrent=args.max_concurrent, max_queue=args.max_queue)
    app = create_app(llm, config)
    print(f"dsv2: serving {names[0]} at http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown: in-flight requests get a few seconds to finish,
    # then the app's lifespan stops the engine, which aborts what is left.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
