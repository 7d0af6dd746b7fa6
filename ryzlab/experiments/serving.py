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

What is measured (the ``engine`` and ``via`` columns say which):

* default: ryzlab's router and engines, driven in-process (``via='in-process'``);
* ``engine='transformers'``: the peer, transformers' continuous batching on the same weights
  (:mod:`ryzlab.serve.peer`), started as a server process and driven over HTTP;
* ``endpoint='http://host:port/v1'``: any OpenAI-compatible server already running (vLLM,
  SGLang, llama.cpp, ``ryzlab serve``); nothing is started, ``device='remote'``.

Over HTTP, prompts are text sized from the server's own token counts and TPOT uses the
server's ``usage`` (see :mod:`ryzlab.loadgen.client`); the probe's findings are columns too.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ryzlab.config import Codec, LoadFields, ParallelFields, Preemption, check_choice
from ryzlab.orchestrator.balance import PolicyName

__all__ = ["Config", "run"]

if TYPE_CHECKING:
    from ryzlab.serve.spec import ReplicaSpec

log = logging.getLogger(__name__)

Fault = Literal["none", "kill"]
Via = Literal["auto", "in-process", "http"]
EngineName = Literal["ryzlab", "transformers"]
OpenArrival = Literal["poisson", "gamma", "closed"]


@dataclass(frozen=True, kw_only=True)
class Config(LoadFields, ParallelFields):
    """``workers`` replicas of one tp x cp layout (:class:`~ryzlab.config.ParallelFields`, per replica)
    under one offered load (:class:`~ryzlab.config.LoadFields`, as the load generator's ``LoadSpec``)."""

    rate: float = 8.0
    concurrency: int = 16
    num_requests: int = 48
    """The experiment's own defaults for these three (a short run on the 2-core machine)."""
    workers: int = 1
    """Engine replicas (data parallelism; processes, one per GPU or per tp x cp GPUs where there are GPUs)."""
    policy: PolicyName = "least_outstanding"
    """round_robin, least_outstanding, power_of_two or prefix_affinity."""
    codec: Codec = "none"
    arrival: OpenArrival = "poisson"
    """poisson, gamma (with ``burstiness``) or closed (``concurrency`` users)."""
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
    engine: EngineName = "ryzlab"
    """Which engine to start: ryzlab's (router, in-process load) or ``transformers`` (the peer:
    its continuous batching on the same checkpoint, a server process measured over HTTP)."""
    via: Via = "auto"
    """How the engine is driven: ``auto`` (ryzlab in-process; the peer and an endpoint over HTTP),
    ``in-process`` (router + engines, load generator in this process) or ``http`` (``ryzlab serve`` started as a server process, one thread, measured over
    HTTP by the same client as the transformers peer: the like-for-like comparison with the peer)."""
    endpoint: str = ""
    """An OpenAI-compatible base URL (``http://host:port/v1``) to measure instead of starting an
    engine; empty = start one (``engine``)."""
    served_model: str = ""
    """Model name at ``endpoint`` (empty: the first of its ``GET /models``)."""
    api: str = "completions"
    """``completions`` or ``chat`` (over HTTP only)."""

    @property
    def over_http(self) -> bool:
        """Whether this point is measured over HTTP (a server process or an endpoint)."""
        return bool(self.endpoint) or self.engine == "transformers" or self.via == "http"

    def __post_init__(self) -> None:
        from ryzlab.config import CODECS
        from ryzlab.orchestrator.balance import POLICY_NAMES
        from ryzlab.config import PREEMPTIONS
        from ryzlab.loadgen.load import ARRIVALS
        from ryzlab.loadgen.metrics import parse_slo

        check_choice("policy", self.policy, POLICY_NAMES)
        check_choice("codec", self.codec, CODECS)
        check_choice("arrival", self.arrival, tuple(a for a in ARRIVALS if a != "trace"))
        check_choice("preemption", self.preemption, PREEMPTIONS)
        check_choice("fault", self.fault, ("none", "kill"))
        check_choice("engine", self.engine, ("ryzlab", "transformers"))
        from ryzlab.loadgen.client import APIS

        check_choice("api", self.api, APIS)
        parse_slo(self.slo)
        if self.endpoint:
            from ryzlab.loadgen.cli import check_url

            check_url(self.endpoint)
        check_choice("via", self.via, ("auto", "in-process", "http"))
        if (self.endpoint or self.engine == "transformers") and self.via == "in-process":
            raise ValueError("via='in-process' drives ryzlab's own engine only: the transformers peer and an "
                             "endpoint are measured over HTTP (leave via='auto' or set via='http')")
        if self.over_http:
            what = (f"endpoint={self.endpoint!r}" if self.endpoint
                    else "engine='transformers'" if self.engine == "transformers" else "via='http'")
            bad = [f"{k}={getattr(self, k)!r}" for k, ok in (("workers", 1), ("tp", 1), ("cp", 1), ("codec", "none"),
                                                              ("fault", "none")) if getattr(self, k) != ok]
            if self.endpoint and self.engine != "ryzlab":
                bad.append(f"engine={self.engine!r} (an endpoint is measured, nothing is started)")
            if bad:
                raise ValueError(f"{what} measures one server as it is: {', '.join(bad)} cannot apply "
                                 f"(leave workers=1, tp=1, cp=1, codec='none', fault='none')")
        for name in ("workers", "tp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fault == "kill" and self.workers < 2:
            raise ValueError("fault='kill' needs workers >= 2 (someone must take over the work)")
        if not self.bin_s > 0 or not self.timeout_s > 0:
            raise ValueError("bin_s and timeout_s must be > 0")


def _load_spec(c: Config):
    from ryzlab.loadgen.load import LoadSpec

    return LoadSpec(arrival=c.arrival, rate=c.rate, burstiness=c.burstiness, concurrency=c.concurrency,
                    num_requests=c.num_requests, prompt_len=c.prompt_len, output_len=c.output_len,
                    shared_prefix_len=c.shared_prefix_len, seed=c.seed)


def _max_model_len(c: Config) -> int:
    return max(1024, c.shared_prefix_len + 4 * (c.prompt_len + c.output_len))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_http(c: Config) -> pd.DataFrame:
    """Measure an endpoint, or a one-thread server of ``c.engine`` started here, over HTTP."""
    import contextlib

    from ryzlab.loadgen.client import free_port, openai_client, probe_endpoint, serve_subprocess, served_models, server_argv
    from ryzlab.loadgen.load import run_load, run_sync

    if c.endpoint:
        server = contextlib.nullcontext(c.endpoint.rstrip("/"))
        device = "remote"
    else:
        port = free_port()
        server = serve_subprocess(server_argv(
            c.engine, model=c.model, port=port, block_size=c.block_size, num_blocks=c.num_blocks,
            max_num_seqs=c.max_num_seqs, max_model_len=_max_model_len(c), threads=1), port=port)
        device = _device()
    t_start = time.monotonic()
    with server as url:
        startup_s = time.monotonic() - t_start
        model = c.served_model or served_models(url)[0]
        profile = probe_endpoint(url, model, api=c.api)
        result = run_sync(lambda: run_load(_load_spec(c), openai_client(profile), timeout_s=c.timeout_s))
    engine = c.engine if not c.endpoint else f"endpoint:{model}"
    df = result.tidy(c.slo, bin_s=c.bin_s, device=device, engine=engine, via="http")
    for k, v in profile.as_dict().items():
        df.loc[df["kind"] == "summary", k] = v
    df.loc[df["kind"] == "summary", "startup_s"] = startup_s
    return df


def replica_spec(c: Config, device: str = "cpu") -> ReplicaSpec:
    """The :class:`~ryzlab.serve.spec.ReplicaSpec` of each worker of this point."""
    from ryzlab.config import CacheConfig, ParallelConfig
    from ryzlab.serve.scheduler import EngineConfig
    from ryzlab.serve.spec import ReplicaSpec

    return ReplicaSpec(model=c.model, device=device,
                       cache=CacheConfig(codec=c.codec, block_size=c.block_size, num_blocks=c.num_blocks),
                       parallel=ParallelConfig(tp=c.tp, cp=c.cp),
                       engine=EngineConfig(max_num_seqs=c.max_num_seqs, preemption=c.preemption,
                                           max_model_len=_max_model_len(c),
                                           max_num_batched_tokens=max(256, c.max_num_seqs)))


def run(config: Config) -> pd.DataFrame:
    if config.over_http:
        return _run_http(config)
    from ryzlab.loadgen.load import run_load, run_sync
    from ryzlab.loadgen.metrics import parse_slo
    from ryzlab.serve.local import backend_client
    from ryzlab.serve.router import Router

    c = config
    device = _device()
    router = Router(workers=c.workers, policy=c.policy, spec=replica_spec(c, device),
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
    kill_t = next((e["t"] for e in events if e["event"] == "kill"), None)
    det_t = next((e["t"] for e in events if e["event"] == "detected"), None)
    res_t = next((e["t"] for e in events if e["event"] == "restarted"), None)
    df = result.tidy(slo, bin_s=c.bin_s, fault_t=kill_t, device=device, engine="ryzlab", via="in-process")
    s = {"startup_s": startup_s, "kv_cache_usage_perc": peak["kv_cache_usage_perc"],
         "preemptions": metrics.get("preemptions", 0),
         "prefix_cache_hit_rate": metrics.get("prefix_cache_hit_rate", math.nan),
         "requests_rerouted": metrics.get("rerouted", 0),
         "time_to_detect_s": det_t - kill_t if kill_t is not None and det_t is not None else math.nan,
         "worker_restart_s": res_t - kill_t if kill_t is not None and res_t is not None else math.nan}
    rows = df[df["kind"] == "timeline"].to_dict("records")
    kill_rel = kill_t - result.t0 if kill_t is not None else math.nan
    # recovery: first bin after the kill whose goodput is back to >= 80% of the pre-kill mean
    if kill_t is not None:
        pre = [r["goodput"] for r in rows if r["t_s"] + c.bin_s <= kill_rel]
        base = float(np.mean(pre)) if pre else math.nan
        after = [r for r in rows if r["t_s"] >= kill_rel]
        dip = min((r["goodput"] for r in after), default=math.nan)
        rec = next((r["t_s"] + c.bin_s - kill_rel for r in after if base > 0 and r["goodput"] >= 0.8 * base), math.nan)
        s.update(goodput_before_fault=base, goodput_dip=dip, time_to_recover_s=rec)
    for k, v in s.items():
        df.loc[df["kind"] == "summary", k] = v
    return df
