"""Load generator: open-loop Poisson/gamma arrivals, closed-loop concurrency, trace replay.

Open loop is what a service sees from many independent users: arrivals do not wait for
answers. Gamma inter-arrival times with shape ``burstiness`` keep the mean rate and change
the variance (CV^2 = 1/burstiness): 1 is Poisson, < 1 is burstier. Closed loop keeps
``concurrency`` requests in flight (a fixed pool of users); it measures capacity, not latency
under a given load.

Latency is measured from each request's *scheduled* send time: when the client falls
behind, the lag is charged to the request (no coordinated omission), and the achieved send
rate is reported next to the target so an overloaded client is visible.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, get_args

import numpy as np

from ryzlab.config import LoadFields, check_choice
from ryzlab.loadgen.metrics import COUNT_SOURCES, RequestRecord, SLO, Usage, records_frame, summarize

__all__ = ["Arrival", "ARRIVALS", "LengthDist", "LENGTH_DISTS", "LoadSpec", "RequestSpec",
           "make_requests", "load_trace", "write_trace", "run_load", "LoadResult", "Client", "run_sync",
           "max_rate_search"]

log = logging.getLogger(__name__)

Arrival = Literal["poisson", "gamma", "closed", "trace"]
ARRIVALS: tuple[str, ...] = get_args(Arrival)
LengthDist = Literal["fixed", "uniform", "exponential", "lognormal"]
LENGTH_DISTS: tuple[str, ...] = get_args(LengthDist)


@dataclass(frozen=True, kw_only=True)
class LoadSpec(LoadFields):
    """What load to offer (rate, counts, lengths: :class:`ryzlab.config.LoadFields`); validated on
    construction."""

    arrival: Arrival = "poisson"
    prompt_dist: LengthDist = "fixed"
    output_dist: LengthDist = "fixed"
    vocab_size: int = 256
    trace: str | None = None
    """JSONL path for ``arrival='trace'``: one object per line with arrival_s, prompt_len, output_len."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("arrival", self.arrival, ARRIVALS)
        check_choice("prompt_dist", self.prompt_dist, LENGTH_DISTS)
        check_choice("output_dist", self.output_dist, LENGTH_DISTS)
        if self.arrival in ("poisson", "gamma") and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s for arrival={self.arrival!r}, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness (gamma shape) must be > 0, got {self.burstiness}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"prompt_len and output_len must be >= 1, got {self.prompt_len}, {self.output_len}")
        if not 0 <= self.shared_prefix_len:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.arrival == "trace" and not self.trace:
            raise ValueError("arrival='trace' needs trace=<path to a JSONL file>")


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when (seconds after start; None = as soon as a slot frees)."""

    index: int
    arrival_s: float | None
    prompt: tuple[int, ...]
    max_tokens: int


Client = Callable[[RequestSpec], AsyncIterator["int | Usage"]]
"""Sends one request and yields the number of output tokens in each chunk as they arrive (1 per
chunk when the stream carries text only), then optionally one :class:`~ryzlab.loadgen.metrics.Usage`
with the server's counts; raises to report a failed request (the error is recorded, the run goes on)."""


def _lengths(rng: np.random.Generator, dist: str, mean: int, n: int) -> np.ndarray:
    if dist == "fixed":
        x = np.full(n, mean, dtype=float)
    elif dist == "uniform":  # U[1, 2*mean-1]: mean preserved
        x = rng.uniform(1, 2 * mean - 1, n) if mean > 1 else np.ones(n)
    elif dist == "exponential":
        x = rng.exponential(mean, n)
    elif dist == "lognormal":  # sigma 0.5: a moderate tail; mean preserved
        sigma = 0.5
        x = rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, n)
    else:  # validated in LoadSpec
        raise AssertionError(f"unhandled length distribution {dist!r}")
    return np.maximum(1, np.rint(x)).astype(int)


def _inter_arrivals(rng: np.random.Generator, spec: LoadSpec, n: int) -> np.ndarray:
    shape = 1.0 if spec.arrival == "poisson" else spec.burstiness
    # Gamma(k, theta) with mean k*theta = 1/rate.
    return rng.gamma(shape, 1.0 / (spec.rate * shape), n)


def make_requests(spec: LoadSpec) -> list[RequestSpec]:
    """Draw the whole request list up front from ``spec.seed`` (same seed, same load)."""
    if spec.arrival == "trace":
        return load_trace(spec.trace, vocab_size=spec.vocab_size, seed=spec.seed,
                          shared_prefix_len=spec.shared_prefix_len)[: spec.num_requests]
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    plen = _lengths(rng, spec.prompt_dist, spec.prompt_len, n)
    olen = _lengths(rng, spec.output_dist, spec.output_len, n)
    if spec.arrival == "closed":
        arrivals: list[float | None] = [None] * n
    else:
        gaps = _inter_arrivals(rng, spec, n)
        arrivals = list(np.concatenate([[0.0], np.cumsum(gaps)[:-1]]))
    prefix = rng.integers(0, spec.vocab_size, spec.shared_prefix_len).tolist()
    out = []
    for i in range(n):
        body = rng.integers(0, spec.vocab_size, int(plen[i])).tolist()
        out.append(RequestSpec(i, None if arrivals[i] is None else float(arrivals[i]),
                               tuple(prefix + body), int(olen[i])))
    return out


TRACE_KEYS = ("arrival_s", "prompt_len", "output_len")


def load_trace(path: str | Path, *, vocab_size: int = 256, seed: int = 0,
               shared_prefix_len: int = 0) -> list[RequestSpec]:
    """Read a JSONL trace (``arrival_s``, ``prompt_len``, ``output_len`` per line).

    Prompt token ids are drawn from ``seed`` (traces carry lengths, not text). Raises
    ``ValueError`` with the line number for a malformed line.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"trace file {str(p)!r} does not exist")
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab_size, shared_prefix_len).tolist()
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: not JSON ({e})") from None
        missing = [k for k in TRACE_KEYS if k not in obj]
        if missing:
            raise ValueError(f"{p}:{lineno}: missing {missing}; each line needs {', '.join(TRACE_KEYS)}")
        a, pl, ol = float(obj["arrival_s"]), int(obj["prompt_len"]), int(obj["output_len"])
        if a < 0 or pl < 1 or ol < 1:
            raise ValueError(f"{p}:{lineno}: need arrival_s >= 0, prompt_len >= 1, output_len >= 1; got {obj}")
        rows.append((a, pl, ol))
    rows.sort(key=lambda r: r[0])
    return [RequestSpec(i, a, tuple(prefix + rng.integers(0, vocab_size, pl).tolist()), ol)
            for i, (a, pl, ol) in enumerate(rows)]


def write_trace(path: str | Path, requests: list[RequestSpec]) -> Path:
    """Write requests as a replayable JSONL trace (lengths and arrival times)."""
    from ryzlab.io import write_bytes

    lines = [json.dumps({"arrival_s": r.arrival_s or 0.0, "prompt_len": len(r.prompt),
                         "output_len": r.max_tokens}) for r in requests]
    return write_bytes(path, ("\n".join(lines) + "\n").encode())


@dataclass
class LoadResult:
    """Records of every request plus the offered-vs-achieved rates."""

    spec: LoadSpec
    records: list[RequestRecord]
    target_rate: float | None
    """Requests/s asked for (None for closed loop)."""
    achieved_rate: float
    """Requests/s actually sent: (n - 1) / (last send - first send)."""
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    t0: float = 0.0
    """Monotonic time the load started (request times in :meth:`frame` are relative to it)."""

    def summary(self, slo: SLO | str | None = None) -> dict[str, Any]:
        out = summarize(self.records, duration_s=self.duration_s, slo=slo)
        out.update(target_rate=self.target_rate if self.target_rate is not None else math.nan,
                   achieved_rate=self.achieved_rate, arrival=self.spec.arrival)
        out.update(self.extra)
        return out

    def frame(self) -> Any:
        """One row per request (:func:`~ryzlab.loadgen.metrics.records_frame`)."""
        return records_frame(self.records, self.t0)

    def tidy(self, slo: SLO | str | None, *, bin_s: float = 0.5, fault_t: float | None = None,
             **columns: Any) -> Any:
        """The serving experiment's tidy rows: ``kind='summary'`` (one row: :meth:`summary` plus
        ``columns``) and ``kind='timeline'`` (completed requests and goodput per ``bin_s`` seconds
        since the load started; ``fault_at_s`` marks ``fault_t``, a monotonic time, when given)."""
        import pandas as pd

        from ryzlab.loadgen.metrics import parse_slo

        slo = parse_slo(slo) if isinstance(slo, str) or slo is None else slo
        s = {**self.summary(slo), "kind": "summary", **columns}
        ends = np.array([r.finish_s - self.t0 for r in self.records if r.ok])
        good = np.array([r.finish_s - self.t0 for r in self.records if slo.met_by(r)])
        span = float(ends.max()) if ends.size else 0.0
        nbins = max(1, int(math.ceil(span / bin_s)))
        edges = np.arange(nbins + 1) * bin_s
        done_hist = np.histogram(ends, edges)[0] if ends.size else np.zeros(nbins)
        good_hist = np.histogram(good, edges)[0] if good.size else np.zeros(nbins)
        fault_rel = fault_t - self.t0 if fault_t is not None else math.nan
        rows = [s] + [{"kind": "timeline", **columns, "t_s": float(edges[i]), "completed_per_s": done_hist[i] / bin_s,
                       "goodput": good_hist[i] / bin_s, "fault_at_s": fault_rel} for i in range(nbins)]
        return pd.DataFrame(rows)


async def _one(client: Client, req: RequestSpec, rec: RequestRecord) -> None:
    rec.sent_s = time.monotonic()
    try:
        async for item in client(req):
            now = time.monotonic()
            if isinstance(item, Usage):
                if item.source not in COUNT_SOURCES:
                    raise AssertionError(f"client bug: count source {item.source!r} not in {COUNT_SOURCES}")
                rec.count_source = item.source
                if item.prompt_tokens is not None:
                    rec.prompt_tokens = int(item.prompt_tokens)
                if item.completion_tokens is not None and item.source == "usage":
                    rec.usage_output_tokens = int(item.completion_tokens)
                continue
            if int(item) > 0:
                rec.token_times_s.extend([now] * int(item))
                rec.chunks += 1
        rec.finish_s = time.monotonic()
    except asyncio.CancelledError:
        rec.error = "cancelled: run deadline reached"
        rec.finish_s = None
        raise
    except Exception as e:  # noqa: BLE001 - any client failure is a failed request, recorded
        rec.error = f"{type(e).__name__}: {e}"
        rec.finish_s = time.monotonic()


async def run_load(spec: LoadSpec, client: Client, *, requests: list[RequestSpec] | None = None,
                   timeout_s: float | None = None) -> LoadResult:
    """Offer ``spec``'s load through ``client`` and record every request.

    ``timeout_s`` bounds the whole run; requests still open then are recorded as failed.
    """
    reqs = requests if requests is not None else make_requests(spec)
    records = [RequestRecord(index=r.index, scheduled_s=math.nan, prompt_tokens=len(r.prompt),
                             prompt_tokens_target=len(r.prompt), output_tokens_target=r.max_tokens) for r in reqs]
    t0 = time.monotonic()

    async def open_loop() -> None:
        tasks = []
        for req, rec in zip(reqs, records):
            rec.scheduled_s = t0 + (req.arrival_s or 0.0)
            delay = rec.scheduled_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, req, rec)))
        await asyncio.gather(*tasks)

    async def closed_loop() -> None:
        it = iter(zip(reqs, records))

        async def user() -> None:
            for req, rec in it:
                rec.scheduled_s = time.monotonic()
                await _one(client, req, rec)

        await asyncio.gather(*(user() for _ in range(min(spec.concurrency, len(reqs)))))

    body = closed_loop() if spec.arrival == "closed" else open_loop()
    try:
        await asyncio.wait_for(body, timeout_s)
    except asyncio.TimeoutError:
        log.warning("load run hit its %.1f s deadline; open requests are recorded as failed", timeout_s)
    for rec in records:
        if rec.finish_s is None and rec.error in (None, "cancelled: run deadline reached"):
            rec.error = "no answer before the run deadline"
            rec.lost = True
        if math.isnan(rec.scheduled_s):  # never scheduled (deadline): charged from the deadline
            rec.scheduled_s = time.monotonic()
    sent = sorted(r.sent_s for r in records if r.sent_s is not None)
    achieved = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else math.nan
    ends = [r.finish_s for r in records if r.finish_s is not None]
    duration = (max(ends) if ends else time.monotonic()) - t0
    target = None if spec.arrival in ("closed",) else (
        spec.rate if spec.arrival != "trace" else
        ((len(reqs) - 1) / reqs[-1].arrival_s if len(reqs) > 1 and reqs[-1].arrival_s else math.nan))
    return LoadResult(spec, records, target, achieved, duration, t0=t0)


def run_sync(make_coro: Callable[[], Any]) -> Any:
    """Run the coroutine ``make_coro()`` to completion from synchronous code.

    Inside Jupyter an event loop is already running in this thread (``asyncio.run`` refuses
    to nest), so the coroutine then runs on a fresh loop in a helper thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make_coro())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="ryzlab-loadgen")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def max_rate_search(trial: Callable[[float], dict[str, Any]], holds: Callable[[dict[str, Any]], bool], *,
                    start_rate: float, max_rate: float, min_rate: float, bisect: int = 2
                    ) -> tuple[float | None, float | None, list[tuple[float, dict[str, Any], bool]]]:
    """Highest offered rate at which ``holds(trial(rate))``: doubling from ``start_rate`` until it
    breaks (halving while the start rate already breaks, down to ``min_rate``), then ``bisect``
    bisection steps between the last good and first bad rate.

    Returns (highest good rate or None, first bad rate or None, every trial as (rate, summary, held)).
    """
    if not 0 < min_rate <= start_rate <= max_rate:
        raise ValueError(f"need 0 < min_rate <= start_rate <= max_rate, got {min_rate}, {start_rate}, {max_rate}")
    good: float | None = None
    bad: float | None = None
    trials: list[tuple[float, dict[str, Any], bool]] = []
    rate = start_rate
    while min_rate <= rate <= max_rate:
        s = trial(rate)
        ok = holds(s)
        trials.append((rate, s, ok))
        if ok:
            good = rate
            if bad is not None:
                break
            rate *= 2
        else:
            bad = rate
            if good is not None:
                break
            rate /= 2
    for _ in range(bisect if good is not None and bad is not None else 0):
        mid = (good + bad) / 2
        s = trial(mid)
        ok = holds(s)
        trials.append((mid, s, ok))
        good, bad = (mid, bad) if ok else (good, mid)
    return good, bad, trials
