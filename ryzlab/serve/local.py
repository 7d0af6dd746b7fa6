"""Serving inside this process: an app on a free local port, and the load generator's client of
an in-process backend. Server-side helpers, so they live here and not in :mod:`ryzlab.loadgen`
(a lower layer, which knows only the :data:`~ryzlab.loadgen.load.Client` interface).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import Any, AsyncIterator, Iterator

from ryzlab.loadgen.load import Client, RequestSpec
from ryzlab.serve.sampling import SamplingParams

__all__ = ["serve_in_thread", "backend_client"]


def backend_client(backend: Any, *, temperature: float = 0.0) -> Client:
    """Send each request straight to ``backend.generate`` (an AsyncEngine or a Router)."""
    ids = itertools.count()

    async def client(req: RequestSpec) -> AsyncIterator[int]:
        rid = f"load-{req.index}-{next(ids)}"
        async for toks in backend.generate(rid, list(req.prompt),
                                           SamplingParams(max_tokens=req.max_tokens, temperature=temperature)):
            if toks:  # an empty chunk only carries the finish_reason
                yield len(toks)

    return client


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free port; yield its base URL."""
    import uvicorn

    limits = getattr(getattr(app, "state", None), "limits", None)  # ryzlab's app: its connection limits too
    config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off",
                            **({"http": limits.protocol()} if limits is not None else {}))
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
