"""The server process: uvicorn around the app, made to survive idle sockets, full file tables and SIGTERM.

* **Idle and slow connections**: a connection must deliver a request's headers within ``header_timeout``
  seconds of opening (and of its previous response), else it is closed; uvicorn's own keep-alive timeout
  only starts after a first response, so sockets that never send a request, or send headers a byte a
  second, would stay open forever.
* **A connection limit**: past ``max_connections`` open connections a new one gets an immediate 503 with an
  OpenAI error body and is closed, so ``/health`` and running requests keep their file descriptors.
* **The file limit**: the soft limit on open files is raised to the hard limit at start.
* **Malformed HTTP** (a broken request line, a 31-digit ``Content-Length``), which uvicorn's parser answers
  below the app with plain text, gets OpenAI's error body with the security headers: 400, or 413 for a length
  over any limit.
* **Resource errors are logged once per interval** (``accept`` failing with "too many open files" retries
  in a tight loop and would log every retry).
* **SIGTERM / Ctrl-C**: the engine stops admitting at once (503 ``shutting_down``), queued requests end
  with that 503 without starting, running ones get ``grace`` seconds to finish, then end with the same 503
  (a final error event and ``[DONE]`` for streams); only then does the process exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from typing import Any

try:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # this module is imported only to serve
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'hypervocab[serve]'") from None

__all__ = ["HyperServer", "RateLimitedLog", "protocol_class", "raise_file_limit", "serve"]

log = logging.getLogger("hypervocab.serving")


def raise_file_limit() -> tuple[int, int] | None:
    """Raise the soft limit on open files to the hard one (at most 1,048,576); returns (old, new) or None."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if want <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, want


class RateLimitedLog(logging.Filter):
    """Lets through one record per ``interval`` seconds for messages that repeat in a retry loop (out of
    file descriptors, out of memory); the next one that passes says how many were held back."""

    PATTERNS = ("out of system resource", "too many open files", "cannot allocate memory")

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -float("inf")
        self._held = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().lower()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1]).lower()
        if not any(p in text for p in self.PATTERNS):
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                self._held += 1
                return False
            self._last, held, self._held = now, self._held, 0
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it in the last {self.interval:g} s)"
            record.args = ()
        return True


def _refusal(status: int, reason: str, message: str, code: str, *, type: str = "server_error") -> bytes:
    """A whole HTTP response, written by the protocol below the app: OpenAI's error body, the security headers."""
    from .http import DEFAULT_CSP, SECURITY_HEADERS

    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), (b"cache-control", b"no-store"), *SECURITY_HEADERS,
               (b"content-security-policy", DEFAULT_CSP)]
    if status in (503, 429):
        headers.append((b"retry-after", b"1"))
    head = f"HTTP/1.1 {status} {reason}\r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + body


# a Content-Length of 16 digits or more is over any body limit; h11 would call it malformed (400)
_HUGE_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*0*[0-9]{16,}", re.IGNORECASE)


def protocol_class(*, header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a header deadline and a connection limit (see the module docstring)."""

    class Protocol(H11Protocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:  # noqa: D102
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                transport.write(_refusal(503, "Service Unavailable", f"this server has {max_connections} "
                                         "connections open, its limit (--max-connections): retry shortly",
                                         "too_many_connections"))
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()  # type: ignore[union-attr]
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            # no request headers in time: an idle socket, or headers a byte at a time
            self.transport.write(_refusal(408, "Request Timeout", f"no request arrived within {header_timeout:g} "
                                          "s of the connection opening (--header-timeout)", "request_timeout"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:  # noqa: D102
            if (self.cycle is None or self.cycle.response_complete) and _HUGE_LENGTH.search(data):
                self.transport.write(_refusal(413, "Content Too Large", "the request body's Content-Length is over "
                                              "this server's limit (--max-body-bytes)", "request_too_large",
                                              type="invalid_request_error"))
                self.transport.close()
                return
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:  # noqa: D102 - h11 could not parse the request
            self.transport.write(_refusal(400, "Bad Request", "malformed HTTP request: its request line, a header "
                                          "or its framing could not be parsed", "malformed_request",
                                          type="invalid_request_error"))
            self.transport.close()

        def handle_events(self) -> None:  # noqa: D102
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers arrived: the deadline is met
                self._disarm()

        def on_response_complete(self) -> None:  # noqa: D102
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection has as long

        def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
            self._disarm()
            super().connection_lost(exc)

    return Protocol


class HyperServer(uvicorn.Server):  # type: ignore[misc]
    """uvicorn's server that, on the first SIGTERM or Ctrl-C, drains ``engine`` for ``grace`` seconds (see the
    module docstring) before uvicorn's own shutdown closes the connections."""

    def __init__(self, config: Any, *, engine: Any = None, grace: float = 10.0) -> None:
        super().__init__(config)
        self.engine, self.grace = engine, grace
        self.drained: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:  # what the signal handlers call
        if self.engine is not None and self.drained is None:
            self.drained = self.engine.drain(self.grace)
        super().handle_exit(sig, frame)


def serve(app: Any, *, host: str, port: int, log_level: str = "info", grace: float = 10.0,
          header_timeout: float = 10.0, max_connections: int = 1000) -> None:
    """Serve ``app`` (from :func:`~hypervocab.serving.create_app`) until SIGTERM or Ctrl-C."""
    raised = raise_file_limit()
    if raised is not None and raised[1] < max_connections + 64:
        log.warning("the open-file limit is %d: fewer than --max-connections (%d) and the server's own files",
                    raised[1], max_connections)
    limiter = RateLimitedLog()
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(limiter)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                            http=protocol_class(header_timeout=header_timeout, max_connections=max_connections),
                            # the engine ends every request within `grace`; then the answers still go out
                            timeout_graceful_shutdown=grace + 5)
    HyperServer(config, engine=app.state.engine, grace=grace).run()
