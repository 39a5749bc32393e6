"""The HTTP layer in front of the API: OpenAI error bodies, and one ASGI middleware that guards every request.

:class:`Guard` runs before routing, in this order: the ``Host`` check (DNS rebinding), the API key
(OpenAI's ``Authorization: Bearer``), then the body, read whole before the app sees it: a declared
``Content-Length`` over the limit is refused before a byte is read (413), a body that grows past it
while it arrives too (413), and a body that has not fully arrived ``read_timeout`` seconds after the
headers gets 408; these three close the connection, as the rest of the body may still be coming.
It adds security headers to every response, counts responses by path and status for ``/metrics``,
and turns an unexpected exception into a 500 with an OpenAI body while keeping the connection open
(Starlette's own handler re-raises, and the server then drops the keep-alive connection).

No FastAPI here: this module is plain ASGI and the standard library.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = ["APIError", "Guard", "LOOPBACK_HOSTS", "clip", "error_body", "host_allowed", "short"]

log = logging.getLogger("hypervocab.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# sent with every response; the playground page adds its own Content-Security-Policy
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'"
_MAX_REPR = 60


def short(value: Any, limit: int = _MAX_REPR) -> str:
    """``repr(value)``, cut to about ``limit`` characters: error messages never repeat a large input."""
    if isinstance(value, (bytes, bytearray)) and len(value) > limit:
        return repr(bytes(value[:limit])) + f"... ({len(value)} bytes)"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        kind = type(value).__name__
        text = repr(value)
        return (text[:limit] + f"... (a {kind} of {len(value)})") if len(text) > limit else text
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (for messages quoting an exception)."""
    return text if len(text) <= limit else text[:limit] + "..."


class APIError(Exception):
    """An error the API answers with OpenAI's body; ``headers`` are added to the response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if param is not None and len(param) > 100:  # a field's name is the client's input too: keep it short
            param = param[:100] + "..."
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def encode_json(body: Any) -> bytes:
    """JSON bytes that are always valid UTF-8 (``ensure_ascii``: a lone surrogate is written escaped)."""
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def parse_host(value: str) -> str:
    """The host name of a ``Host`` header, lower case, without the port and the brackets of an IPv6 address."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """``host`` (a parsed host name) against patterns: ``*`` (any), ``*.example.com`` or an exact name."""
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class Guard:
    """Pure ASGI middleware: Host check, API key, body size and read timeout, headers, metrics, 500s.

    allowed_hosts: host patterns (``None``: any host); api_key: the key clients must send (``None``: none);
    open_paths: paths served without the key; count: called with (path, status) for every response.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *, max_body_bytes: int, read_timeout: float,
                 allowed_hosts: list[str] | None, api_key: str | None, open_paths: set[str],
                 count: Callable[[str, int], None], allowed_origins: list[str] | None = None,
                 get_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.max_body_bytes, self.read_timeout = max_body_bytes, read_timeout
        self.allowed_hosts, self.open_paths, self.count = allowed_hosts, open_paths, count
        self.api_key = api_key.encode() if api_key else None
        self.allowed_origins = allowed_origins  # None: same origin only; ["*"]: any
        self.get_paths = set(get_paths)  # HEAD is answered on these as GET without the body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["type"] == "websocket":  # there are no websocket routes; refuse a foreign Host all the same
            if not self._host_ok(headers):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status: list[int] = []
        head = scope.get("method") == "HEAD" and path in self.get_paths
        if head:  # HEAD is GET without the body (RFC 9110), with the same headers
            scope = {**scope, "method": "GET"}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                if b"content-security-policy" not in have:
                    extra.append((b"content-security-policy", DEFAULT_CSP))
                if b"cache-control" not in have:  # answers are per request: nothing may be cached
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            error = self._refuse(scope, headers)
            if error is not None:
                # a body it won't read may be on its way: then the connection cannot carry another request
                has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
                await self._error(send_wrapped, error, close=has_body)
                return
            got = await self._read_body(receive, headers)
            if got is None:  # the client went away while sending
                return
            if isinstance(got, APIError):
                await self._error(send_wrapped, got, close=True)
                return
            await self._call(scope, _replay(got, receive), send_wrapped, status)
        finally:
            if status:
                self.count(path, status[0])

    def _host_ok(self, headers: dict[str, str]) -> bool:
        return self.allowed_hosts is None or host_allowed(parse_host(headers.get("host", "")), self.allowed_hosts)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        """The error for a request refused before its body is read, or None."""
        if not self._host_ok(headers):
            return APIError(400, f"Host {short(headers.get('host', ''))} is not allowed by this server "
                            f"(allowed: {', '.join(self.allowed_hosts or [])}; see --allowed-hosts)",
                            code="host_not_allowed")
        if sum(k.lower() == b"authorization" for k, _ in scope.get("headers", [])) > 1:
            return APIError(400, "the request has several Authorization headers: send one", code="invalid_api_key")
        foreign = self._cross_site(scope, headers)
        if foreign is not None:
            return APIError(403, f"cross-site requests are refused ({foreign}); a web page on another site "
                            "may not use this server unless it is allowed with --allowed-origins",
                            code="cross_site_request")
        if self.api_key is not None and scope.get("path") not in self.open_paths:
            auth = headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if not auth:
                return APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode("latin-1"), self.api_key):
                return APIError(401, "incorrect API key in the Authorization header (expected 'Bearer KEY')",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared is not None and re.fullmatch(r"\s*[0-9]+\s*", declared) and int(declared) > self.max_body_bytes:
            return APIError(413, f"the request body is {int(declared)} bytes, over this server's limit of "
                            f"{self.max_body_bytes} (--max-body-bytes)", code="request_too_large")
        return None

    def _cross_site(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """Why a request that may change state (not GET, HEAD or OPTIONS) comes from another site, or None.

        A browser says so itself (``Sec-Fetch-Site: cross-site``) and names the page's origin (``Origin``);
        clients that are not browsers send neither.  Without this, a page anywhere could make a keyless
        server on the visitor's machine generate, with ``fetch(..., {mode: "no-cors"})`` or ``sendBeacon``.
        """
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return None
        allowed = self.allowed_origins
        origin = headers.get("origin")
        if allowed is not None and ("*" in allowed or (origin is not None and origin.rstrip("/") in allowed)):
            return None
        # same origin: the page was served by this very host and port
        if origin is not None and origin.partition("://")[2].rstrip("/").lower() != \
                headers.get("host", "").strip().lower():
            return f"Origin {short(origin)}"
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return "Sec-Fetch-Site: cross-site"
        return None

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes | APIError | None:
        """The whole body, an error (too large, too slow), or None if the client disconnected."""
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.read_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout=left)
            except asyncio.TimeoutError:
                return APIError(408, f"the request body did not arrive within {self.read_timeout:g} s "
                                f"({size} bytes came; see --read-timeout)", code="request_timeout")
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return APIError(413, f"the request body is over this server's limit of {self.max_body_bytes} "
                                "bytes (--max-body-bytes)", code="request_too_large")
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _call(self, scope: Scope, receive: Receive, send: Send, status: list[int]) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as e:
            if status:  # the response has started: it cannot become an error any more, so the connection goes
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            await self._error(send, APIError(500, f"internal error: {type(e).__name__}: {clip(str(e))}",
                                             type="server_error"))

    @staticmethod
    async def _error(send: Send, error: APIError, *, close: bool = False) -> None:
        body = encode_json(error.body())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
        if close:  # part of the body may still be on its way: this connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then passes on to the server's (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
