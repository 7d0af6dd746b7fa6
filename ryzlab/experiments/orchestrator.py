"""Orchestrator experiment: balancing policy x offered load x workers x fault -> tail latency,
throughput, errors, time-to-detect, time-to-recover and work lost.

``mode="live"`` runs real CPU worker processes (matrix products sized by each request) with
heartbeats and the watchdog of :mod:`ryzlab.orchestrator.workers`; ``mode="simulated"`` runs
the same policy objects in the discrete-event simulator, to reach worker counts and loads this
machine cannot. Every row says which (``mode``) and where it ran (``device``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from ryzlab.analysis import TAIL_PERCENTILES, summary_columns
from ryzlab.orchestrator.balance import PolicyName
from ryzlab.orchestrator.live import LiveConfig, run_live
from ryzlab.orchestrator.run_config import Fault, RunFields
from ryzlab.orchestrator.sim import SimConfig, simulate

__all__ = ["Config", "run", "summarize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PolicyGrid:
    """What the experiment sweeps: every policy x load x worker count x fault, live or simulated."""

    mode: Literal["live", "simulated"] = "simulated"
    policies: tuple[PolicyName, ...] = ("round_robin", "least_outstanding", "power_of_two", "prefix_affinity")
    loads: tuple[float, ...] = (0.5, 0.9)
    """Offered load as a fraction of nominal capacity (live: min(workers, cores) / mean work)."""
    worker_counts: tuple[int, ...] = (4,)
    faults: tuple[Fault, ...] = ("none", "kill", "pause")
    """Worker 0 is killed (SIGKILL) or paused (SIGSTOP) at ``fault_at`` of the arrival horizon."""


@dataclass(frozen=True, kw_only=True)
class Config(RunFields, PolicyGrid):
    """The grid (:class:`PolicyGrid`, first in the notebook) with the knobs every run of it shares
    (:class:`~ryzlab.orchestrator.run_config.RunFields`: request stream, fault timing, seed)."""

    sim_restart_s: float = 1.0
    """Simulated restart time (live runs measure theirs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("policies", "loads", "worker_counts", "faults"):
            if not getattr(self, name):
                raise ValueError(f"{name} must list at least one value")
        if any(l <= 0 for l in self.loads) or any(w < 1 for w in self.worker_counts):
            raise ValueError(f"loads must be > 0 and worker_counts >= 1, got {self.loads}, {self.worker_counts}")
        if any(f != "none" for f in self.faults) and min(self.worker_counts) < 2:
            raise ValueError("kill/pause faults need worker_counts >= 2 (someone must take the re-routed work)")
        if self.num_requests < 10 or not 0 < self.fault_at < 1:
            raise ValueError(f"need num_requests >= 10, 0 < fault_at < 1; got {self.num_requests}, {self.fault_at}")


def summarize(df: pd.DataFrame, info: dict) -> dict:
    """One result row from a run's per-request rows and run-level info (live and simulated alike)."""
    ok = df[df["state"] == "done"] if "state" in df.columns else df
    lat = ok["e2el_ms"].to_numpy(dtype=float)
    span = info["duration_s"] - float(df["arrival_s"].min())
    fault_t = info.get("fault_t")
    return {
        **summary_columns("e2el_ms", lat, TAIL_PERCENTILES),
        "e2el_ms_mean": float(lat.mean()) if lat.size else np.nan,
        "throughput_rps": len(ok) / span if span > 0 else np.nan,
        "offered_rps": info["offered_rps"], "capacity_rps": info["capacity_rps"],
        "submitted": info["submitted"], "completed": info["completed"], "failed": info["failed"],
        "error_rate": info["failed"] / info["submitted"],
        "work_lost": info["submitted"] - info["completed"] - info["failed"],
        "rerouted": info["rerouted"],
        "time_to_detect_s": (info["detect_t"] - fault_t) if fault_t is not None and info.get("detect_t") is not None else np.nan,
        "time_to_recover_s": (info["recover_t"] - fault_t) if fault_t is not None and info.get("recover_t") is not None else np.nan,
        "prefix_cache_hit_rate": float(df["prefix_hit"].mean()) if "prefix_hit" in df.columns else np.nan,
    }


def run(config: Config) -> pd.DataFrame:
    """One row per (policy, load, workers, fault): latency percentiles, rates, fault timings."""
    from ryzlab.orchestrator import WorkerPool, make_policy
    from ryzlab.provenance import device_summary

    device = device_summary()["device"]
    rows = []
    for workers in config.worker_counts:
        pool = None
        if config.mode == "live":  # one pool per worker count, reused: start-up is not the subject
            pool = WorkerPool(workers, make_policy("round_robin"), mean_work_ms=config.mean_work_ms,
                              heartbeat_timeout_s=config.heartbeat_timeout_s)
            pool.start()
        try:
            for fault in config.faults:
                for load in config.loads:
                    for policy in config.policies:
                        knobs = {f.name: getattr(config, f.name) for f in dataclasses.fields(RunFields)}
                        common = dict(policy=policy, workers=workers, load=load, fault=fault, **knobs)
                        if config.mode == "live":
                            df, info = run_live(LiveConfig(**common), pool=pool)
                        else:
                            df, info = simulate(SimConfig(restart_s=config.sim_restart_s, **common))
                        assert info["mode"] == config.mode, "a run must say what it was"
                        row = {"mode": info["mode"], "device": device, "policy": policy, "load": load,
                               "workers": workers, "fault": fault, **summarize(df, info)}
                        if not config.prefixes:
                            row["prefix_cache_hit_rate"] = np.nan  # requests carried no prefix
                        log.info("%s %s load=%.2f workers=%d fault=%s: p99 %.1f ms, lost %d", config.mode, policy,
                                 load, workers, fault, row["e2el_ms_p99"], row["work_lost"])
                        rows.append(row)
        finally:
            if pool is not None:
                pool.close()
    return pd.DataFrame(rows)
