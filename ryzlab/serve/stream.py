"""One request's token stream, from the thread that produces it to the client's event loop.

The engine thread (:class:`ryzlab.serve.async_engine.AsyncEngine`) and the router's result
threads (:class:`ryzlab.serve.router.Router`) put items; the request's ``generate`` coroutine
drains them. Items: a :class:`~ryzlab.serve.sampling.TokenChunk` (new token ids; the last one
carries the ``finish_reason``), an exception (the request failed: raised to the client), or
``None`` (the end).
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

__all__ = ["TokenStream"]


class TokenStream:
    """A queue on the creating coroutine's event loop, fed from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> bool:
        """Hand ``item`` to the consumer (thread-safe); False when its event loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: nobody listens any more
            return False
        return True

    async def drain(self) -> AsyncIterator[list[int]]:
        """Yield the chunks until the end; raise an exception that was put."""
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
