"""OpenAI's request bodies, checked: ``/v1/completions`` and ``/v1/chat/completions`` -> a
:class:`GenerationRequest` (token ids per prompt, :class:`SamplingParams`, stop strings, ...).

Every check happens before any work: a bad body is a :class:`RequestError` (4xx, naming the
field and what is valid). Sizes are checked before anything is expanded (a token list's length
before its ids, a string's length against what ``max_model_len`` tokens can span before it is
tokenized). Fields OpenAI defines that ryzlab does not implement are accepted at their neutral
value and rejected otherwise (never silently ignored); fields nobody defines are ignored with
a logged warning, as vLLM does.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from ryzlab.serve.sampling import INT64, MAX_LOGPROBS, SamplingParams

__all__ = ["RequestError", "CompletionParams", "GenerationRequest", "ModelInfo", "parse_json", "parse_completion",
           "parse_chat", "MAX_CHOICES", "MAX_STOP", "MAX_LOGPROB_ENTRIES"]

log = logging.getLogger(__name__)

CompletionParams = SamplingParams
"""The parameters the API hands to ``backend.generate``: the engine's own frozen dataclass."""

MAX_CHOICES = 64
"""Prompts x n of one request at most (each is a sequence in the engine)."""
MAX_STOP = 16
"""Stop strings per request at most."""
MAX_MESSAGES = 1024
MAX_LOGPROB_ENTRIES = 1 << 16
"""Sequences x max_tokens x (1 + logprobs) of one request at most: each entry costs ~50 bytes of
response, so a 59-byte body (n 64, logprobs 20, max_tokens 100) no longer asks for 6.4 MB."""

COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
                 "seed", "user", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
                 "logit_bias", "logprobs", "min_tokens")
COMPLETION_FIELDS = COMMON_FIELDS + ("prompt", "echo", "suffix", "best_of")
CHAT_FIELDS = COMMON_FIELDS + ("messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "response_format", "parallel_tool_calls")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(ValueError):
    """A client error, answered with ``status`` and OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


@dataclass(frozen=True)
class ModelInfo:
    """What parsing needs to know about the served model."""

    model_name: str
    vocab_size: int
    max_model_len: int
    tokenizer: Any
    """None: only token-id prompts (no text, no chat)."""
    max_token_chars: int = 1
    """The longest vocabulary entry in characters: a text longer than max_model_len times this
    is surely too long, checked before tokenizing it."""

    @classmethod
    def of(cls, backend: Any) -> "ModelInfo":
        from ryzlab.models.tokenizer import ByteTokenizer

        tok = getattr(backend, "tokenizer", None)
        if tok is None and backend.vocab_size == 256:
            tok = ByteTokenizer()  # the byte-level reference model
        longest = 1
        inner = getattr(tok, "tokenizer", None)
        if inner is not None and hasattr(inner, "get_vocab"):
            longest = max((len(t) for t in inner.get_vocab(with_added_tokens=True)), default=1)
        return cls(backend.model_name, backend.vocab_size, backend.max_model_len, tok, max(1, longest))


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: one engine sequence per (prompt, sample) pair."""

    kind: Literal["completion", "chat"]
    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    model: str

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def choice(self, index: int) -> tuple[tuple[int, ...], SamplingParams]:
        """Prompt and params of choice ``index`` (OpenAI's order: prompt-major, then sample).
        Sample j of a seeded request uses seed + j, so the n samples differ yet repeat."""
        prompt, j = self.prompts[index // self.n], index % self.n
        params = self.params
        if j and params.seed is not None:
            params = replace(params, seed=(params.seed + j - INT64[0]) % 2 ** 64 + INT64[0])
        return prompt, params


def _reject_constant(name: str) -> Any:
    raise RequestError(f"request body contains {name}, which is not valid JSON (use a finite number)")


def parse_json(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object, or a :class:`RequestError`: invalid JSON, NaN/Infinity, integers
    past Python's 4300-digit limit, nesting deep enough to exhaust the parser's recursion."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digits limit, bad UTF-8
        raise RequestError(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return abs(x) < 10 ** 300 if isinstance(x, int) else math.isfinite(x)  # a huge int overflows float()


def _int(body: dict[str, Any], name: str, default: Any, lo: int, hi: int | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise RequestError(f"'{name}' must be {rng}, got {_short(v)}", param=name)
    return v


def _num(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        raise RequestError(f"'{name}' must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {_short(v)}",
                           param=name)
    return float(v)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be true or false, got {_short(v)}", param=name)
    return v


def _short(v: Any) -> str:
    """A bounded repr for messages (an int of 4000 digits is not echoed whole)."""
    if _is_int(v) and abs(v) > 10 ** 30:
        return "an integer of more than 30 digits"
    r = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return r if len(r) <= 60 else r[:57] + "..."


def _check_unknown(body: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [k for k in body if k not in valid]
    if unknown:
        names = [k[:40] for k in unknown[:10]]
        log.warning("%s: ignoring unknown field(s) %s%s", where, names, " ..." if len(unknown) > 10 else "")


def _unsupported(body: dict[str, Any], name: str, neutral: tuple[Any, ...]) -> None:
    v = body.get(name)
    if v is not None and not any(v == x and type(v) is type(x) for x in neutral):
        raise RequestError(f"'{name}' is not supported by ryzlab serve (allowed: "
                           f"{' or '.join(json.dumps(x) for x in neutral) or 'absent'}), got {_short(v)}", param=name)


def _unicode(text: str, where: str, param: str) -> str:
    """``text`` if it is valid Unicode: JSON's ``\\ud800`` escape decodes to a lone surrogate, which
    no tokenizer can encode (and no UTF-8 response can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{where} holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}): "
                           f"not valid Unicode text; send a paired surrogate or the character itself",
                           param=param) from None
    return text


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings "
                           f"(<= 256 characters each)", param="stop")
    for s in stop:
        _unicode(s, "'stop'", "stop")
    return tuple(dict.fromkeys(stop))


def _text_ids(text: str, info: ModelInfo, param: str, *, special: bool = True) -> list[int]:
    if info.tokenizer is None:
        raise RequestError(f"this model ({info.model_name}) has no tokenizer: send '{param}' as token ids",
                           param=param)
    _unicode(text, f"'{param}'", param)
    if len(text) > info.max_model_len * info.max_token_chars:
        raise RequestError(f"'{param}' has {len(text)} characters: more than the model's maximum length "
                           f"{info.max_model_len} tokens can hold", param=param)
    ids = list(info.tokenizer.encode(text, add_special_tokens=special))
    if info.vocab_size < getattr(info.tokenizer, "vocab_size", 0) and any(t >= info.vocab_size for t in ids):
        raise RequestError(f"'{param}' encodes to ids outside this model's vocabulary [0, {info.vocab_size}): "
                           f"send token ids", param=param)
    return ids


def _token_ids(ids: list[Any], info: ModelInfo, param: str) -> list[int]:
    if len(ids) > info.max_model_len:  # length first: nothing bigger than the model is looked at
        raise RequestError(f"'{param}' has {len(ids)} tokens, more than the model's maximum length "
                           f"{info.max_model_len}", param=param)
    if not all(_is_int(t) and 0 <= t < info.vocab_size for t in ids):
        raise RequestError(f"'{param}' token ids must be integers in [0, {info.vocab_size})", param=param)
    return ids


def _prompts(body: dict[str, Any], info: ModelInfo) -> list[list[int]]:
    if "prompt" not in body:
        raise RequestError("missing field 'prompt' (a string, a list of strings, a list of token ids or a list "
                           "of such lists)", param="prompt")
    p = body["prompt"]
    if isinstance(p, str):
        items: list[Any] = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p[:1]):
        items = [p]  # one prompt of token ids
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                           "token-id lists (none of them empty)", param="prompt")
    if len(items) > MAX_CHOICES:
        raise RequestError(f"'prompt' holds {len(items)} prompts; at most {MAX_CHOICES} per request", param="prompt")
    out = []
    for x in items:
        ids = _text_ids(x, info, "prompt") if isinstance(x, str) else _token_ids(x, info, "prompt")
        if not ids:
            raise RequestError("'prompt' is empty; it needs at least one token", param="prompt")
        out.append(ids)
    return out


def _content(m: dict[str, Any], i: int) -> str:
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return _unicode(c, f"messages[{i}].content", "messages")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return _unicode("".join(p["text"] for p in c), f"messages[{i}].content", "messages")
    raise RequestError(f"messages[{i}].content must be a string or a list of {{'type': 'text', 'text': ...}} parts "
                       f"(ryzlab serves text only)", param="messages")


def _chat_prompt(body: dict[str, Any], info: ModelInfo) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise RequestError(f"'messages' must be a non-empty list of at most {MAX_MESSAGES} {{'role', 'content'}} "
                           f"objects", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise RequestError(f"messages[{i}] needs a 'role', one of {', '.join(CHAT_ROLES)}", param="messages")
        clean.append({"role": m["role"], "content": _content(m, i)})
    tok = info.tokenizer
    if tok is None or not hasattr(tok, "render_chat"):
        raise RequestError(f"this model ({info.model_name}) has no tokenizer, so no chat template: "
                           f"use /v1/completions with token ids", param="messages")
    if sum(len(m["content"]) for m in clean) > info.max_model_len * info.max_token_chars:
        raise RequestError(f"'messages' are longer than the model's maximum length {info.max_model_len} tokens "
                           f"can hold", param="messages")
    try:
        text = tok.render_chat(clean, add_generation_prompt=True)
    except ValueError as e:  # no template
        raise RequestError(str(e), param="messages") from None
    except Exception as e:  # noqa: BLE001 - the template rejected the conversation (raise_exception, ...)
        raise RequestError(f"the model's chat template rejected these messages: {str(e)[:300]}",
                           param="messages") from None
    ids = _text_ids(text, info, "messages", special=False)
    if not ids:
        raise RequestError("'messages' render to an empty prompt", param="messages")
    return ids


def _common(body: dict[str, Any], info: ModelInfo, prompts: list[list[int]], *, max_tokens: Any,
            logprobs: int | None) -> tuple[SamplingParams, int, bool, bool, tuple[str, ...]]:
    model = body.get("model", info.model_name)
    if model != info.model_name:
        raise RequestError(f"The model {_short(model)} does not exist; choose one of: {info.model_name}",
                           status=404, param="model", code="model_not_found", kind="not_found_error")
    for name, neutral in (("presence_penalty", (0, 0.0)), ("frequency_penalty", (0, 0.0)), ("logit_bias", ({},))):
        _unsupported(body, name, neutral)
    longest = max(len(p) for p in prompts)
    if max_tokens is None:  # chat without a limit: as much as the model's length allows (vLLM)
        max_tokens = info.max_model_len - longest
        if max_tokens < 1:
            raise RequestError(f"the prompt ({longest} tokens) leaves no room to generate within the model's "
                               f"maximum length {info.max_model_len}", param="messages")
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be an integer >= 1, got {_short(max_tokens)}", param="max_tokens")
    if longest + max_tokens > info.max_model_len:
        raise RequestError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's maximum "
                           f"length {info.max_model_len}", param="max_tokens")
    temperature = _num(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", 0, -1, info.vocab_size)
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and INT64[0] <= seed <= INT64[1]):
        raise RequestError(f"'seed' must be an integer in [-2**63, 2**63 - 1] or null, got {_short(seed)}",
                           param="seed")
    n = _int(body, "n", 1, 1, MAX_CHOICES)
    if n * len(prompts) > MAX_CHOICES:
        raise RequestError(f"prompts ({len(prompts)}) x n ({n}) = {n * len(prompts)} sequences; at most "
                           f"{MAX_CHOICES} per request", param="n")
    if logprobs is not None:
        entries = n * len(prompts) * max_tokens * (1 + logprobs)
        if entries > MAX_LOGPROB_ENTRIES:
            raise RequestError(f"sequences ({n * len(prompts)}) x max_tokens ({max_tokens}) x (1 + logprobs "
                               f"{logprobs}) = {entries} logprob entries; a response holds at most "
                               f"{MAX_LOGPROB_ENTRIES} (lower n, max_tokens or logprobs)", param="logprobs")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed with stream: true", param="stream_options")
        if not isinstance(opts, dict):
            raise RequestError("'stream_options' must be an object like {\"include_usage\": true}",
                               param="stream_options")
        include_usage = _bool(opts, "include_usage", False)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or len(stop_ids) > 256 or not all(
            _is_int(t) and 0 <= t < info.vocab_size for t in stop_ids):
        raise RequestError(f"'stop_token_ids' must be a list of token ids in [0, {info.vocab_size})",
                           param="stop_token_ids")
    # min_tokens (vLLM's): no EOS / stop_token_ids before that many tokens. Exact when it covers max_tokens
    # (what load generators send: then no stop token at all); in between would need the engine's step loop
    min_tokens, ignore_eos = _int(body, "min_tokens", 0, 0), _bool(body, "ignore_eos", False)
    if 0 < min_tokens < max_tokens:
        raise RequestError(f"'min_tokens' must be 0 or >= max_tokens ({max_tokens}) in ryzlab serve, got "
                           f"{min_tokens} (use ignore_eos to run to max_tokens)", param="min_tokens")
    if min_tokens:
        stop_ids = []
    elif not ignore_eos and info.tokenizer is not None:  # stop at end-of-sequence too
        stop_ids = stop_ids + [t for t in getattr(info.tokenizer, "eos_token_ids", ()) if t not in stop_ids
                               and t < info.vocab_size]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(0, top_k),
                            seed=seed, stop_token_ids=tuple(stop_ids), logprobs=logprobs)
    return params, n, stream, include_usage, _stop(body)


def parse_completion(body: dict[str, Any], info: ModelInfo) -> GenerationRequest:
    """A ``/v1/completions`` body -> :class:`GenerationRequest` (or :class:`RequestError`)."""
    _check_unknown(body, COMPLETION_FIELDS, "/v1/completions")
    prompts = _prompts(body, info)
    _unsupported(body, "echo", (False,))
    _unsupported(body, "suffix", ("",))
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = body.get("max_tokens")
    params, n, stream, usage, stop = _common(body, info, prompts, max_tokens=16 if max_tokens is None else max_tokens,
                                             logprobs=logprobs)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError(f"'best_of' is not supported by ryzlab serve (omit it or set it to n={n})",
                           param="best_of")
    return GenerationRequest("completion", tuple(map(tuple, prompts)), params, n, stream, usage, stop,
                             info.model_name)


def parse_chat(body: dict[str, Any], info: ModelInfo) -> GenerationRequest:
    """A ``/v1/chat/completions`` body -> :class:`GenerationRequest` (the model's chat template)."""
    _check_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
    _unsupported(body, "tools", ([],))
    _unsupported(body, "tool_choice", ("none",))
    _unsupported(body, "response_format", ({"type": "text"},))
    prompt = _chat_prompt(body, info)
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if body.get("top_logprobs") is not None and not want:
        raise RequestError("'top_logprobs' needs logprobs: true", param="top_logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params, n, stream, usage, stop = _common(body, info, [prompt], max_tokens=max_tokens,
                                             logprobs=top if want else None)
    return GenerationRequest("chat", (tuple(prompt),), params, n, stream, usage, stop, info.model_name)
