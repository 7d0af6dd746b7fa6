"""Serving end to end: workers x policy x request rate x codec -> latency, throughput, goodput.

One run starts ``workers`` engine processes behind the router (the same code path at one
worker), offers an open-loop load from the load generator, and returns tidy rows:

* ``kind='summary'``: one row with TTFT/TPOT/ITL/E2EL (mean, p50, p90, p99, ms), request and
  token throughput, goodput under ``slo``, kv_cache_usage_perc (peak over the run),
  preemptions, prefix_cache_hit_rate, requests lost (must be 0) and, with ``fault='kill'``,
  time to detect and time to recover;
* ``kind='timeline'``: one row per ``bin_s`` second with completed requests and goodput in
  that bin (the goodput dip around a killed worker).

``device`` is where the engines ran (``cpu`` here); the seed's targets are judged on it in
:mod:`ryzlab.plots.serving`, never projected.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from ..config import Codec, check_choice
from ..orchestrator.balance import PolicyName

__all__ = ["Config", "run"]

log = logging.getLogger(__name__)

Fault = Literal["none", "kill"]
OpenArrival = Literal["poisson", "gamma", "closed"]
Preemption = Literal["recompute", "swap"]


@dataclass(frozen=True, kw_only=True)
class Config:
    workers: int = 1
    """Engine replicas (data parallelism; processes, one per GPU or per tp x cp GPUs where there are GPUs)."""
    tp: int = 1
    """Tensor-parallel ranks per replica."""
    cp: int = 1
    """Context-parallel ranks per replica."""
    policy: PolicyName = "least_outstanding"
    """round_robin, least_outstanding, power_of_two or prefix_affinity."""
    rate: float = 8.0
    """Offered load, requests/s (open loop)."""
    codec: Codec = "none"
    arrival: OpenArrival = "poisson"
    """poisson, gamma (with ``burstiness``) or closed (``concurrency`` users)."""
    burstiness: float = 1.0
    concurrency: int = 16
    num_requests: int = 48
    prompt_len: int = 32
    output_len: int = 16
    shared_prefix_len: int = 0
    model: str = "reference"
    block_size: int = 16
    num_blocks: int = 256
    max_num_seqs: int = 16
    preemption: Preemption = "recompute"
    slo: str = "ttft:1000,tpot:50"
    """Goodput SLOs in ms; the seed's target is P99 < 50 ms (taken as TPOT)."""
    fault: Fault = "none"
    """``kill``: SIGKILL worker 0 at ``fault_at_s`` into the run (needs workers >= 2)."""
    fault_at_s: float = 2.0
    bin_s: float = 0.5
    restart_wait_s: float = 30.0
    """With ``fault='kill'``: wait up to this long after the load for the killed worker's restart
    (measures ``worker_restart_s``; 0 = do not wait)."""
    seed: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        from ..config import CODECS
        from ..orchestrator.balance import POLICY_NAMES
        from ..serve.engine import PREEMPTIONS
        from ..serve.loadgen import ARRIVALS
        from ..serve.metrics import parse_slo

        check_choice("policy", self.policy, POLICY_NAMES)
        check_choice("codec", self.codec, CODECS)
        check_choice("arrival", self.arrival, tuple(a for a in ARRIVALS if a != "trace"))
        check_choice("preemption", self.preemption, PREEMPTIONS)
        check_choice("fault", self.fault, ("none", "kill"))
        parse_slo(self.slo)
        for name in ("workers", "tp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fault == "kill" and self.workers < 2:
            raise ValueError("fault='kill' needs workers >= 2 (someone must take over the work)")
        if not self.bin_s > 0 or not self.timeout_s > 0:
            raise ValueError("bin_s and timeout_s must be > 0")


def _load_spec(c: Config):
    from ..serve.loadgen import LoadSpec

    return LoadSpec(arrival=c.arrival, rate=c.rate, burstiness=c.burstiness, concurrency=c.concurrency,
                    num_requests=c.num_requests, prompt_len=c.prompt_len, output_len=c.output_len,
                    shared_prefix_len=c.shared_prefix_len, seed=c.seed)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(config: Config) -> pd.DataFrame:
    from ..serve.loadgen import run_load, run_sync
    from ..serve.client import backend_client
    from ..serve.metrics import parse_slo
    from ..serve.router import Router

    c = config
    device = _device()
    engine_kwargs = {"model": c.model, "codec": c.codec, "block_size": c.block_size, "num_blocks": c.num_blocks,
                     "device": device, "tp": c.tp, "cp": c.cp,
                     "config": {"max_num_seqs": c.max_num_seqs, "preemption": c.preemption,
                                "max_model_len": max(1024, c.shared_prefix_len + 4 * (c.prompt_len + c.output_len)),
                                "max_num_batched_tokens": max(256, c.max_num_seqs)}}
    router = Router(workers=c.workers, policy=c.policy, engine_kwargs=engine_kwargs,
                    affinity_tokens=max(1, min(c.shared_prefix_len, 4 * c.block_size)) if c.shared_prefix_len
                    else 10 ** 9, seed=c.seed, heartbeat_timeout_s=2.0)
    peak = {"kv_cache_usage_perc": 0.0}
    stop = threading.Event()

    def sample() -> None:  # peak cache usage over the run, from worker heartbeats
        while not stop.wait(0.1):
            m = router.metrics()
            peak["kv_cache_usage_perc"] = max(peak["kv_cache_usage_perc"], m.get("kv_cache_usage_perc", 0.0))

    t_start = time.monotonic()
    with router:
        startup_s = time.monotonic() - t_start
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def main():
            if c.fault == "kill":
                asyncio.get_running_loop().call_later(c.fault_at_s, router.kill_worker, 0)
            return await run_load(_load_spec(c), backend_client(router), timeout_s=c.timeout_s)

        t0 = time.monotonic()
        result = run_sync(main)
        stop.set()
        sampler.join()
        if c.fault == "kill":  # measure the restart too (bounded): wait for worker 0 to be back
            deadline = time.monotonic() + c.restart_wait_s
            while not router.workers[0].healthy and time.monotonic() < deadline:
                time.sleep(0.05)
        metrics = router.metrics()
        events = list(router.events)
    slo = parse_slo(c.slo)
    s = result.summary(slo)
    s.update(kind="summary", device=device, startup_s=startup_s,
             kv_cache_usage_perc=peak["kv_cache_usage_perc"],
             preemptions=metrics.get("preemptions", 0),
             prefix_cache_hit_rate=metrics.get("prefix_cache_hit_rate", math.nan),
             requests_rerouted=metrics.get("rerouted", 0))
    kill_t = next((e["t"] for e in events if e["event"] == "kill"), None)
    det_t = next((e["t"] for e in events if e["event"] == "detected"), None)
    res_t = next((e["t"] for e in events if e["event"] == "restarted"), None)
    s["time_to_detect_s"] = det_t - kill_t if kill_t is not None and det_t is not None else math.nan
    s["worker_restart_s"] = res_t - kill_t if kill_t is not None and res_t is not None else math.nan
    rows = [s]
    # timeline of completions and goodput, relative to the start of the load
    ends = np.array([r.finish_s - t0 for r in result.records if r.ok])
    good = np.array([r.finish_s - t0 for r in result.records if slo.met_by(r)])
    span = max([e for e in ends] + [0.0]) if ends.size else 0.0
    nbins = max(1, int(math.ceil(span / c.bin_s)))
    edges = np.arange(nbins + 1) * c.bin_s
    done_hist = np.histogram(ends, edges)[0] if ends.size else np.zeros(nbins)
    good_hist = np.histogram(good, edges)[0] if good.size else np.zeros(nbins)
    kill_rel = kill_t - t0 if kill_t is not None else math.nan
    for i in range(nbins):
        rows.append({"kind": "timeline", "device": device, "t_s": float(edges[i]),
                     "completed_per_s": done_hist[i] / c.bin_s, "goodput": good_hist[i] / c.bin_s,
                     "fault_at_s": kill_rel})
    # recovery: first bin after the kill whose goodput is back to >= 80% of the pre-kill mean
    if kill_t is not None:
        pre = [r["goodput"] for r in rows[1:] if r["t_s"] + c.bin_s <= kill_rel]
        base = float(np.mean(pre)) if pre else math.nan
        after = [r for r in rows[1:] if r["t_s"] >= kill_rel]
        dip = min((r["goodput"] for r in after), default=math.nan)
        rec = next((r["t_s"] + c.bin_s - kill_rel for r in after if base > 0 and r["goodput"] >= 0.8 * base), math.nan)
        s.update(goodput_before_fault=base, goodput_dip=dip, time_to_recover_s=rec)
    df = pd.DataFrame(rows)
    return df
