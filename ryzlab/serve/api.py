"""HTTP API, OpenAI-compatible: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming),
``/v1/models``; ``/health``, Prometheus ``/metrics``, the backend's numbers as JSON at ``/stats``.

The app serves any *backend* with the small interface below: an in-process
:class:`~ryzlab.serve.async_engine.AsyncEngine` (one worker) or a :class:`~ryzlab.serve.router.Router`
over worker processes. The official ``openai`` client works against it (tests run it).

Hostile input is answered with a 4xx and OpenAI's error body before any work starts
(:mod:`.guard`: Host, API key, content type, body size and time; :mod:`.protocol`: JSON and
every field). Admission is bounded: past ``max_pending`` sequences in flight the answer is 429
with ``Retry-After`` (503 while the backend is unhealthy), never an unbounded queue; one client
address holds at most three quarters of it (:attr:`ServeLimits.client_share`; a request larger
than that is a 400), so one ``n=64`` request cannot shut everyone else out. Every
request has a deadline (``request_timeout_s``). A client that disconnects, streaming or not,
has its sequences aborted at once, which frees their KV blocks. A request that fails inside the
engine fails alone (500, or an error event on its stream); the server stays up.

``/health`` reports real progress: it is 503 when the engine has work but has not finished a
step within its stall timeout (a hung model, a dead worker), not merely when the process
stops answering.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from typing import Any, AsyncIterator, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ryzlab.serve.engine import NoWorkerAvailable
from ryzlab.serve.guard import Guard, allowed_hosts_for, error_body
from ryzlab.serve.output import ChoiceText, Delta, Formatter, usage
from ryzlab.serve.prom import CONTENT_TYPE, ServeMetrics
from ryzlab.serve.protocol import CompletionParams, GenerationRequest, ModelInfo, RequestError, parse_chat, parse_completion, \
    parse_json

__all__ = ["create_app", "Backend", "CompletionParams", "RequestError", "json_safe", "ServeLimits"]

log = logging.getLogger(__name__)

CREATED = int(time.time())
"""``created`` of the model in ``/v1/models``: when this server process loaded it."""


class Backend(Protocol):
    """What the API needs from an engine or a router."""

    vocab_size: int
    max_model_len: int
    model_name: str
    tokenizer: Any

    def generate(self, request_id: str, prompt: list[int], params: CompletionParams) -> AsyncIterator[list[int]]:
        """Yield lists of new token ids as they are produced; raise on failure. Each is a
        :class:`TokenChunk` (its logprobs when asked for), and the last one carries the
        ``finish_reason`` (``stop`` or ``length``): the API reports the engine's reason."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (idempotent)."""

    def health(self) -> dict[str, Any]:
        """``{"healthy": bool, "reason": str, ...}``."""

    def metrics(self) -> dict[str, Any]:
        """Flat dict of numbers (kv_cache_usage_perc, preemptions, num_running, num_waiting, ...)."""


class ServeLimits:
    """Admission and hygiene limits of one app (the ``ryzlab serve`` flags)."""

    def __init__(self, *, max_pending: int = 256, request_timeout_s: float = 600.0, max_body_bytes: int = 1 << 20,
                 body_timeout_s: float = 30.0, retry_after_s: int = 1, header_timeout_s: float = 10.0,
                 max_connections_per_client: int = 256):
        for name, v in (("max_pending", max_pending), ("request_timeout_s", request_timeout_s),
                        ("max_body_bytes", max_body_bytes), ("body_timeout_s", body_timeout_s),
                        ("retry_after_s", retry_after_s), ("header_timeout_s", header_timeout_s),
                        ("max_connections_per_client", max_connections_per_client)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        self.max_pending = max_pending
        """Sequences (prompts x n) in flight at most; more are refused with 429. One client address
        holds at most :attr:`client_share` of them, so one request (n=64) or one client cannot shut
        everyone else out."""
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.retry_after_s = retry_after_s
        self.header_timeout_s = header_timeout_s
        """Seconds a request line and headers may take to arrive (408 and close; :mod:`.conn`)."""
        self.max_connections_per_client = max_connections_per_client
        """Open connections per client address at most (one more: 429 and close; :mod:`.conn`)."""

    @property
    def client_share(self) -> int:
        """Sequences one client address may have in flight: all but a quarter of ``max_pending``,
        which is kept for other clients (all of it when ``max_pending`` < 4)."""
        return self.max_pending - self.max_pending // 4

    def protocol(self) -> type:
        """The uvicorn HTTP protocol class that enforces the connection limits (``http=``)."""
        from ryzlab.serve.conn import guarded_protocol

        return guarded_protocol(header_timeout_s=self.header_timeout_s,
                                max_connections_per_client=int(self.max_connections_per_client),
                                retry_after_s=int(self.retry_after_s))


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON has no NaN; an empty percentile is NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return json_safe(x.item())
    return x


def _error(status: int, message: str, kind: str, *, param: str | None = None, code: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param=param, code=code), status_code=status,
                        headers=headers)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class _Stream(StreamingResponse):
    """SSE that notices a disconnect at once (not only at its next write) and always runs
    ``on_close`` (abort the sequences, release the admission slots), even when the stream never
    started because the client was already gone."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        finally:
            await self.on_close()


class _Job:
    """The engine sequences of one request (one per choice), merged into one event stream."""

    def __init__(self, backend: Any, rid: str, req: GenerationRequest, tokenizer: Any, metrics: ServeMetrics,
                 timeout_s: float):
        self.backend, self.rid, self.req, self.metrics = backend, rid, req, metrics
        k = req.num_choices
        self.choices = [ChoiceText(i, tokenizer, req.stop, req.params.logprobs is not None) for i in range(k)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: dict[int, asyncio.Task] = {}
        self.t0 = time.monotonic()
        self.timeout_s = timeout_s
        self.first: dict[int, float] = {}
        self.done: set[int] = set()
        self.closed = False

    def sub_id(self, i: int) -> str:
        return f"{self.rid}-{i}"

    def start(self) -> None:
        for i in range(self.req.num_choices):
            self.tasks[i] = asyncio.create_task(self._pump(i))

    async def _pump(self, i: int) -> None:
        prompt, params = self.req.choice(i)
        try:
            async for toks in self.backend.generate(self.sub_id(i), list(prompt), params):
                self.queue.put_nowait((i, toks))
            self.queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - delivered to the request's consumer, which answers it
            self.queue.put_nowait((i, e))

    def _finished(self, i: int, reason: str | None) -> None:
        self.done.add(i)
        c = self.choices[i]
        t = time.monotonic()
        first = self.first.get(i)
        self.metrics.sequence_done(prompt_tokens=len(self.req.choice(i)[0]), output_tokens=len(c.ids),
                                   ttft_s=None if first is None else first - self.t0, e2e_s=t - self.t0,
                                   finished_reason=reason)

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice, delta) as tokens arrive; the last delta of a choice has its finish_reason.
        Raises the first failure of any choice, or TimeoutError past the request's deadline
        (the caller closes the job)."""
        k = self.req.num_choices
        deadline = self.t0 + self.timeout_s
        while len(self.done) < k:
            try:
                i, item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TimeoutError(f"request did not finish within {self.timeout_s:g} s") from None
            if i in self.done:
                continue  # tokens that raced a stop string
            c = self.choices[i]
            if isinstance(item, Exception):
                self._finished(i, None)
                raise item
            if item is None:
                delta = c.finish()
            else:
                self.first.setdefault(i, time.monotonic())
                delta = c.add(item)
                if delta.finish_reason is not None:  # a stop string: the engine need not go on
                    self.tasks[i].cancel()
                    self.backend.abort(self.sub_id(i))
            if delta.finish_reason is not None:
                self._finished(i, delta.finish_reason)
            yield i, delta

    def usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.req.prompts), sum(len(c.ids) for c in self.choices))

    async def close(self) -> None:
        """Abort every unfinished sequence (frees its blocks); idempotent."""
        if self.closed:
            return
        self.closed = True
        for i, t in self.tasks.items():
            if i not in self.done:
                t.cancel()
                self.backend.abort(self.sub_id(i))
                self._finished(i, None)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def create_app(backend: Backend, *, host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = (),
               api_key: str | None = None, limits: ServeLimits | None = None, metrics_auth: bool = False) -> FastAPI:
    """A FastAPI app over ``backend``. Run it with uvicorn (see :func:`ryzlab.serve.cli`).

    ``host`` is the address the server binds (the Host header must name it; see :mod:`.guard`),
    ``allowed_hosts`` more names it answers to, ``api_key`` the Bearer key ``/v1/*`` needs (and
    ``/metrics``, ``/stats`` with ``metrics_auth``).
    """
    if metrics_auth and api_key is None:
        raise ValueError("metrics_auth needs an api_key (the key /metrics and /stats would ask for)")
    limits = limits or ServeLimits()
    app = FastAPI(title="ryzlab serve", version="0.2.0", docs_url=None, redoc_url=None, openapi_url=None)
    info = ModelInfo.of(backend)
    metrics = ServeMetrics(backend, backend.model_name)
    app.state.metrics = metrics
    app.state.pending = 0
    app.state.pending_by_client = {}  # client address -> its sequences in flight (fair admission)
    app.state.limits = limits  # the server that runs the app reads its connection limits here
    counter = itertools.count()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path[:200]}", kind,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, str(exc.errors())[:500], "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # Answered outside the guard (Starlette's outermost layer): counted here.
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        metrics.answered(500)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        h = backend.health()
        return JSONResponse(json_safe(h), status_code=200 if h.get("healthy") else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(json_safe({**backend.metrics(), **metrics.counts, "pending": app.state.pending}))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        # max_num_seqs: the engine's batch cap as it runs (a benchmark checks its peer got the same);
        # absent where the backend has no single cap (a router over workers)
        cap = getattr(backend, "max_num_seqs", None)
        return JSONResponse({"object": "list", "data": [{
            "id": backend.model_name, "object": "model", "created": CREATED, "owned_by": "ryzlab",
            "root": backend.model_name, "max_model_len": backend.max_model_len,
            **({"max_num_seqs": cap} if isinstance(cap, int) else {})}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, parse_completion, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(request, parse_chat, "chatcmpl")

    async def serve(request: Request, parse: Any, prefix: str) -> Response:
        try:
            req = parse(parse_json(await request.body()), info)
        except RequestError as e:
            return _error(e.status, str(e), e.kind, param=e.param, code=e.code)
        retry = {"Retry-After": str(limits.retry_after_s)}
        h = backend.health()
        if not h.get("healthy"):
            return _error(503, f"the engine cannot take requests now: {h.get('reason', 'unhealthy')}",
                          "service_unavailable", code="unhealthy", headers=retry)
        k = req.num_choices
        share = limits.client_share
        if k > share:  # could never be admitted: a client error, not "retry later"
            return _error(400, f"this request asks for {k} sequences (prompts x n); this server admits at most {share} "
                               f"per client (--max-pending {limits.max_pending}, a quarter kept for other clients)",
                          "invalid_request_error", param="n", code="too_many_sequences")
        client = request.client.host if request.client else "unknown"
        mine = app.state.pending_by_client.get(client, 0)
        if mine + k > share:
            return _error(429, f"this client has {mine} sequences in flight; one client may hold at most {share} of "
                               f"the {limits.max_pending} (the rest is kept for others); retry later",
                          "rate_limit_error", code="client_queue_full", headers=retry)
        if app.state.pending + k > limits.max_pending:
            return _error(429, f"server busy: {app.state.pending} sequences in flight, limit {limits.max_pending}; "
                               f"retry later", "rate_limit_error", code="queue_full", headers=retry)
        app.state.pending += k
        app.state.pending_by_client[client] = mine + k
        rid = f"{prefix}-{next(counter)}"
        job = _Job(backend, rid, req, info.tokenizer, metrics, limits.request_timeout_s)
        fmt = Formatter(req.kind, rid, int(time.time()), backend.model_name, info.tokenizer)
        released = False

        async def release() -> None:
            nonlocal released
            await job.close()
            if not released:
                released = True
                app.state.pending -= k
                left = app.state.pending_by_client.get(client, 0) - k
                if left > 0:
                    app.state.pending_by_client[client] = left
                else:
                    app.state.pending_by_client.pop(client, None)

        job.start()
        if req.stream:
            return _Stream(stream(job, fmt, req), release)
        try:
            return await whole(request, job, fmt)
        finally:
            await release()

    async def whole(request: Request, job: _Job, fmt: Formatter) -> Response:
        async def collect() -> None:
            async for _ in job.events():
                pass

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.create_task(collect())
        watch = asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():  # the client left: abort (the caller's release) and answer nobody
            work.cancel()
            log.info("%s: client disconnected; sequences aborted", job.rid)
            return Response(status_code=499)
        err = work.exception()
        if err is None:
            return JSONResponse(fmt.body(job.choices, job.usage()))
        if isinstance(err, TimeoutError):
            return _error(504, str(err), "timeout_error", code="request_timeout")
        if isinstance(err, ValueError):  # the engine refused the request's input
            return _error(400, str(err), "invalid_request_error")
        if isinstance(err, NoWorkerAvailable):  # every worker down or restarting: retry, nothing is broken
            return _error(503, f"no worker can serve the request now: {err}", "service_unavailable",
                          code="no_worker", headers={"Retry-After": str(limits.retry_after_s)})
        log.warning("request %s failed: %s", job.rid, err)
        return _error(500, f"generation failed: {err}", "server_error")

    async def stream(job: _Job, fmt: Formatter, req: GenerationRequest) -> AsyncIterator[bytes]:
        try:
            if req.kind == "chat":  # the role first, as OpenAI does
                for i in range(req.num_choices):
                    yield _sse(fmt.chunk(i, Delta("", [], None), first=True, with_usage=req.include_usage))
            async for i, delta in job.events():
                # chat chunks carry no token ids: one with nothing new (text held back) is not sent
                if delta.text or delta.finish_reason or delta.logprobs or (req.kind == "completion" and delta.token_ids):
                    yield _sse(fmt.chunk(i, delta, with_usage=req.include_usage))
            if req.include_usage:
                yield _sse(fmt.usage_chunk(job.usage()))
        except Exception as e:  # noqa: BLE001 - the stream ends with an error event; the server stays up
            metrics.stream_failed()
            status, kind = ((504, "timeout_error") if isinstance(e, TimeoutError) else
                            (503, "service_unavailable") if isinstance(e, NoWorkerAvailable) else (500, "server_error"))
            msg = str(e) if status != 500 else f"generation failed: {e}"
            log.warning("streaming request %s failed: %s", job.rid, msg)
            yield _sse(error_body(msg, kind, status))
        yield b"data: [DONE]\n\n"

    app.add_middleware(Guard, allowed_hosts=allowed_hosts_for(host, allowed_hosts), api_key=api_key,
                       max_body_bytes=limits.max_body_bytes, body_timeout_s=limits.body_timeout_s,
                       on_answer=metrics.answered, metrics_auth=metrics_auth)
    return app
