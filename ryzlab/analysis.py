"""Summaries of measured samples, named one way everywhere (foundation layer: numpy only).

Every latency table in ryzlab (the orchestrator's statistics and experiment, the load
generator's serving metrics, the pool's heartbeat gaps) takes its percentiles from
:func:`percentiles`, so one metric is summarised the same way wherever it is measured.

Naming (docs/architecture.md, "Naming"): a summary column is ``<metric>_<unit>_<stat>``, the unit
being the metric's own (``e2el_ms``) and the statistic last: ``e2el_ms_p50``, ``e2el_ms_p90``,
``e2el_ms_p99``, ``e2el_ms_mean``. Percentiles are numpy's default (linear interpolation between
the closest ranks), so a column equals ``numpy.percentile`` of the same samples.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = ["PERCENTILES", "TAIL_PERCENTILES", "percentile_name", "percentiles", "summary_columns"]

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
"""The field's usual three, in this order (vLLM's ``benchmark_serving`` reports the same)."""
TAIL_PERCENTILES: tuple[float, ...] = (*PERCENTILES, 99.9)
"""With p99.9, for fault studies: one request in a thousand stuck behind a dead worker shows
there and nowhere else."""


def percentile_name(q: float) -> str:
    """``50 -> "p50"``, ``99.9 -> "p99_9"`` (a dot cannot stand in a column name)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    return "p" + f"{q:g}".replace(".", "_")


def percentiles(values: Iterable[float] | np.ndarray, qs: Iterable[float] = PERCENTILES) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` of ``values`` (NaN each when there is none)."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
    qs = tuple(qs)
    if arr.size == 0:
        return {percentile_name(q): math.nan for q in qs}
    return {percentile_name(q): float(v) for q, v in zip(qs, np.percentile(arr, qs))}


def summary_columns(metric: str, values: Iterable[float] | np.ndarray, qs: Iterable[float] = PERCENTILES, *,
                    mean: bool = False) -> dict[str, float]:
    """``{"<metric>_mean": ..., "<metric>_p50": ..., ...}``; ``metric`` carries its unit (``e2el_ms``)."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
    out = {f"{metric}_mean": float(arr.mean()) if arr.size else math.nan} if mean else {}
    out.update({f"{metric}_{k}": v for k, v in percentiles(arr, qs).items()})
    return out
