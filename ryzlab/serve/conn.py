"""Connection hygiene below the ASGI app: how long a request head may take, and how many
connections one client address may hold open.

uvicorn times out an idle keep-alive connection but not an unfinished request head: a client
that sends ``GET /health HTTP/1.1\\r\\n`` and nothing more holds its connection (a file
descriptor, a protocol object) forever, and 500 such connections were never closed. The
:mod:`.guard` middleware cannot help, since the app is only called once the head is complete.
This module is the HTTP/1.1 protocol uvicorn runs (its h11 one) with two bounds added:

* **head time**: the request line and headers must arrive within ``header_timeout_s`` of the
  connection opening (or of the previous response on a kept-alive connection); otherwise the
  answer is 408 and the connection is closed. Once the head is in, the body is the guard's
  (``body_timeout_s``) and the request's (``request_timeout_s``) business.
* **connections per client**: at most ``max_connections_per_client`` open connections per client
  address; one more is answered 429 (``Retry-After``) and closed before anything is read.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Any

from ryzlab.serve.guard import error_body

__all__ = ["guarded_protocol", "raw_error"]

log = logging.getLogger(__name__)


def raw_error(status: int, reason: str, message: str, code: str, *, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response with OpenAI's error body that closes the connection."""
    body = json.dumps(error_body(message, "invalid_request_error" if status < 429 else "rate_limit_error", status,
                                 code=code)).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"] + ([f"retry-after: {retry_after_s}"] if retry_after_s is not None else [])
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(*, header_timeout_s: float, max_connections_per_client: int,
                     retry_after_s: int = 1) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol class with the two bounds of this module (pass it as ``http=``).

    The class counts the open connections of its server (one event loop) per client address in
    ``open_per_client``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if not header_timeout_s > 0 or not (isinstance(max_connections_per_client, int) and max_connections_per_client > 0):
        raise ValueError(f"header_timeout_s and max_connections_per_client must be > 0, got {header_timeout_s!r} "
                         f"and {max_connections_per_client!r}")

    class GuardedH11Protocol(H11Protocol):
        open_per_client: Counter = Counter()

        def connection_made(self, transport: Any) -> None:  # noqa: D102 - asyncio.Protocol
            super().connection_made(transport)
            self.head_timer: asyncio.TimerHandle | None = None
            self.counted: str | None = None
            host = self.client[0] if self.client else "unknown"
            if self.open_per_client[host] >= max_connections_per_client:
                log.warning("refused a connection from %s: it has %d open (--max-connections-per-client)", host,
                            self.open_per_client[host])
                transport.write(raw_error(429, "Too Many Requests",
                                          f"this client has {self.open_per_client[host]} connections open, the limit "
                                          f"is {max_connections_per_client}; reuse or close one",
                                          "too_many_connections", retry_after_s=retry_after_s))
                transport.close()
                return
            self.open_per_client[host] += 1
            self.counted = host
            self.arm_head_timer()

        def arm_head_timer(self) -> None:
            self.disarm_head_timer()
            self.head_timer = self.loop.call_later(header_timeout_s, self.head_timed_out)

        def disarm_head_timer(self) -> None:
            if getattr(self, "head_timer", None) is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_timed_out(self) -> None:
            self.head_timer = None
            if self.transport.is_closing():
                return
            # IDLE: no complete request head since the timer was armed (a request in flight is
            # SEND_BODY or DONE and is left alone)
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                log.info("closed a connection from %s: no complete request head within %g s", self.counted,
                         header_timeout_s)
                self.transport.write(raw_error(408, "Request Timeout",
                                               f"the request line and headers did not arrive within "
                                               f"{header_timeout_s:g} s", "header_timeout"))
                self.transport.close()

        def on_response_complete(self) -> None:  # noqa: D102 - uvicorn's hook
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm_head_timer()  # the next request's head on this kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102 - asyncio.Protocol
            self.disarm_head_timer()
            host, self.counted = getattr(self, "counted", None), None
            if host is not None:
                self.open_per_client[host] -= 1
                if self.open_per_client[host] <= 0:
                    del self.open_per_client[host]
            super().connection_lost(exc)

    return GuardedH11Protocol
