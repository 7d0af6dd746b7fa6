"""HTTP hygiene in front of the API, as one ASGI middleware (runs before any routing or parsing).

In order, for every request:

1. **Host** must name the address the server is bound to (loopback names for a loopback bind,
   plus ``--allowed-host`` names): a web page whose domain an attacker re-points at 127.0.0.1
   (DNS rebinding) is refused (400).
2. **API key**: with ``api_key`` set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401); so do
   ``/metrics`` and ``/stats`` with ``metrics_auth`` (default off: Prometheus scrapers without a
   key keep working). ``/health`` never needs one (probes).
3. **Content type**: a body sent to ``/v1/*`` must be ``application/json`` (415). A browser may
   send ``text/plain`` cross-origin without asking (no CORS preflight); JSON it may not.
4. **Body size**: a ``Content-Length`` over ``max_body_bytes`` is refused before one byte is read
   (413), and a body without one (chunked) is cut off at the limit while it streams in.
5. **Body time**: the whole body must arrive within ``body_timeout_s`` (408), so a client that
   announces a body and never sends it does not hold a connection forever.

Refusals use OpenAI's error body and close the connection when body bytes may be left unread.
Every answer's status (these and the app's) is reported to ``on_answer`` (the error counters).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import Any, Callable

__all__ = ["Guard", "allowed_hosts_for", "error_body", "LOOPBACK_NAMES", "is_loopback"]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
BODY_METHODS = ("POST", "PUT", "PATCH")


def error_body(message: str, kind: str, status: int, *, param: str | None = None, code: Any = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code if code is not None else status}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """Host names a server bound to ``host`` answers to; None = any (a wildcard bind without
    ``extra`` names: such a server must have an API key, see ``ryzlab serve``)."""
    extra = tuple(h.lower() for h in extra)
    if host in ("0.0.0.0", "::", ""):
        return frozenset(extra) | frozenset(LOOPBACK_NAMES) if extra else None
    names = {host.lower().strip("[]"), *extra}
    if is_loopback(host):
        names |= set(LOOPBACK_NAMES)
    return frozenset(names)


def _hostname(value: str) -> str:
    """``Host`` header -> name without port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """The ASGI middleware (see module docstring)."""

    def __init__(self, app: Any, *, allowed_hosts: frozenset[str] | None, api_key: str | None,
                 max_body_bytes: int, body_timeout_s: float, on_answer: Callable[[int], None],
                 metrics_auth: bool = False):
        self.app, self.allowed_hosts, self.api_key = app, allowed_hosts, api_key
        self.keyed = ("/v1", "/metrics", "/stats") if metrics_auth else ("/v1",)
        self.max_body_bytes, self.body_timeout_s, self.on_answer = max_body_bytes, body_timeout_s, on_answer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                self.on_answer(msg["status"])
            await send(msg)

        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        has_body = method in BODY_METHODS
        refuse = self._refusal(headers, path, has_body)
        if refuse is not None:
            await self._answer(counted, *refuse, close=has_body)
            return
        if not has_body:
            await self.app(scope, receive, counted)
            return
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                more = True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return  # the client left before sending its body: nobody to answer
                    body += msg.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        await self._answer(counted, 413, f"request body exceeds {self.max_body_bytes} bytes",
                                           "invalid_request_error", "body_too_large", close=True)
                        return
                    more = msg.get("more_body", False)
        except TimeoutError:
            await self._answer(counted, 408, f"request body did not arrive within {self.body_timeout_s:g} s",
                               "invalid_request_error", "body_timeout", close=True)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, counted)

    def _refusal(self, headers: dict[bytes, bytes], path: str, has_body: bool
                 ) -> tuple[int, str, str, str] | None:
        if self.allowed_hosts is not None:
            host = _hostname(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                return (400, f"Host {host[:100]!r} is not served here; allowed: {', '.join(sorted(self.allowed_hosts))}",
                        "invalid_request_error", "invalid_host")
        api = path.startswith("/v1")
        if self.api_key is not None and path.startswith(self.keyed):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return 401, "missing or invalid API key (send Authorization: Bearer KEY)", "authentication_error", \
                    "invalid_api_key"
        if not has_body:
            return None
        if api:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                return (415, f"Content-Type must be application/json, got {ctype[:60]!r}", "invalid_request_error",
                        "unsupported_media_type")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, "Content-Length is not an integer", "invalid_request_error", "bad_content_length"
            if n > self.max_body_bytes:
                return (413, f"request body of {n} bytes exceeds the limit of {self.max_body_bytes} bytes",
                        "invalid_request_error", "body_too_large")
        return None

    @staticmethod
    async def _answer(send: Any, status: int, message: str, kind: str, code: str, *, close: bool) -> None:
        body = json.dumps(error_body(message, kind, status, code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
