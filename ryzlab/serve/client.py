"""Clients the load generator drives: a backend called in-process, or the HTTP API (SSE).

Also :func:`serve_in_thread`, which runs the API on 127.0.0.1 on a free port for the length of
a ``with`` block (tests, benchmarks, notebooks).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from typing import Any, AsyncIterator, Iterator

from .engine import SamplingParams
from .loadgen import Client, RequestSpec

__all__ = ["backend_client", "http_client", "serve_in_thread"]

log = logging.getLogger(__name__)


def backend_client(backend: Any, *, temperature: float = 0.0) -> Client:
    """Send each request straight to ``backend.generate`` (an AsyncEngine or a Router)."""
    ids = itertools.count()

    async def client(req: RequestSpec) -> AsyncIterator[int]:
        rid = f"load-{req.index}-{next(ids)}"
        async for toks in backend.generate(rid, list(req.prompt),
                                           SamplingParams(max_tokens=req.max_tokens, temperature=temperature)):
            yield len(toks)

    return client


def http_client(base_url: str, *, timeout_s: float = 120.0) -> Client:
    """POST ``/v1/completions`` with ``stream: true`` and count tokens per SSE event."""
    import httpx

    state: dict[str, Any] = {}

    async def client(req: RequestSpec) -> AsyncIterator[int]:
        if "http" not in state:  # one connection pool per event loop
            state["http"] = httpx.AsyncClient(base_url=base_url, timeout=timeout_s,
                                              limits=httpx.Limits(max_connections=None))
        body = {"prompt": list(req.prompt), "max_tokens": req.max_tokens, "stream": True}
        async with state["http"].stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                n = len(event["choices"][0].get("token_ids", []))
                if n:
                    yield n

    return client


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free port; yield its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ryzlab-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
