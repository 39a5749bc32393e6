"""``hypervocab serve``: the OpenAI-compatible HTTP server, with the playground at ``/``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from typing import Any

from ..errors import ConfigError, check_int
from ..loading import load
from ..pretrained import DEFAULT_MODEL
from ..serving import LOOPBACK_HOSTS, ServeLimits, create_app
from .options import add_device_options

API_KEY_ENV = "HYPERVOCAB_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> list[str]:
    """The ``Host`` names a server bound to ``host`` accepts when ``--allowed-hosts`` is not given.

    Loopback: the loopback names only (a web page can't reach it through DNS rebinding). A wildcard
    address (0.0.0.0, ::): any, as the names clients use are unknown. Another address or name: it and
    the loopback names."""
    if _is_loopback(host):
        return list(LOOPBACK_HOSTS)
    if host in ("", "0.0.0.0", "::", "[::]"):
        return ["*"]
    return [host.strip("[]").lower(), *LOOPBACK_HOSTS]


def server_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(create_app keyword arguments, :func:`hypervocab.serving.server.serve` keyword arguments) for the flags."""
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
                         max_batch_size=args.max_batch_size)
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if not args.header_timeout > 0:
        raise ConfigError(f"--header-timeout must be > 0 seconds, got {args.header_timeout}")
    check_int("--max-connections", args.max_connections, minimum=1)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    hosts = ([h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts is not None
             else default_allowed_hosts(args.host))
    if not hosts:
        raise ConfigError("--allowed-hosts is empty: give host names separated by commas, or '*' for any")
    origins = None
    if args.allowed_origins is not None:
        origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
        bad = [o for o in origins if o != "*" and not re.fullmatch(r"https?://[^/\s]+/?", o)]
        if not origins or bad:
            raise ConfigError(f"--allowed-origins must be origins like https://app.example.com separated by commas, "
                              f"or '*', got {args.allowed_origins!r}")
    app_kw: dict[str, Any] = {"limits": limits, "api_key": api_key, "allowed_hosts": hosts,
                              "prompt_lookup": check_int("--prompt-lookup", args.prompt_lookup, minimum=0),
                              "allowed_origins": origins,
                              "prefill_chunk": check_int("--prefill-chunk", args.prefill_chunk, minimum=0)}
    server_kw = {"host": args.host, "port": args.port, "log_level": args.log_level, "grace": args.shutdown_timeout,
                 "header_timeout": args.header_timeout, "max_connections": args.max_connections}
    return app_kw, server_kw


def run_server(args: argparse.Namespace) -> int:
    from ..serving import server  # uvicorn: the serve extra

    app_kw, server_kw = server_settings(args)  # bad flags fail before the model loads
    model, htok = load(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype)
    name = args.served_model_name or ("hypervocab-smollm2-135m" if args.model in ("default", DEFAULT_MODEL)
                                      else args.model.rstrip("/").split("/")[-1])
    app = create_app(model, htok.tokenizer, model_name=name, **app_kw)
    weight = next(model.parameters())
    print(f"serving {name!r} on http://{args.host}:{args.port} (playground at /, API at /v1), model on "
          f"{weight.device} in {str(weight.dtype).removeprefix('torch.')}", file=sys.stderr)
    if not _is_loopback(args.host) and app_kw["api_key"] is None:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use it "
              f"(set {API_KEY_ENV} or --api-key)", file=sys.stderr)
    server.serve(app, **server_kw)
    return 0


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a live playground",
                       description="Serve a hypervocab model over HTTP: POST /v1/completions and "
                       "/v1/chat/completions (streaming with server-sent events), GET /v1/models, GET /health, "
                       "GET /metrics (Prometheus), and a playground at / that highlights the text hypertokens "
                       "write. Concurrent requests are generated in one continuously batched run, each with "
                       "its own codebook, cache and options.")
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
    s.add_argument("--max-batch-size", type=int, default=16,
                   help="requests generated at once: they join and leave one running batch between steps "
                   "(default 16; 1 runs them one at a time)")
    s.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                   help="largest request body in bytes (default 2097152, 2 MiB); larger ones get 413")
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send the whole request body (default 30); then 408")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM or Ctrl-C: new and queued requests get 503 at once, running ones get this "
                   "many seconds to finish, then end with 503 too (streams: an error event and [DONE]) "
                   "(default 10)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers, from opening and from its last "
                   "response (default 10); then it is closed with 408")
    s.add_argument("--max-connections", type=int, default=1000,
                   help="open connections at most (default 1000); more are answered 503 and closed")
    s.add_argument("--allowed-origins", default=None,
                   help="comma-separated web origins (https://app.example.com) whose pages may POST here, or '*'; "
                   "default: only this server's own playground. Browsers' other cross-site requests get 403")
    s.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY' (all but /health "
                   f"and the playground page); default: the {API_KEY_ENV} environment variable, else no key. "
                   "The variable keeps the key out of the process list")
    s.add_argument("--allowed-hosts", default=None, help="comma-separated names the Host header may give "
                   "('*.example.com' patterns, '*' for any), against DNS rebinding; default: the loopback names "
                   "when --host is loopback, any for 0.0.0.0 or ::, else --host and the loopback names")
    add_device_options(s)
    s.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="speculative decoding while a request is alone in the batch: draft up to K codes from the "
                        "context, check them "
                        "in one forward (same output; faster where answers quote the prompt; default 0: off)")
    s.add_argument("--prefill-chunk", type=int, default=64, metavar="N",
                   help="prompt codes a joining request reads per step, between the running streams' steps, so a "
                        "long prompt pauses them by about one chunk's forward (default 64; 0: a whole prompt at once)")
    s.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    s.set_defaults(func=run_server)
