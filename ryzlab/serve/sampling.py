"""Sampling: what a request asks of the sampler (:class:`SamplingParams`), one token from the
logits (:func:`sample`: temperature, top-k, top-p, a per-request seeded generator) and the
logprobs a request may ask for, carried beside the token ids (:class:`TokenChunk`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "TokenChunk", "sample", "fused_greedy", "MAX_LOGPROBS", "INT64", "Logprob"]

Logprob = tuple[float, tuple[tuple[int, float], ...]]
"""(chosen token's logprob, ((id, logprob) of the most likely alternatives, best first))."""

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (vLLM's default ``max_logprobs``)."""
INT64 = (-(2 ** 63), 2 ** 63 - 1)
"""Seeds must fit a signed 64-bit integer (what every framework's generator takes)."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """What one request asks of the sampler; a plain frozen dataclass (it is pickled to workers)."""

    max_tokens: int = 16
    temperature: float = 0.0
    """0 = greedy."""
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob and the k most likely alternatives."""

    def check(self, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the field and its valid range (nothing queued then)."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if self.seed is not None and not INT64[0] <= self.seed <= INT64[1]:
            raise ValueError(f"seed must fit a signed 64-bit integer, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")


class TokenChunk(list):
    """New token ids of one step (a plain ``list`` of ints to every caller) and, when the
    request asked for them, ``logprobs``: per token ``(logprob, ((id, logprob), ...))``, the
    chosen token's log-probability under the model and its most likely alternatives.

    A list subclass so the Backend interface (``generate`` yields lists of ids) is unchanged;
    it pickles with its attributes (worker -> router)."""

    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    """On the last chunk of a sequence: why it ended (``stop`` or ``length``, from the engine)."""


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
           ) -> tuple[int, Logprob | None]:
    """logits [V] -> (next token id, its logprob and the top alternatives, or None).

    The logits are shifted to a maximum of 0 before dividing by the temperature, so a tiny
    temperature gives ``-inf`` elsewhere and 0 at the argmax (a one-hot, not NaN), and a huge
    one gives ~0 everywhere (uniform): no temperature can make ``multinomial`` fail.
    ``top_k`` then ``top_p`` restrict the candidates (vLLM's order). Logprobs are those of the
    model's own distribution (before temperature and filtering), as vLLM returns them.
    """
    p = params
    if p.temperature <= 0:
        tok = int(logits.argmax())
    else:
        z = ((logits.double() - logits.max()) / p.temperature).nan_to_num(nan=float("-inf"))  # [V]
        if 0 < p.top_k < z.numel():
            kth = torch.topk(z, p.top_k).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p  # mass before it already reaches top_p
            drop[0] = False                                   # the most likely token always stays
            probs = probs.index_fill(0, order[drop], 0.0)
        tok = int(torch.multinomial(probs, 1, generator=generator))
    if p.logprobs is None:
        return tok, None
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if p.logprobs:
        vals, idx = torch.topk(logp, min(p.logprobs, logp.numel()))
        top = tuple(zip(idx.tolist(), vals.tolist()))
    return tok, (float(logp[tok]), top)



def fused_greedy(logits: torch.Tensor, params: Sequence[SamplingParams]) -> dict[int, int]:
    """The greedy rows without logprobs (the common case) of ``logits [B, V]`` -> {row: token id},
    with one ``argmax`` over those rows and one transfer of the ids instead of one of each per row.

    The same ids as :func:`sample` gives row by row (``argmax`` picks the first maximum either way).
    """
    rows = [i for i, p in enumerate(params) if p.temperature <= 0 and p.logprobs is None]
    if not rows:
        return {}
    x = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
    return dict(zip(rows, x.argmax(-1).tolist()))
