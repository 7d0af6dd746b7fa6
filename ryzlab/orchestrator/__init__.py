"""Multi-device orchestration: launch + process groups, health, placement, balancing, stats, faults.

Public names (the seed's included): ``launch``, ``init_from_env``, ``DistributedOrchestrator``,
``GPUHealthMonitor``, ``GPUStats``, ``make_policy``, ``StatsCollector``, ``WorkerPool`` (compute
workers on ``ProcessPool``, the one worker pool the serving router runs on too),
``simulate``/``SimConfig`` and ``run_live``/``LiveConfig`` (same policy code, ``mode`` says which).
"""
from .balance import (POLICY_NAMES, LeastOutstanding, PolicyName, PowerOfTwo, PrefixAffinity, Request,
                      RoundRobin, WorkerView, make_policy)
from .faults import FaultRecord, WorkerPool
from .health import DeviceHealth, GPUHealthMonitor, GPUStats, Thresholds, classify
from .launch import (DistContext, LaunchError, LaunchTimeoutError, RankFailedError, choose_backend,
                     init_from_env, launch)
from .live import LiveConfig, run_live
from .orchestrator import DistributedOrchestrator
from .pool import ProcessPool, reroute
from .placement import device_for_rank, device_score, optimal_device
from .sim import FAULTS, SimConfig, simulate
from .stats import LatencyStats, StatsCollector

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
