"""Multi-device orchestration: launch + process groups, health, placement, balancing, stats, faults.

Public names (the seed's included): ``launch``, ``init_from_env``, ``DistributedOrchestrator``,
``GPUHealthMonitor``, ``GPUStats``, ``make_policy``, ``StatsCollector``, ``WorkerPool`` (compute
workers on ``ProcessPool``, the one worker pool the serving router runs on too; faults, beat
timeouts and re-routing in ``faults``),
``simulate``/``SimConfig`` and ``run_live``/``LiveConfig`` (same policy code, ``mode`` says which).
"""
from ryzlab.orchestrator.balance import (POLICY_NAMES, LeastOutstanding, PolicyName, PowerOfTwo, PrefixAffinity, Request,
                      RoundRobin, WorkerView, make_policy)
from ryzlab.orchestrator.faults import FaultRecord, reroute
from ryzlab.orchestrator.health import DeviceHealth, GPUHealthMonitor, GPUStats, Thresholds, classify
from ryzlab.orchestrator.launch import (DistContext, LaunchError, LaunchTimeoutError, RankFailedError, choose_backend,
                     init_from_env, launch)
from ryzlab.orchestrator.live import LiveConfig, run_live
from ryzlab.orchestrator.orchestrator import DistributedOrchestrator
from ryzlab.orchestrator.pool import ProcessPool
from ryzlab.orchestrator.placement import device_for_rank, device_score, optimal_device
from ryzlab.orchestrator.sim import FAULTS, SimConfig, simulate
from ryzlab.orchestrator.stats import LatencyStats, StatsCollector
from ryzlab.orchestrator.workers import WorkerPool

__all__ = [
    "launch", "init_from_env", "choose_backend", "DistContext", "LaunchError", "RankFailedError",
    "LaunchTimeoutError",
    "make_policy", "POLICY_NAMES", "PolicyName", "WorkerView", "Request", "RoundRobin",
    "LeastOutstanding", "PowerOfTwo", "PrefixAffinity",
    "DistributedOrchestrator", "GPUHealthMonitor", "GPUStats", "Thresholds", "DeviceHealth", "classify",
    "device_for_rank", "device_score", "optimal_device",
    "LatencyStats", "StatsCollector", "WorkerPool", "FaultRecord", "ProcessPool", "reroute",
    "SimConfig", "simulate", "FAULTS", "LiveConfig", "run_live",
]
