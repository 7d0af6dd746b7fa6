"""Synthetic request streams shared by live runs and the simulator: sizes, arrivals, prefixes.

Sizes are in units of the mean (mean 1.0), so a live run scales them by its calibrated
per-unit cost and the simulator by its mean service time. Skew matters for balancing: with
constant sizes round-robin is already near-optimal; with a few huge requests a load-blind
policy keeps queueing small requests behind them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from ryzlab.orchestrator.balance import Request

__all__ = ["SizeDist", "SIZE_DISTS", "sample_sizes", "make_requests", "Arrival", "PREFIX_HIT_COST", "PREFIX_CACHE_SIZE"]

SizeDist = Literal["constant", "exponential", "bimodal", "lognormal"]
SIZE_DISTS: tuple[str, ...] = get_args(SizeDist)

BIMODAL_LARGE_P = 0.1
BIMODAL_RATIO = 20.0
"""bimodal: 10% of requests are 20x the others (long prompts among chat turns); SCV ~ 3.5."""
LOGNORMAL_SIGMA = 1.2
PREFIX_HIT_COST = 0.5
"""Work factor when a worker still caches the request's prefix (prefill of the shared part skipped)."""
PREFIX_CACHE_SIZE = 16
"""Prefixes a worker keeps (LRU): small, so placement decides whether a prefix stays cached."""


def sample_sizes(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` request sizes with mean 1.0 drawn from ``dist``."""
    if dist not in SIZE_DISTS:
        raise ValueError(f"unknown size distribution {dist!r}; valid: {', '.join(SIZE_DISTS)}")
    if dist == "constant":
        return np.ones(n)
    if dist == "exponential":
        return rng.exponential(1.0, n)
    if dist == "bimodal":
        small = 1.0 / (1 - BIMODAL_LARGE_P + BIMODAL_LARGE_P * BIMODAL_RATIO)
        large = rng.random(n) < BIMODAL_LARGE_P
        return np.where(large, small * BIMODAL_RATIO, small)
    mu = -LOGNORMAL_SIGMA ** 2 / 2  # mean exp(mu + sigma^2/2) = 1
    return rng.lognormal(mu, LOGNORMAL_SIGMA, n)


@dataclass(frozen=True)
class Arrival:
    t: float
    """Arrival time in seconds from the start of the run."""
    request: Request


def make_requests(n: int, rate_per_s: float, dist: str, *, prefixes: int = 0,
                  seed: int = 0) -> list[Arrival]:
    """A Poisson stream of ``n`` requests at ``rate_per_s``; ``prefixes`` > 0 tags each request
    with one of that many prefix keys (Zipf-like popularity, as shared system prompts are)."""
    if n < 1 or rate_per_s <= 0:
        raise ValueError(f"need n >= 1 and rate_per_s > 0, got n={n}, rate_per_s={rate_per_s}")
    rng = np.random.default_rng(seed)
    sizes = sample_sizes(dist, n, rng)
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, n))
    if prefixes > 0:
        weights = 1.0 / np.arange(1, prefixes + 1)
        keys = rng.choice(prefixes, size=n, p=weights / weights.sum())
    else:
        keys = [None] * n
    return [Arrival(float(t), Request(i, float(s), None if k is None else int(k)))
            for i, (t, s, k) in enumerate(zip(times, sizes, keys))]
