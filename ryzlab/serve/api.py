"""HTTP API: OpenAI-style ``/v1/completions`` (streaming via SSE), ``/health``, ``/metrics``.

The app serves any *backend* with the small interface below: an in-process
:class:`~ryzlab.serve.engine.AsyncEngine` (one worker) or a :class:`~ryzlab.serve.router.Router`
over worker processes. Input is validated before any work starts (4xx with the reason); a
request that fails inside the engine gets an error answer and never takes the server down;
a client that disconnects mid-stream has its request aborted, which frees its KV blocks.

``/health`` reports real progress: it is 503 when the engine has work but has not finished a
step within its stall timeout (a hung model, a dead worker), not merely when the process
stops answering.
"""
from __future__ import annotations

import itertools
import json
import math
import logging
import time
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import check_choice

__all__ = ["create_app", "Backend", "CompletionParams", "RequestError", "validate_completion"]

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client error: answered with ``status`` (4xx) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Backend(Protocol):
    """What the API needs from an engine or a router."""

    vocab_size: int
    max_model_len: int
    model_name: str

    def generate(self, request_id: str, prompt: list[int], params: "CompletionParams") -> AsyncIterator[list[int]]:
        """Yield lists of new token ids as they are produced; raise on failure."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (idempotent)."""

    def health(self) -> dict[str, Any]:
        """``{"healthy": bool, "reason": str, ...}``."""

    def metrics(self) -> dict[str, Any]:
        """Flat dict of numbers (kv_cache_usage_perc, preemptions, prefix_cache_hit_rate, ...)."""


class CompletionParams:
    """Validated sampling parameters of one request."""

    __slots__ = ("max_tokens", "temperature", "seed", "stop_token_ids", "ignore_eos")

    def __init__(self, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = True):
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.stop_token_ids = stop_token_ids
        self.ignore_eos = ignore_eos


COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "stream", "seed", "stop_token_ids",
                     "ignore_eos", "n", "stream_options", "user")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_completion(body: Any, *, vocab_size: int, max_model_len: int, tokenizer: Any = None
                        ) -> tuple[list[int], CompletionParams, bool]:
    """Check a ``/v1/completions`` body -> (prompt token ids, params, stream).

    ``prompt`` is a string (encoded by the model's ``tokenizer``; UTF-8 bytes without one: the
    reference model is byte-level) or a list of token ids. Raises :class:`RequestError` (400)
    naming the field and what is valid.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(body) - set(COMPLETION_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; valid fields: {', '.join(COMPLETION_FIELDS)}")
    if "prompt" not in body:
        raise RequestError("missing field 'prompt' (a string or a list of token ids)")
    prompt = body["prompt"]
    if isinstance(prompt, str) and tokenizer is not None:
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, str):
        ids = list(prompt.encode("utf-8"))
        if vocab_size < 256:
            raise RequestError(f"string prompts need a byte-level vocabulary (256); this model has "
                               f"{vocab_size}: send a list of token ids")
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt token ids must be in [0, {vocab_size}); got {bad[:5]}")
    else:
        raise RequestError("'prompt' must be a string or a list of integer token ids")
    if not ids:
        raise RequestError("'prompt' is empty; it needs at least one token")
    max_tokens = body.get("max_tokens", 16)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}")
    if len(ids) + max_tokens > max_model_len:
        raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"maximum length {max_model_len}")
    temperature = body.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number in [0, 2], got {temperature!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer or null, got {seed!r}")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(f"'n' must be 1 (one completion per request), got {n!r}")
    stop = body.get("stop_token_ids", [])
    if not isinstance(stop, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in stop):
        raise RequestError(f"'stop_token_ids' must be a list of token ids in [0, {vocab_size})")
    ignore_eos = body.get("ignore_eos", True)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"'ignore_eos' must be true or false, got {ignore_eos!r}")
    if not ignore_eos and tokenizer is not None:  # stop at the model's end-of-sequence tokens too
        stop = list(stop) + [t for t in getattr(tokenizer, "eos_token_ids", ()) if t not in stop]
    return ids, CompletionParams(max_tokens=max_tokens, temperature=float(temperature), seed=seed,
                                 stop_token_ids=tuple(stop), ignore_eos=ignore_eos), stream


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


def _text(ids: list[int], backend: Any) -> str:
    tok = getattr(backend, "tokenizer", None)
    if tok is not None:
        return tok.decode(ids)
    return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace") if backend.vocab_size <= 256 else ""


def create_app(backend: Backend):
    """A FastAPI app over ``backend``. Run it with uvicorn (see :func:`ryzlab.serve.cli`)."""
    app = FastAPI(title="ryzlab serve", version="0.1.0")
    counter = itertools.count()
    stats = {"http_requests": 0, "http_errors_4xx": 0, "http_errors_5xx": 0}

    def error(status: int, message: str, kind: str) -> JSONResponse:
        stats["http_errors_4xx" if status < 500 else "http_errors_5xx"] += 1
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/health")
    async def health() -> JSONResponse:
        h = backend.health()
        return JSONResponse(json_safe(h), status_code=200 if h.get("healthy") else 503)

    @app.get("/metrics")
    async def metrics() -> JSONResponse:
        return JSONResponse(json_safe({**backend.metrics(), **stats}))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": backend.model_name, "object": "model",
                                                          "max_model_len": backend.max_model_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request):
        stats["http_requests"] += 1
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"request body is not valid JSON: {e}", "invalid_request_error")
        try:
            ids, params, stream = validate_completion(body, vocab_size=backend.vocab_size,
                                                      max_model_len=backend.max_model_len,
                                                      tokenizer=getattr(backend, "tokenizer", None))
            check_choice("model", body.get("model", backend.model_name), (backend.model_name,))
        except ValueError as e:
            return error(getattr(e, "status", 400), str(e), "invalid_request_error")
        rid = f"cmpl-{next(counter)}"
        created = int(time.time())

        def chunk(tokens: list[int], finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": backend.model_name,
                    "choices": [{"index": 0, "text": _text(tokens, backend), "token_ids": tokens,
                                 "finish_reason": finish}]}

        if not stream:
            out: list[int] = []
            try:
                async for toks in backend.generate(rid, ids, params):
                    out.extend(toks)
            except Exception as e:  # noqa: BLE001 - one failed request answers 500; the server stays up
                log.warning("request %s failed: %s", rid, e)
                return error(500, f"generation failed: {e}", "server_error")
            finally:
                backend.abort(rid)  # no-op when finished; frees blocks if the client went away
            body = chunk(out, "length" if len(out) >= params.max_tokens else "stop")
            body["usage"] = {"prompt_tokens": len(ids), "completion_tokens": len(out),
                             "total_tokens": len(ids) + len(out)}
            return JSONResponse(body)

        async def events() -> AsyncIterator[bytes]:
            n = 0
            try:
                async for toks in backend.generate(rid, ids, params):
                    n += len(toks)
                    yield f"data: {json.dumps(chunk(toks, None))}\n\n".encode()
                yield f"data: {json.dumps(chunk([], 'length' if n >= params.max_tokens else 'stop'))}\n\n".encode()
            except Exception as e:  # noqa: BLE001 - the stream ends with an error event, server stays up
                log.warning("streaming request %s failed: %s", rid, e)
                stats["http_errors_5xx"] += 1
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n".encode()
            finally:
                # Runs on normal end and when the client disconnects (the generator is closed).
                backend.abort(rid)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
