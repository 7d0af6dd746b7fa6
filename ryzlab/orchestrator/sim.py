"""Discrete-event simulation of FIFO workers behind a router, running the *live* policy code.

Why simulate: this machine has 2 cores, so live runs cannot show 8 or 64 workers at 90% load.
The simulator feeds the same :mod:`~ryzlab.orchestrator.balance` policy objects the serving
router uses, with the same request streams (:mod:`~ryzlab.orchestrator.workload`), and labels
every result ``mode="simulated"``.

Model: each worker serves one request at a time, first come first served; a request of size
``s`` takes ``s * mean_work_ms`` (times ``prefix_hit_cost`` when the worker still holds its
prefix in a small LRU cache). Fault injection mirrors the live pool: at ``fault_at`` (fraction
of the arrival horizon) worker 0 stops (``kill`` or ``pause``); the router keeps sending to
it until detection (``kill``: the supervisor's poll interval; ``pause``: the heartbeat
timeout), then its queued and in-service requests are re-routed with the live pool's
:func:`~ryzlab.orchestrator.faults.reroute` (at most ``max_attempts`` tries each) and a replacement
starts after ``restart_s``. Nothing is dropped: every request completes or is counted failed;
re-routed ones keep their original arrival time, so their latency includes the outage.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from ryzlab.orchestrator.balance import Request, make_policy
from ryzlab.orchestrator.faults import reroute
from ryzlab.orchestrator.run_config import FAULTS, Fault, RunConfig
from ryzlab.orchestrator.workload import PREFIX_CACHE_SIZE, PREFIX_HIT_COST, make_requests

__all__ = ["SimConfig", "simulate", "Fault", "FAULTS"]


@dataclass(frozen=True, kw_only=True)
class SimConfig(RunConfig):
    """A simulated run: the shared knobs (:class:`~ryzlab.orchestrator.run_config.RunConfig`) plus
    the simulator's model of detection, restart and prefix caching."""

    mean_work_ms: float = 10.0
    fault_at: float = 0.5
    """The simulator's own defaults for these two (its tests are calibrated on them)."""
    prefix_hit_cost: float = PREFIX_HIT_COST
    """Service-time factor when the worker still caches the request's prefix (skipped prefill)."""
    prefix_cache_size: int = PREFIX_CACHE_SIZE
    watch_interval_s: float = 0.05
    restart_s: float = 1.0
    max_attempts: int = 3
    """Tries per request, as in the live pool (a request still held at its last try's fault fails)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_attempts < 1:
            raise ValueError(f"need max_attempts >= 1, got {self.max_attempts}")


class _Server:
    def __init__(self) -> None:
        self.queue: deque[Request] = deque()
        self.busy: Request | None = None
        self.epoch = 0  # bumped on crash: completion events of a dead epoch are ignored
        self.alive = True
        self.healthy = True
        self.cache: OrderedDict = OrderedDict()

    @property
    def outstanding(self) -> int:
        return len(self.queue) + (self.busy is not None)


def simulate(cfg: SimConfig) -> tuple["pd.DataFrame", dict]:
    """Run one simulation; returns (one row per request, run-level events and counters)."""
    import pandas as pd

    mean_s = cfg.mean_work_ms / 1000.0
    rate = cfg.load * cfg.workers / mean_s
    arrivals = make_requests(cfg.num_requests, rate, cfg.size_dist, prefixes=cfg.prefixes, seed=cfg.seed)
    policy = make_policy(cfg.policy, seed=cfg.seed)
    servers = [_Server() for _ in range(cfg.workers)]
    arrived: dict[int, float] = {}
    attempts: dict[int, int] = {}
    rows: list[tuple] = []
    failed: list[Request] = []
    events: list[tuple] = []
    seq = itertools.count()
    info = {"fault_t": None, "detect_t": None, "recover_t": None, "rerouted": 0}

    def push(t: float, kind: str, *payload) -> None:
        heapq.heappush(events, (t, next(seq), kind, payload))

    def start_next(t: float, w: int) -> None:
        s = servers[w]
        if s.busy is not None or not s.queue or not s.alive:
            return
        req = s.queue.popleft()
        s.busy = req
        hit = req.prefix_key is not None and req.prefix_key in s.cache
        if req.prefix_key is not None:
            s.cache[req.prefix_key] = True
            s.cache.move_to_end(req.prefix_key)
            if len(s.cache) > cfg.prefix_cache_size:
                s.cache.popitem(last=False)
        service = req.size * mean_s * (cfg.prefix_hit_cost if hit else 1.0)
        push(t + service, "done", w, s.epoch, req, t, hit)

    def dispatch(t: float, req: Request) -> None:
        w = policy.choose(req, servers)
        if w is None:  # every worker down: retry when the replacement is up
            push(t + cfg.watch_interval_s, "retry", req)
            return
        attempts[req.id] = attempts.get(req.id, 0) + 1
        servers[w].queue.append(req)
        start_next(t, w)

    for a in arrivals:
        push(a.t, "arrive", a.request)
    if cfg.fault != "none":
        fault_t = arrivals[int(cfg.fault_at * (len(arrivals) - 1))].t
        push(fault_t, "fault", 0)

    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            arrived[payload[0].id] = t
            dispatch(t, payload[0])
        elif kind == "retry":
            dispatch(t, payload[0])
        elif kind == "done":
            w, epoch, req, started, hit = payload
            s = servers[w]
            if epoch != s.epoch:
                continue
            s.busy = None
            rows.append((req.id, w, req.size, req.prefix_key is not None and hit, arrived[req.id], started,
                         t, attempts[req.id]))
            start_next(t, w)
        elif kind == "fault":
            w = payload[0]
            servers[w].alive = False
            servers[w].epoch += 1
            info["fault_t"] = t
            delay = cfg.watch_interval_s if cfg.fault == "kill" else cfg.heartbeat_timeout_s
            push(t + delay, "detect", w)
        elif kind == "detect":
            w = payload[0]
            s = servers[w]
            s.healthy = False
            info["detect_t"] = t
            stranded = ([s.busy] if s.busy is not None else []) + list(s.queue)
            s.busy, s.queue, s.cache = None, deque(), OrderedDict()
            info["rerouted"] += len(stranded)
            reroute(policy, w, stranded, attempts=lambda r: attempts[r.id], max_attempts=cfg.max_attempts,
                    send=lambda r: dispatch(t, r), give_up=failed.append)
            push(t + cfg.restart_s, "restart", w)
        elif kind == "restart":
            s = servers[payload[0]]
            s.alive = s.healthy = True
            info["recover_t"] = t

    df = pd.DataFrame(rows, columns=["request_id", "worker", "size", "prefix_hit", "arrival_s",
                                     "start_s", "end_s", "attempts"])
    df["e2el_ms"] = (df["end_s"] - df["arrival_s"]) * 1000.0
    df["mode"] = "simulated"
    info.update(mode="simulated", submitted=len(arrivals), completed=int(df["request_id"].nunique()), failed=len(failed),
                offered_rps=rate, capacity_rps=cfg.workers / mean_s, duration_s=float(df["end_s"].max()))
    assert info["completed"] + info["failed"] == len(arrivals), "simulator lost a request"
    return df, info
