"""Placement: which device a rank runs on, and which device is the best one right now.

``device_for_rank`` maps a rank to ``devices[local_rank % n]`` (the torchrun convention), and
when that device is unhealthy walks round-robin to the next fit one, so a node with a dead GPU
still starts. ``optimal_device`` (behind ``get_optimal_device``) picks the device with the lowest
:func:`~ryzlab.orchestrator.health.device_score`. The score is a function of one reading and its
classification, so it lives with them in :mod:`.health` (the monitor's ``get_least_loaded_device``
uses it too); placement only decides, and imports health, never the reverse.
"""
from __future__ import annotations

from ryzlab.orchestrator.health import GPUHealthMonitor, device_score

__all__ = ["device_for_rank", "device_score", "optimal_device", "device_name"]


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


def optimal_device(monitor: GPUHealthMonitor) -> int | None:
    """The fit device with the lowest :func:`device_score`; None when every device is unhealthy."""
    scored = [(device_score(monitor.latest(d), monitor.health(d)), d) for d in range(monitor.device_count)]
    best = min(scored)
    return None if best[0] == float("inf") else best[1]


def device_name(index: int, source: str) -> str:
    """``cuda:<i>`` for NVML-backed devices, ``cpu`` for host ranks (devices are honest)."""
    return f"cuda:{index}" if source == "nvml" else "cpu"
