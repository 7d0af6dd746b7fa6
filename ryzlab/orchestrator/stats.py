"""Latency statistics per device and overall: percentiles, throughput, error rate, in-flight.

Percentiles come from every sample (``reservoir=None``: exact, memory grows with the run) or
from a uniform reservoir of fixed size (Vitter's algorithm R: every sample seen so far has
the same chance ``k/n`` of being kept, so the kept set is an unbiased sample of the run and
memory stays ``O(k)``). Percentiles come from :func:`ryzlab.analysis.percentiles` (numpy's
default, linear interpolation), so exact mode matches ``numpy.percentile`` on the same samples;
columns are named ``latency_ms_p50`` ... ``latency_ms_p99_9`` (docs/architecture.md, "Naming").
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:
    import pandas as pd

from ryzlab.analysis import TAIL_PERCENTILES, summary_columns

__all__ = ["LatencyStats", "StatsCollector"]


@dataclass
class LatencyStats:
    """Samples of one scope (a device, or everything). Not thread-safe: use :class:`StatsCollector`."""

    reservoir: int | None = None
    """Keep at most this many samples (uniform reservoir); None keeps all (exact percentiles)."""
    seed: int = 0
    requests: int = 0
    errors: int = 0
    latency_sum_ms: float = 0.0
    first_t: float | None = None
    last_t: float | None = None
    _samples: list[float] = field(default_factory=list)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.reservoir is not None and self.reservoir < 1:
            raise ValueError(f"reservoir must be None (exact) or >= 1 samples, got {self.reservoir}")
        self._rng = random.Random(self.seed)

    def record(self, latency_ms: float, success: bool = True, t: float | None = None) -> None:
        """Add one finished request; failed requests count toward the error rate only."""
        if latency_ms < 0 or latency_ms != latency_ms:
            raise ValueError(f"latency_ms must be a number >= 0, got {latency_ms}")
        t = time.monotonic() if t is None else t
        self.first_t = t if self.first_t is None else min(self.first_t, t)
        self.last_t = t if self.last_t is None else max(self.last_t, t)
        self.requests += 1
        if not success:
            self.errors += 1
            return
        self.latency_sum_ms += latency_ms
        ok = self.requests - self.errors  # successful samples seen so far, this one included
        if self.reservoir is None or len(self._samples) < self.reservoir:
            self._samples.append(latency_ms)
        else:
            j = self._rng.randrange(ok)
            if j < self.reservoir:
                self._samples[j] = latency_ms

    @property
    def exact(self) -> bool:
        return len(self._samples) == self.requests - self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_ms(self) -> float:
        ok = self.requests - self.errors
        return self.latency_sum_ms / ok if ok else float("nan")

    def percentiles(self) -> dict[str, float]:
        """``{"latency_ms_p50": ..., "latency_ms_p90": ..., "latency_ms_p99": ..., "latency_ms_p99_9": ...}``."""
        return summary_columns("latency_ms", self._samples, TAIL_PERCENTILES)

    def throughput(self, window_s: float | None = None) -> float:
        """Requests per second over ``window_s`` (default: first to last completion)."""
        if window_s is None:
            if self.first_t is None or self.last_t is None or self.last_t <= self.first_t:
                return float("nan")
            window_s = self.last_t - self.first_t
        return self.requests / window_s if window_s > 0 else float("nan")


class StatsCollector:
    """Thread-safe per-device + overall statistics with in-flight accounting.

    ``start(device)`` when a request is dispatched, ``finish(device, latency_ms, success)`` when
    it completes (or ``record`` when only the outcome is known). Export with :meth:`to_frame`.
    """

    ALL = "all"

    def __init__(self, reservoir: int | None = None, seed: int = 0):
        self.reservoir = reservoir
        self._seed = seed
        self._lock = threading.Lock()
        self._scopes: dict[Hashable, LatencyStats] = {self.ALL: LatencyStats(reservoir, seed)}
        self._in_flight: dict[Hashable, int] = {}
        self._t0 = time.monotonic()

    def _scope(self, device: Hashable) -> LatencyStats:
        if device not in self._scopes:
            self._scopes[device] = LatencyStats(self.reservoir, self._seed + len(self._scopes))
        return self._scopes[device]

    def start(self, device: Hashable) -> None:
        with self._lock:
            self._in_flight[device] = self._in_flight.get(device, 0) + 1

    def finish(self, device: Hashable, latency_ms: float, success: bool = True) -> None:
        with self._lock:
            if self._in_flight.get(device, 0) <= 0:
                raise ValueError(f"finish() for device {device!r} without a matching start()")
            self._in_flight[device] -= 1
        self.record(device, latency_ms, success)

    def record(self, device: Hashable, latency_ms: float, success: bool = True) -> None:
        t = time.monotonic()
        with self._lock:
            self._scope(self.ALL).record(latency_ms, success, t)
            if device != self.ALL:
                self._scope(device).record(latency_ms, success, t)

    def in_flight(self, device: Hashable | None = None) -> int:
        with self._lock:
            if device is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(device, 0)

    def overall(self) -> LatencyStats:
        return self._scopes[self.ALL]

    def to_frame(self, window_s: float | None = None) -> "pd.DataFrame":
        """One row per scope (``all`` first, then each device): counts, rates, percentiles."""
        window = window_s if window_s is not None else time.monotonic() - self._t0
        import pandas as pd

        rows = []
        with self._lock:
            for scope, s in self._scopes.items():
                in_flight = (sum(self._in_flight.values()) if scope == self.ALL
                             else self._in_flight.get(scope, 0))
                rows.append({"scope": str(scope), "requests": s.requests, "errors": s.errors,
                             "error_rate": s.error_rate, "in_flight": in_flight,
                             "throughput_rps": s.throughput(window), "latency_ms_mean": s.mean_ms,
                             **s.percentiles(), "samples_kept": len(s._samples), "exact": s.exact})
        return pd.DataFrame(rows)
