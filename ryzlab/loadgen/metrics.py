"""Serving metrics named as in the field: TTFT, TPOT, ITL, E2EL, throughput, goodput.

Every latency is measured from the request's *scheduled* send time (the load generator's
arrival time), not from when the client managed to send it: a client that falls behind
shows up as latency instead of silently lowering the offered load.

Definitions (those of vLLM's ``benchmark_serving``):

- ``ttft``: first output token time - scheduled time.
- ``tpot``: (last token time - first token time) / (output_tokens - 1), per request (needs >= 2
  output tokens). ``output_tokens`` is the server's count (``usage.completion_tokens``) when it
  reports one, not the number of streamed chunks: a server that sends several tokens per chunk
  still gets the right TPOT.
- ``itl``: every gap between consecutive output tokens, pooled over requests -- only from
  requests whose stream carried exactly one token per chunk (``itl_measurable``); a server whose
  chunking hides token boundaries has no ITL, and the summary says so (``itl_measurable_frac``).
- ``e2el``: last output token time - scheduled time.
- ``goodput``: requests per second that completed *and* met every SLO given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ryzlab.analysis import PERCENTILES, percentiles, summary_columns

__all__ = ["RequestRecord", "Usage", "COUNT_SOURCES", "SLO", "parse_slo", "summarize", "slo_table", "median_range",
           "records_frame", "REQUEST_COLUMNS", "PERCENTILES", "LATENCY_METRICS"]

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "itl", "e2el")
COUNT_SOURCES = ("token_ids", "usage", "chunks")
"""How a request's output tokens were counted: token ids in every chunk (exact), the server's
``usage`` (exact), or one token per streamed chunk (a fallback: logged, and said in the rows)."""


@dataclass(frozen=True)
class Usage:
    """Token counts a client learnt at the end of a request (a client yields it after its chunks)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    source: str = "usage"
    """One of :data:`COUNT_SOURCES`: where ``completion_tokens`` came from."""


@dataclass(kw_only=True)
class RequestRecord:
    """What one request did, in seconds on the client's monotonic clock."""

    index: int
    scheduled_s: float
    """When the load generator meant to send it (latencies start here)."""
    sent_s: float | None = None
    """When it was actually sent (>= scheduled_s; the gap is client-side queueing)."""
    prompt_tokens: int = 0
    """Prompt tokens as the server counted them (``usage``) when it said; else the target below."""
    prompt_tokens_target: int = 0
    """Prompt tokens the load generator asked for."""
    output_tokens_target: int = 0
    """``max_tokens`` of the request."""
    token_times_s: list[float] = field(default_factory=list)
    """Arrival time of every streamed output token (a chunk of k tokens counts k times)."""
    chunks: int = 0
    """Streamed chunks that carried output."""
    usage_output_tokens: int | None = None
    """The server's ``completion_tokens`` (None when it reported none)."""
    count_source: str = "token_ids"
    """How output tokens were counted (:data:`COUNT_SOURCES`)."""
    finish_s: float | None = None
    error: str | None = None
    """None when the request completed; the error text (HTTP status, worker death, ...) otherwise."""
    worker: int | None = None
    lost: bool = False
    """True when no answer at all came back (neither completion nor error) before the deadline."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None

    @property
    def output_tokens(self) -> int:
        return self.usage_output_tokens if self.usage_output_tokens is not None else len(self.token_times_s)

    @property
    def itl_measurable(self) -> bool:
        """True when every streamed chunk carried exactly one token (gaps are inter-token latencies)."""
        return self.ok and self.output_tokens >= 2 and self.chunks == self.output_tokens == len(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.scheduled_s if self.token_times_s else None

    @property
    def e2el_s(self) -> float | None:
        if not self.ok:
            return None
        end = self.token_times_s[-1] if self.token_times_s else self.finish_s
        return end - self.scheduled_s

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        if not self.ok or n < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        """Inter-token gaps; empty unless :attr:`itl_measurable` (chunk gaps are not token gaps)."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])] if self.itl_measurable else []


@dataclass(frozen=True, kw_only=True)
class SLO:
    """Latency service-level objectives in milliseconds; None = not constrained."""

    ttft: float | None = None
    tpot: float | None = None
    itl: float | None = None
    e2el: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2el_s,
                  "itl": max(r.itl_s) if r.itl_s else None}
        for key in SLO_KEYS:
            limit = getattr(self, key)
            if limit is None:
                continue
            value = checks[key]
            if value is not None and value * 1000.0 > limit:
                return False
        return True

    def __str__(self) -> str:
        return ",".join(f"{k}:{getattr(self, k):g}" for k in SLO_KEYS if getattr(self, k) is not None)


def parse_slo(text: str | None) -> SLO:
    """Parse ``"ttft:200,tpot:50"`` (milliseconds) into an :class:`SLO`.

    Raises ``ValueError`` naming the valid keys for an unknown key or a non-positive value.
    """
    if not text:
        return SLO()
    values: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO item {part!r}: expected KEY:MILLISECONDS with KEY one of "
                             f"{', '.join(SLO_KEYS)} (e.g. 'ttft:200,tpot:50')")
        try:
            ms = float(val)
        except ValueError:
            raise ValueError(f"bad SLO value in {part!r}: {val!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"bad SLO value in {part!r}: must be > 0 ms")
        values[key] = ms
    return SLO(**values)


def median_range(xs: list[float]) -> str:
    """``'median [min, max]'`` of the finite values of repeated measurements (``'none'`` if none)."""
    v = sorted(x for x in xs if x is not None and math.isfinite(x))
    return f"{float(np.median(v)):.3g} [{v[0]:.3g}, {v[-1]:.3g}]" if v else "none"


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    """``<name>_ms_mean`` / ``_p50`` / ``_p90`` / ``_p99`` in milliseconds (NaN when there is no sample)."""
    return summary_columns(f"{name}_ms", np.asarray(values_s, dtype=float) * 1000.0, PERCENTILES, mean=True)


def summarize(records: list[RequestRecord], *, duration_s: float | None = None,
              slo: SLO | str | None = None) -> dict[str, Any]:
    """Aggregate request records into one flat dict of field-named metrics.

    ``duration_s`` defaults to first scheduled time -> last finish. Throughputs count only
    completed requests; ``requests_failed`` counts the others (nothing is dropped silently).
    """
    slo = parse_slo(slo) if isinstance(slo, str) or slo is None else slo
    ok = [r for r in records if r.ok]
    if duration_s is None:
        starts = [r.scheduled_s for r in records]
        ends = [r.finish_s for r in records if r.finish_s is not None]
        duration_s = (max(ends) - min(starts)) if starts and ends else 0.0
    dur = max(duration_s, 1e-9)
    out: dict[str, Any] = {
        "requests": len(records),
        "requests_completed": len(ok),
        "requests_failed": len(records) - len(ok),
        "requests_lost": sum(r.lost for r in records),
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur,
        "output_token_throughput": sum(r.output_tokens for r in ok) / dur,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in ok) / dur,
        "output_tokens": sum(r.output_tokens for r in ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
    }
    out.update(_stats("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]))
    out.update(_stats("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]))
    out.update(_stats("itl", [g for r in ok for g in r.itl_s]))
    out.update(_stats("e2el", [r.e2el_s for r in ok if r.e2el_s is not None]))
    good = sum(slo.met_by(r) for r in ok)
    out["slo"] = str(slo)
    out["goodput"] = good / dur
    out["slo_attainment"] = good / len(records) if records else math.nan
    multi = [r for r in ok if r.output_tokens >= 2]
    out["itl_measurable_frac"] = sum(r.itl_measurable for r in multi) / len(multi) if multi else math.nan
    targeted = [r for r in ok if r.output_tokens_target > 0]
    out["output_len_match_frac"] = (sum(r.output_tokens == r.output_tokens_target for r in targeted) / len(targeted)
                                    if targeted else math.nan)
    sources = sorted({r.count_source for r in ok})
    out["count_source"] = "+".join(sources) if sources else ""
    lag_ms = [(r.sent_s - r.scheduled_s) * 1000 for r in records if r.sent_s is not None]
    out["client_lag_ms_p99"] = percentiles(lag_ms, (99,))["p99"]
    return out


def records_frame(records: list[RequestRecord], t0: float | None = None) -> "Any":
    """One row per request (the ``requests.parquet`` of ``ryzlab loadgen --out``).

    Latencies in ms (NaN where undefined: a failed request, TPOT of a one-token answer); times in
    seconds since ``t0`` (default: the first scheduled time).
    """
    import pandas as pd

    nan = math.nan
    t0 = min((r.scheduled_s for r in records), default=0.0) if t0 is None else t0

    def ms(x: float | None) -> float:
        return x * 1000.0 if x is not None else nan

    rows = [{
        "index": r.index, "ok": r.ok, "error": r.error or "", "lost": r.lost,
        "ttft_ms": ms(r.ttft_s if r.ok else None), "tpot_ms": ms(r.tpot_s), "e2el_ms": ms(r.e2el_s),
        "itl_ms_max": ms(max(r.itl_s)) if r.itl_s else nan, "itl_measurable": r.itl_measurable,
        "prompt_tokens": r.prompt_tokens, "prompt_tokens_target": r.prompt_tokens_target,
        "output_tokens": r.output_tokens, "output_tokens_target": r.output_tokens_target,
        "chunks": r.chunks, "count_source": r.count_source,
        "scheduled_s": r.scheduled_s - t0,
        "send_lag_ms": ms(r.sent_s - r.scheduled_s) if r.sent_s is not None else nan,
        "finish_s": r.finish_s - t0 if r.finish_s is not None else nan,
        "worker": r.worker if r.worker is not None else -1,
    } for r in records]
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


REQUEST_COLUMNS = ("index", "ok", "error", "lost", "ttft_ms", "tpot_ms", "e2el_ms", "itl_ms_max", "itl_measurable",
                   "prompt_tokens", "prompt_tokens_target", "output_tokens", "output_tokens_target", "chunks",
                   "count_source", "scheduled_s", "send_lag_ms", "finish_s", "worker")
"""Columns of :func:`records_frame`, in order."""


def slo_table(summary: dict[str, Any], slo: SLO | str | None) -> "Any":
    """One row per SLO item: the p99 measured against the limit, met or not, and the share of
    requests that met *every* item (``slo_attainment``); p99 is the field's usual SLO statistic."""
    import pandas as pd

    slo = parse_slo(slo) if isinstance(slo, str) or slo is None else slo
    rows = []
    for key in SLO_KEYS:
        limit = getattr(slo, key)
        if limit is None:
            continue
        p99 = summary.get(f"{key}_ms_p99", math.nan)
        rows.append({"metric": f"{key}_ms", "limit_ms": limit, "p99_ms": p99,
                     "p99_met": bool(p99 < limit) if not math.isnan(p99) else False,
                     "slo_attainment": summary.get("slo_attainment", math.nan),
                     "goodput": summary.get("goodput", math.nan)})
    return pd.DataFrame(rows, columns=["metric", "limit_ms", "p99_ms", "p99_met", "slo_attainment", "goodput"])
