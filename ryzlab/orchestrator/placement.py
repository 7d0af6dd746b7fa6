"""Placement: which device a rank runs on, and which device is the best one right now.

``device_for_rank`` maps a rank to ``devices[local_rank % n]`` (the torchrun convention), and
when that device is unhealthy walks round-robin to the next fit one, so a node with a dead GPU
still starts. ``device_score`` is the documented score behind ``get_optimal_device``:

    score = 0.5 * utilization + 0.3 * memory_used_fraction + 0.2 * temperature / 90 C
            + 1.0 if degraded

Lower is better. Utilization weighs most because it is what a new request waits behind;
memory next because a full device cannot take new KV blocks; temperature last, as an early
sign of throttling. Missing readings count as 0 (a device with no reading yet is not
penalised), and a degraded device always loses to a healthy one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ryzlab.orchestrator.health import DeviceHealth, GPUStats

if TYPE_CHECKING:
    from ryzlab.orchestrator.health import GPUHealthMonitor

__all__ = ["device_for_rank", "device_score", "optimal_device", "device_name"]

W_UTIL, W_MEM, W_TEMP, DEGRADED_PENALTY, TEMP_SCALE_C = 0.5, 0.3, 0.2, 1.0, 90.0


def device_score(stats: GPUStats | None, health: DeviceHealth | None = None) -> float:
    """Lower is better; ``inf`` for an unhealthy device."""
    if health is not None and health.status == "unhealthy":
        return float("inf")
    score = 0.0
    if stats is not None:
        score += W_UTIL * (stats.utilization_pct or 0.0) / 100.0
        score += W_MEM * (stats.memory_frac or 0.0)
        score += W_TEMP * (stats.temperature_c or 0.0) / TEMP_SCALE_C
    if health is not None and health.status == "degraded":
        score += DEGRADED_PENALTY
    return score


def device_for_rank(rank: int, device_count: int, unhealthy: set[int] | frozenset[int] = frozenset(),
                    local_rank: int | None = None) -> int:
    """Device index for ``rank`` (``local_rank`` when given, as under torchrun), skipping unhealthy."""
    if device_count < 1:
        raise ValueError(f"device_count must be >= 1, got {device_count}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    start = (rank if local_rank is None else local_rank) % device_count
    for step in range(device_count):
        d = (start + step) % device_count
        if d not in unhealthy:
            return d
    raise RuntimeError(f"no healthy device for rank {rank}: all {device_count} are unhealthy")


def optimal_device(monitor: "GPUHealthMonitor") -> int | None:
    """The fit device with the lowest :func:`device_score`; None when every device is unhealthy."""
    scored = [(device_score(monitor.latest(d), monitor.health(d)), d) for d in range(monitor.device_count)]
    best = min(scored)
    return None if best[0] == float("inf") else best[1]


def device_name(index: int, source: str) -> str:
    """``cuda:<i>`` for NVML-backed devices, ``cpu`` for host ranks (devices are honest)."""
    return f"cuda:{index}" if source == "nvml" else "cpu"
