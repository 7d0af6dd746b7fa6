"""Clients the load generator drives over HTTP: any OpenAI-compatible endpoint.

(The in-process client of an engine or router, ``backend_client``, and ``serve_in_thread`` are
server-side: :mod:`ryzlab.serve.local`.)

* :func:`openai_client` — any OpenAI-compatible ``/v1`` endpoint (vLLM, SGLang, llama.cpp,
  ``ryzlab serve``, the transformers peer) over HTTP with *text* prompts, after
  :func:`probe_endpoint` has learnt how many of the server's tokens a prompt word is, whether
  streams report ``usage``, and which output-length controls (``ignore_eos``, ``min_tokens``)
  the server accepts;
* :func:`serve_subprocess` — run a server command (:func:`server_argv`) for a ``with`` block.

Token counting is the server's, never a guess from chunks when the server says: ``usage``
(asked for with ``stream_options.include_usage``), else ``token_ids`` in the chunks (ryzlab,
vLLM with ``return_token_ids``), else one token per chunk -- that fallback is logged once and
recorded in every row (``count_source='chunks'``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Literal, get_args

from ryzlab.config import check_choice
from ryzlab.loadgen.load import Client, RequestSpec
from ryzlab.loadgen.metrics import Usage

__all__ = ["openai_client", "http_client", "probe_endpoint", "served_models", "EndpointProfile",
           "prompt_text", "APIS", "serve_subprocess", "free_port", "server_argv", "ENGINES"]

Api = Literal["completions", "chat"]
APIS: tuple[str, ...] = get_args(Api)
Engine = Literal["ryzlab", "transformers"]
ENGINES: tuple[str, ...] = get_args(Engine)
"""Engines a benchmark can start: ryzlab's, or transformers' continuous batching (the peer)."""

# Common three-letter English words: one token each (with the leading space) in the BPE
# vocabularies of Llama, SmolLM, Qwen and GPT-2, and exactly four in a byte-level one, so a
# prompt's token count is linear in its word count with a constant slope; the probe measures it.
WORDS = tuple("""the and for are but not you all any can had her was one our out day get has him his how man new
now old see two way who boy did its let put say she too use end far few got run sun top yes big
red cat dog car box sea air art bad bed job law war age act arm eye leg map oil key fun set ask
try own why win men buy cut lot low hot""".split())

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointProfile:
    """What :func:`probe_endpoint` learnt about a server (recorded beside every run's summary)."""

    url: str
    model: str
    api: str
    tokens_per_word: float
    """Server tokens per prompt word (slope of usage.prompt_tokens over two prompt sizes)."""
    prompt_overhead_tokens: float
    """Tokens a prompt costs beyond its words (BOS, chat template; -1 for a byte-level vocabulary:
    the first word has no leading space)."""
    prompt_count: str
    """``usage``: prompt sizes fitted to the server's counts; ``assumed``: no usage, 1 token/word."""
    stream_usage: bool
    """The server sends ``usage`` in streams when asked (``stream_options.include_usage``)."""
    length_fields: tuple[str, ...]
    """Output-length controls the server accepted, of ``ignore_eos`` and ``min_tokens``."""
    length_controlled: bool
    """A probe asking for exactly 4 tokens got 4 (per request: ``output_tokens`` vs target)."""

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint": self.url, "served_model": self.model, "api": self.api,
                "tokens_per_word": self.tokens_per_word, "prompt_overhead_tokens": self.prompt_overhead_tokens,
                "prompt_count": self.prompt_count, "stream_usage": self.stream_usage,
                "length_fields": ",".join(self.length_fields) or "none", "length_controlled": self.length_controlled}


def prompt_text(prompt: tuple[int, ...] | list[int], target_tokens: int, profile: EndpointProfile | None) -> str:
    """Words standing for ``prompt``'s ids, as many as make ``target_tokens`` server tokens.

    The same ids give the same words, so a shared token prefix stays a shared text prefix.
    """
    tpw = profile.tokens_per_word if profile else 1.0
    over = profile.prompt_overhead_tokens if profile else 0.0
    n = max(1, round((target_tokens - over) / tpw))
    ids = list(prompt) or [0]
    return " ".join(WORDS[ids[i % len(ids)] % len(WORDS)] for i in range(n))


def _body(api: str, model: str, text: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def _path(api: str) -> str:
    return "/chat/completions" if api == "chat" else "/completions"


def _error_text(status: int, raw: bytes) -> str:
    try:
        err = json.loads(raw)
        msg = err["error"]["message"] if isinstance(err.get("error"), dict) else err.get("detail", err)
    except (ValueError, KeyError, TypeError, AttributeError):
        msg = raw.decode(errors="replace")
    return f"HTTP {status}: {str(msg)[:300]}"


def _length_extra(fields: tuple[str, ...], max_tokens: int) -> dict[str, Any]:
    return {k: v for k, v in (("ignore_eos", True), ("min_tokens", max_tokens)) if k in fields}


def probe_endpoint(url: str, model: str, *, api: str = "completions", timeout_s: float = 120.0,
                   api_key: str | None = None) -> EndpointProfile:
    """Ask the server a few small questions before any load (each is one short request).

    1. Which of ``ignore_eos`` / ``min_tokens`` it accepts (a 4xx naming them drops them).
    2. Prompt tokens of a 16- and an 80-word prompt (``usage.prompt_tokens``): tokens per word.
    3. Whether a stream with ``stream_options.include_usage`` ends with ``usage``.

    Raises ``ValueError`` when the endpoint cannot be reached or rejects a plain completion.
    """
    import httpx

    check_choice("api", api, APIS)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers) as http:
        def post(body: dict[str, Any]) -> tuple[int, Any]:
            try:
                r = http.post(_path(api), json=body)
            except httpx.HTTPError as e:
                raise ValueError(f"endpoint {url!r} is not reachable ({type(e).__name__}: {e}); expected an "
                                 f"OpenAI-compatible base URL such as http://127.0.0.1:8000/v1") from None
            try:
                return r.status_code, r.json()
            except ValueError:
                return r.status_code, r.content

        fields: tuple[str, ...] = ("ignore_eos", "min_tokens")
        words16 = " ".join(WORDS[:16])
        while True:
            status, ans = post(_body(api, model, words16, 4, _length_extra(fields, 4)))
            if status == 200 or not fields or status >= 500:
                break
            said = json.dumps(ans) if isinstance(ans, (dict, list)) else ans.decode(errors="replace")
            named = [f for f in fields if f in said]  # the fields the error names, else the last one
            log.info("endpoint refused %s (HTTP %s); retrying without %s", fields, status, named or fields[-1:])
            fields = tuple(f for f in fields if f not in named) if named else fields[:-1]
        if status != 200:
            raise ValueError(f"endpoint {url!r} rejected a plain {api} request for model {model!r}: "
                             f"{_error_text(status, ans if isinstance(ans, bytes) else json.dumps(ans).encode())}")
        usage = ans.get("usage") if isinstance(ans, dict) else None
        controlled = bool(usage) and usage.get("completion_tokens") == 4
        p16 = usage.get("prompt_tokens") if usage else None
        p80 = None
        if p16 is not None:
            status, ans80 = post(_body(api, model, " ".join(WORDS[i % len(WORDS)] for i in range(80)), 1,
                                       _length_extra(fields, 1)))
            p80 = (ans80.get("usage") or {}).get("prompt_tokens") if status == 200 and isinstance(ans80, dict) else None
        if p16 is not None and p80 is not None and p80 > p16:
            tpw = (p80 - p16) / 64.0
            over = p16 - 16 * tpw  # may be < 0: the first word has no leading space
            count = "usage"
        else:
            log.warning("endpoint %s reports no usage.prompt_tokens: prompt sizes assume 1 token per word "
                        "(the rows record the target, not the true count)", url)
            tpw, over, count = 1.0, 0.0, "assumed"
        stream_usage = False
        try:
            with http.stream("POST", _path(api), json={**_body(api, model, words16, 2, _length_extra(fields, 2)),
                                                       "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
                for line in r.iter_lines():
                    event = _sse_event(line)
                    if isinstance(event, dict) and event.get("usage"):
                        stream_usage = True
        except httpx.HTTPError as e:
            log.warning("endpoint %s: streaming probe failed (%s)", url, e)
    if not stream_usage:
        log.warning("endpoint %s sends no usage in streams: output tokens are counted from token_ids in the "
                    "chunks, or as one per chunk where there are none (count_source says which)", url)
    return EndpointProfile(url=url, model=model, api=api, tokens_per_word=tpw, prompt_overhead_tokens=over,
                           prompt_count=count, stream_usage=stream_usage, length_fields=fields,
                           length_controlled=controlled)


def _sse_event(line: str) -> Any:
    """The JSON of one ``data:`` line (None for other lines, ``"[DONE]"`` at the end)."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        return json.loads(data)
    except ValueError:
        raise RuntimeError(f"server sent a non-JSON event: {data[:120]!r}") from None


def openai_client(profile: EndpointProfile, *, timeout_s: float = 300.0, api_key: str | None = None) -> Client:
    """Stream each request from an OpenAI-compatible endpoint (``profile`` from :func:`probe_endpoint`).

    Yields 1 (or ``len(token_ids)``) per chunk that carries output, then a
    :class:`~ryzlab.loadgen.metrics.Usage` naming where the counts came from.
    """
    import httpx

    state: dict[str, Any] = {}
    path = _path(profile.api)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def client(req: RequestSpec) -> AsyncIterator[int | Usage]:
        if "http" not in state:  # one connection pool per event loop
            state["http"] = httpx.AsyncClient(base_url=profile.url.rstrip("/"), timeout=timeout_s, headers=headers,
                                              limits=httpx.Limits(max_connections=None))
        text = prompt_text(req.prompt, len(req.prompt), profile)
        body = {**_body(profile.api, profile.model, text, req.max_tokens,
                        _length_extra(profile.length_fields, req.max_tokens)), "stream": True}
        if profile.stream_usage:
            body["stream_options"] = {"include_usage": True}
        usage: dict[str, Any] | None = None
        by_ids = True
        async with state["http"].stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(_error_text(resp.status_code, await resp.aread()))
            async for line in resp.aiter_lines():
                event = _sse_event(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                if "error" in event:
                    err = event["error"]
                    raise RuntimeError(err.get("message", err) if isinstance(err, dict) else err)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    ids = choice.get("token_ids")
                    if ids:
                        yield len(ids)
                        continue
                    piece = choice.get("text") if profile.api == "completions" else (
                        (choice.get("delta") or {}).get("content"))
                    if piece:
                        by_ids = False
                        yield 1
        if usage and usage.get("completion_tokens") is not None:
            yield Usage(usage.get("prompt_tokens"), int(usage["completion_tokens"]), "usage")
        elif by_ids:
            yield Usage(usage.get("prompt_tokens") if usage else None, None, "token_ids")
        else:
            if not state.get("warned"):
                state["warned"] = True
                log.warning("no usage and no token_ids from %s: output tokens counted as one per chunk "
                            "(count_source='chunks')", profile.url)
            yield Usage(usage.get("prompt_tokens") if usage else None, None, "chunks")

    return client


def served_models(url: str, *, timeout_s: float = 30.0, api_key: str | None = None) -> list[str]:
    """Model ids a ``/v1`` endpoint lists (``GET /v1/models``); ValueError when it cannot say."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/models", timeout=timeout_s, headers=headers)
        ids = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"endpoint {url!r}: GET /models failed ({type(e).__name__}: {e}); "
                         f"pass the model name") from None
    if not ids:
        raise ValueError(f"endpoint {url!r}: GET /models listed no model ({r.status_code}); pass the model name")
    return ids


def http_client(base_url: str, *, model: str | None = None, timeout_s: float = 120.0) -> Client:
    """:func:`openai_client` for a server root (``http://host:port``, ``/v1`` added), probed first."""
    url = base_url.rstrip("/") + "/v1"
    return openai_client(probe_endpoint(url, model or served_models(url)[0], timeout_s=timeout_s),
                         timeout_s=timeout_s)


def server_argv(engine: str, *, model: str, port: int, threads: int | None = None, block_size: int = 16,
                num_blocks: int = 1024, max_num_seqs: int = 16, max_model_len: int = 1024) -> list[str]:
    """Command line of a one-engine server on ``port``: ``ryzlab`` (``ryzlab serve``) or
    ``transformers`` (:mod:`ryzlab.serve.peer`), with the same model, cache geometry and batch cap
    (``max_num_seqs``: ryzlab's scheduler cap, the peer's ``max_requests_per_batch``)."""
    import sys

    check_choice("engine", engine, ENGINES)
    if engine == "ryzlab":
        argv = [sys.executable, "-m", "ryzlab", "serve", "--model", model, "--port", str(port),
                "--block-size", str(block_size), "--num-blocks", str(num_blocks), "--max-num-seqs", str(max_num_seqs),
                "--max-model-len", str(max_model_len)]
    else:
        argv = [sys.executable, "-m", "ryzlab.serve.peer", "--model", model, "--port", str(port),
                "--block-size", str(block_size), "--num-blocks", str(num_blocks),
                "--max-batch-tokens", str(max(256, max_num_seqs)), "--max-num-seqs", str(max_num_seqs),
                "--max-model-len", str(max_model_len)]
    return argv + (["--threads", str(threads)] if threads else [])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS calls free now (for a server in another process; it could be taken
    before that process binds it, in which case the server fails to start and says so)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(argv: list[str], *, port: int, host: str = "127.0.0.1", startup_timeout_s: float = 600.0,
                     env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server command (``argv`` already listening on ``host:port``) in its own process
    group for the ``with`` block; yield its ``/v1`` URL once ``GET /v1/models`` answers.

    The group is killed on exit (SIGTERM, then SIGKILL), so nothing outlives the block.
    """
    import os
    import signal
    import subprocess
    import tempfile

    import httpx

    url = f"http://{host}:{port}/v1"
    log_file = tempfile.TemporaryFile()
    from pathlib import Path

    # the child imports this very ryzlab, whether or not it is installed
    root = str(Path(__file__).resolve().parents[2])
    pypath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": pypath, **(env or {})})
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"server {argv[:4]}... exited with {proc.returncode} before answering:\n"
                                   + log_file.read().decode(errors="replace")[-2000:])
            try:
                if httpx.get(url + "/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {argv[:4]}... did not answer within {startup_timeout_s:g} s")
            time.sleep(0.2)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        log_file.close()

