"""``hypervocab serve``: the OpenAI-compatible HTTP server, with the playground at ``/``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def run_server(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'hypervocab[serve]'") from None
    from ..serving import ServeLimits, create_app
    from .main import load_model

    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_queue=args.max_queue)
    model, htok = load_model(args.model, base_model=args.base_model, dtype=args.dtype)
    name = args.served_model_name or ("hypervocab-smollm2-135m" if args.model in ("default", "smollm2-135m-instruct")
                                      else args.model.rstrip("/").split("/")[-1])
    app = create_app(model, htok.tokenizer, model_name=name, limits=limits)
    print(f"serving {name!r} on http://{args.host}:{args.port} (playground at /, API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a live playground",
                       description="Serve a hypervocab model over HTTP: POST /v1/completions and "
                       "/v1/chat/completions (streaming with server-sent events), GET /v1/models, GET /health, and "
                       "a playground at / that highlights the text hypertokens write. Requests are queued and run "
                       "one at a time, each with its own codebook and cache.")
    s.add_argument("--model", default="default", help="a hypervocab checkpoint folder, a Hugging Face model, or "
                   "'default' (the shipped model)")
    s.add_argument("--base-model", default=None, help="the base model's folder or hub id, instead of the one the "
                   "checkpoint names")
    s.add_argument("--served-model-name", default=None, help="the model id clients give (default: from --model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt in base tokens (default 4096)")
    s.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default 1024)")
    s.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait (default 32)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    s.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    s.set_defaults(func=run_server)
