"""``DistributedOrchestrator``: the seed's entry point, now backed by the real pieces.

It ties together the process group (:mod:`.launch`), health (:mod:`.health`), placement
(:mod:`.placement`) and statistics (:mod:`.stats`) for one rank::

    orch = DistributedOrchestrator(world_size=4)
    orch.initialize(rank)                   # env:// process group, nccl on GPUs else gloo
    device = orch.get_device_for_rank(rank) # "cuda:<i>" or "cpu"
    best = orch.get_optimal_device()        # index by placement.device_score
    orch.update_performance_stats(latency=25.0, success=True)
    orch.get_performance_summary()          # requests, avg_latency, error_rate, healthy_devices, ...
"""
from __future__ import annotations

import logging
import os
from typing import Any

from ryzlab.config import BACKENDS, check_choice
from ryzlab.orchestrator.health import GPUHealthMonitor
from ryzlab.orchestrator.launch import DistContext, init_from_env
from ryzlab.orchestrator.placement import device_for_rank, device_name, optimal_device
from ryzlab.orchestrator.stats import StatsCollector

__all__ = ["DistributedOrchestrator"]

log = logging.getLogger(__name__)


class DistributedOrchestrator:
    """Per-rank coordinator: process group, device choice, health and latency statistics."""

    def __init__(self, world_size: int, *, backend: str = "auto", monitor: GPUHealthMonitor | None = None,
                 reservoir: int | None = 100_000, collective_timeout_s: float = 120.0):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        check_choice("backend", backend, BACKENDS)
        self.world_size = world_size
        self.backend = backend
        self.collective_timeout_s = collective_timeout_s
        self.monitor = monitor if monitor is not None else GPUHealthMonitor()
        self.stats = StatsCollector(reservoir=reservoir)
        self.context: DistContext | None = None

    def initialize(self, rank: int, local_rank: int | None = None) -> DistContext:
        """Join the process group as ``rank`` through ``env://`` (MASTER_ADDR/PORT from the
        environment, as torchrun or :func:`launch` set them; a free local port at world_size 1)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} out of range; valid: 0..{self.world_size - 1}")
        env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if (env_rank is not None and int(env_rank) != rank) or (
                env_world is not None and int(env_world) != self.world_size):
            raise ValueError(f"rank={rank}, world_size={self.world_size} disagree with the environment "
                             f"RANK={env_rank}, WORLD_SIZE={env_world}")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(self.world_size)
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = str(local_rank)
        if self.world_size > 1 and "MASTER_PORT" not in os.environ:
            raise ValueError("world_size > 1 needs MASTER_ADDR/MASTER_PORT in the environment "
                             "(run under torchrun or ryzlab.orchestrator.launch)")
        self.context = init_from_env(self.backend, collective_timeout_s=self.collective_timeout_s)
        log.info("rank %d/%d joined on %s (%s)", rank, self.world_size, self.context.backend, self.context.device)
        return self.context

    def get_device_for_rank(self, rank: int) -> str:
        """``cuda:<i>`` (local rank round-robin over healthy GPUs) or ``cpu`` without GPUs."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} out of range; valid: 0..{self.world_size - 1}")
        local = int(os.environ["LOCAL_RANK"]) if self.context and "LOCAL_RANK" in os.environ else None
        unhealthy = set(range(self.monitor.device_count)) - set(self.monitor.get_healthy_devices())
        index = device_for_rank(rank, self.monitor.device_count, unhealthy, local)
        return device_name(index, self.monitor.source)

    def get_optimal_device(self) -> int | None:
        return optimal_device(self.monitor)

    def update_performance_stats(self, latency: float, success: bool = True, device: int | None = None) -> None:
        """Record one request: ``latency`` in ms, ``success`` False counts toward the error rate."""
        self.stats.record(StatsCollector.ALL if device is None else device, float(latency), success)

    def get_performance_summary(self) -> dict[str, Any]:
        s = self.stats.overall()
        return {"requests": s.requests, "avg_latency": s.mean_ms, "error_rate": s.error_rate,
                "healthy_devices": self.monitor.get_healthy_devices(), "in_flight": self.stats.in_flight(),
                "throughput_rps": s.throughput(), **s.percentiles(), "device_source": self.monitor.source}

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.monitor.close()
        self.context = None
