"""OpenAI response bodies from token streams: incremental detokenization, stop strings, logprobs.

:class:`ChoiceText` turns one sequence's token chunks into text deltas. Decoding is incremental
(vLLM's prefix/read offsets): each chunk decodes only the ids since the last settled point plus
the ids just before it as context, and appends the difference, so a chunk costs the same at
token 10 and token 8000 (decoding the whole output at every chunk grew with its length: ~150 us
per token at 1000 tokens for SmolLM2's tokenizer, on the API's thread beside the engine). Where a
tokenizer's window decode is not a suffix of its full decode, that chunk decodes the whole output.
Text is held back while it could still change: a trailing U+FFFD (a multi-byte character cut between tokens), and
the last ``len(longest stop) - 1`` characters (they may start a stop string). A stop string ends
the choice: the text stops before it (OpenAI's rule) and the caller aborts the sequence.
:class:`Formatter` writes OpenAI's completion and chat shapes, streamed or whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ChoiceText", "Delta", "Formatter", "usage"]

Logprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass
class Delta:
    """What one chunk added to a choice."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None
    finish_reason: str | None = None


@dataclass
class ChoiceText:
    """One choice's tokens -> text, stopping at the first stop string."""

    index: int
    tokenizer: Any
    stop: tuple[str, ...] = ()
    want_logprobs: bool = False
    ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    text: str = ""
    """Text emitted so far."""
    finish_reason: str | None = None
    engine_reason: str | None = None
    """Why the backend ended the sequence (``stop``/``length``), from the last chunk it sent."""
    _settled: str = field(default="", init=False, repr=False)
    """Decoded text of ``ids[:_read]`` (a complete character at its end)."""
    _prefix: int = field(default=0, init=False, repr=False)
    """First id of the context window decoded with the new ids."""
    _read: int = field(default=0, init=False, repr=False)

    def _dec(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode(self) -> str:
        """The text of every id so far (as one decode of them all), from a window of the last ids."""
        if self.tokenizer is None:
            return ""
        head = self._dec(self.ids[self._prefix:self._read])
        whole = self._dec(self.ids[self._prefix:])
        if not whole.startswith(head):  # this tokenizer's window is not a suffix here: decode everything
            return self._dec(self.ids)
        text = self._settled + whole[len(head):]
        if not text.endswith("\ufffd"):  # a whole character at the end: settle here
            self._settled, self._prefix, self._read = text, self._read, len(self.ids)
        return text

    def _advance(self, new: list[int], lps: list[Logprob] | None, final: bool) -> Delta:
        full = self._decode()
        text = full if final else full.rstrip("\ufffd")
        if self.stop:
            hold = max(map(len, self.stop)) - 1
            start = max(0, len(self.text) - hold)
            hits = [p for s in self.stop if (p := text.find(s, start)) >= 0]
            if hits:
                text, self.finish_reason = text[:min(hits)], "stop"
            elif not final:
                text = text[:max(len(self.text), len(text) - hold)]
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        return Delta(delta, new, lps if self.want_logprobs else None, self.finish_reason)

    def add(self, chunk: list[int]) -> Delta:
        """Feed one chunk of new token ids (a :class:`~ryzlab.serve.engine.TokenChunk`)."""
        new = list(chunk)
        self.ids += new
        self.engine_reason = getattr(chunk, "finish_reason", None) or self.engine_reason
        lps = getattr(chunk, "logprobs", None)
        if self.want_logprobs and new:  # an empty chunk only ends the sequence (a router's re-route)
            if lps is None or len(lps) != len(new):  # never answer logprobs that do not match the tokens
                raise RuntimeError("the backend returned no logprobs for these tokens (it must pass "
                                   "SamplingParams.logprobs to the engine and its TokenChunk back)")
            self.logprobs += lps
        return self._advance(new, lps, final=False)

    def finish(self) -> Delta:
        """The engine ended the sequence (stop token or length): flush the text. The reason is the
        engine's (its last chunk's ``finish_reason``), unless a stop string ended the text first."""
        delta = self._advance([], None, final=True)
        if self.finish_reason is None:
            if self.engine_reason is None:
                raise RuntimeError("the backend ended the stream without a finish_reason (its last TokenChunk "
                                   "must carry it)")
            self.finish_reason = self.engine_reason
        delta.finish_reason = self.finish_reason
        return delta


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    """OpenAI's JSON shapes for one request (``kind``: completion or chat)."""

    def __init__(self, kind: Literal["completion", "chat"], rid: str, created: int, model: str, tokenizer: Any):
        self.kind, self.rid, self.created, self.model, self.tok = kind, rid, created, model, tokenizer
        self.object = "text_completion" if kind == "completion" else "chat.completion"
        self._offsets: dict[int, int] = {}

    def _token(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok is not None else f"token_id:{t}"

    def _logprobs(self, index: int, ids: list[int], lps: list[Logprob] | None) -> Any:
        if lps is None:
            return None
        if self.kind == "chat":
            def entry(t: int, lp: float) -> dict[str, Any]:
                s = self._token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                                for t, (lp, top) in zip(ids, lps)]}
        tokens = [self._token(t) for t in ids]
        offsets = []
        off = self._offsets.get(index, 0)
        for s in tokens:
            offsets.append(off)
            off += len(s)
        self._offsets[index] = off
        tops = []
        for _, top in lps:  # keyed by text: tokens with the same text keep the best logprob
            d: dict[str, float] = {}
            for a, b in top:
                d.setdefault(self._token(a), b)
            tops.append(d)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps], "top_logprobs": tops,
                "text_offset": offsets}

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, delta: Delta, *, first: bool = False, with_usage: bool = False) -> dict[str, Any]:
        """One streamed event for choice ``index``."""
        lp = self._logprobs(index, delta.token_ids, delta.logprobs)
        if self.kind == "chat":
            d: dict[str, Any] = {"role": "assistant"} if first else {}
            if delta.text or first:
                d["content"] = delta.text
            choice = {"index": index, "delta": d, "logprobs": lp, "finish_reason": delta.finish_reason}
        else:
            choice = {"index": index, "text": delta.text, "logprobs": lp, "finish_reason": delta.finish_reason,
                      "token_ids": delta.token_ids}
        out = {**self._head(True), "choices": [choice]}
        if with_usage:
            out["usage"] = None  # OpenAI: null on every chunk, the numbers in a last chunk of their own
        return out

    def usage_chunk(self, u: dict[str, int]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": u}

    def body(self, choices: list[ChoiceText], u: dict[str, int]) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        out = []
        for c in choices:
            lp = self._logprobs(c.index, c.ids, c.logprobs if c.want_logprobs else None)
            if self.kind == "chat":
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                            "token_ids": c.ids})
        return {**self._head(False), "choices": out, "usage": u}
