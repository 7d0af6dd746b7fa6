"""Live runs: replay a request stream open-loop against real worker processes, optionally
injecting a fault mid-run. Same inputs and outputs as :func:`ryzlab.orchestrator.sim.simulate`,
labelled ``mode="live"``.

Offered load is relative to a nominal capacity of ``min(workers, cpu_count) / mean_work``:
workers beyond the core count share cores, so they add no capacity. Other processes on the
machine lower the real capacity, which shows up as higher latency, never as a hidden rescale.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ryzlab.orchestrator.balance import make_policy
from ryzlab.orchestrator.run_config import RunConfig
from ryzlab.orchestrator.workers import WorkerPool
from ryzlab.orchestrator.workload import make_requests

__all__ = ["LiveConfig", "run_live", "nominal_capacity_rps"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LiveConfig(RunConfig):
    """A live run: the shared knobs (:class:`~ryzlab.orchestrator.run_config.RunConfig`) plus the
    live pool's heartbeat, restart and deadline."""

    heartbeat_interval_s: float = 0.1
    restart: bool = True
    timeout_s: float = 120.0


def nominal_capacity_rps(workers: int, mean_work_ms: float) -> float:
    return min(workers, os.cpu_count() or 1) / (mean_work_ms / 1000.0)


def run_live(cfg: LiveConfig, pool: WorkerPool | None = None) -> tuple["object", dict]:
    """Replay ``cfg``'s stream on live workers; returns (one row per request, run-level info).

    ``pool`` lets a caller reuse started workers across runs (its policy is replaced); by
    default a pool is started and closed here.
    """
    import pandas as pd

    capacity = nominal_capacity_rps(cfg.workers, cfg.mean_work_ms)
    rate = cfg.load * capacity
    arrivals = make_requests(cfg.num_requests, rate, cfg.size_dist, prefixes=cfg.prefixes, seed=cfg.seed)
    policy = make_policy(cfg.policy, seed=cfg.seed)
    own = pool is None
    if own:
        pool = WorkerPool(cfg.workers, policy, mean_work_ms=cfg.mean_work_ms,
                          heartbeat_interval_s=cfg.heartbeat_interval_s,
                          heartbeat_timeout_s=cfg.heartbeat_timeout_s, restart=cfg.restart)
        pool.start()
    else:
        if pool.n != cfg.workers:
            raise ValueError(f"pool has {pool.n} workers, config asks for {cfg.workers}")
        pool.reset()
        pool.policy = policy
    try:
        fault_i = int(cfg.fault_at * (len(arrivals) - 1)) if cfg.fault != "none" else -1
        t0 = time.time()
        for i, a in enumerate(arrivals):
            delay = t0 + a.t - time.time()
            if delay > 0:
                time.sleep(delay)
            if i == fault_i:
                pool.inject(0, cfg.fault)
            pool.submit(a.request)
        finished = pool.wait_all(cfg.timeout_s)
        rows = pool.unit_rows()
        faults = list(pool.faults)
        dup = pool.duplicates
        per_product = pool.per_product_s
    finally:
        if own:
            pool.close()
    df = pd.DataFrame(rows)
    t_start = df["submit_t"].min()
    for col in ("submit_t", "start_t", "end_t"):
        df[col.replace("_t", "_s")] = df[col] - t_start
    df = df.drop(columns=["submit_t", "start_t", "end_t"]).rename(columns={"submit_s": "arrival_s"})
    df["mode"] = "live"
    done = df["state"] == "done"
    injected = [f for f in faults if f.kind in ("kill", "pause")]
    f0 = injected[0] if injected else None
    info = {
        "mode": "live", "submitted": len(arrivals), "completed": int(done.sum()), "failed": int((df["state"] == "failed").sum()),
        "finished_in_time": finished, "offered_rps": rate, "capacity_rps": capacity,
        "duration_s": float(df.loc[done, "end_s"].max()) if done.any() else float("nan"),
        "rerouted": sum(len(f.rerouted) for f in faults), "duplicates": dup, "faults_detected": len(faults),
        "fault_t": None if f0 is None else f0.fault_t - t_start,
        "detect_t": None if f0 is None or f0.detect_t is None else f0.detect_t - t_start,
        "recover_t": None if f0 is None or f0.recover_t is None else f0.recover_t - t_start,
        "ready_t": None if f0 is None or f0.ready_t is None else f0.ready_t - t_start,
        "per_product_us": 1e6 * sum(per_product) / len(per_product),
    }
    return df, info
