"""Discrete-event simulation of FIFO workers behind a router, running the *live* policy code.

Why simulate: this machine has 2 cores, so live runs cannot show 8 or 64 workers at 90% load.
The simulator feeds the same :mod:`~ryzlab.orchestrator.balance` policy objects the serving
router uses, with the same request streams (:mod:`~ryzlab.orchestrator.workload`), and labels
every result ``mode="simulated"``.

Model: each worker serves one request at a time, first come first served; a request of size
``s`` takes ``s * mean_service_ms`` (times ``prefix_hit_cost`` when the worker still holds its
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
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import pandas as pd

import numpy as np

from ryzlab.config import check_choice
from ryzlab.orchestrator.balance import POLICY_NAMES, Request, make_policy
from ryzlab.orchestrator.faults import reroute
from ryzlab.orchestrator.workload import PREFIX_CACHE_SIZE, PREFIX_HIT_COST, SIZE_DISTS, make_requests

__all__ = ["SimConfig", "simulate", "Fault", "FAULTS"]

Fault = Literal["none", "kill", "pause"]
FAULTS: tuple[str, ...] = get_args(Fault)


def check_run_choices(policy: str, size_dist: str, fault: str) -> None:
    """The choices a simulated and a live run share; each error names the valid values."""
    check_choice("policy", policy, POLICY_NAMES)
    check_choice("size_dist", size_dist, SIZE_DISTS)
    check_choice("fault", fault, FAULTS)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    policy: str = "round_robin"
    workers: int = 8
    load: float = 0.9
    """Offered load as a fraction of total capacity (workers / mean service time)."""
    n_requests: int = 20000
    size_dist: str = "bimodal"
    mean_service_ms: float = 10.0
    prefixes: int = 0
    """Distinct prefix keys (0: requests carry none)."""
    prefix_hit_cost: float = PREFIX_HIT_COST
    """Service-time factor when the worker still caches the request's prefix (skipped prefill)."""
    prefix_cache_size: int = PREFIX_CACHE_SIZE
    fault: Fault = "none"
    fault_at: float = 0.5
    watch_interval_s: float = 0.05
    heartbeat_timeout_s: float = 1.0
    """Time to detect a pause (the live pool's timeout is at least this, more when beats come late)."""
    restart_s: float = 1.0
    max_attempts: int = 3
    """Tries per request, as in the live pool (a request still held at its last try's fault fails)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_run_choices(self.policy, self.size_dist, self.fault)
        if (self.workers < 1 or self.n_requests < 1 or not 0 < self.load or self.mean_service_ms <= 0
                or self.max_attempts < 1):
            raise ValueError(f"need workers >= 1, n_requests >= 1, load > 0, mean_service_ms > 0, max_attempts >= 1; "
                             f"got {self.workers}, {self.n_requests}, {self.load}, {self.mean_service_ms}, "
                             f"{self.max_attempts}")
        if self.fault != "none" and self.workers < 2:
            raise ValueError("fault injection needs workers >= 2 (someone must take the re-routed work)")


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

    mean_s = cfg.mean_service_ms / 1000.0
    rate = cfg.load * cfg.workers / mean_s
    arrivals = make_requests(cfg.n_requests, rate, cfg.size_dist, prefixes=cfg.prefixes, seed=cfg.seed)
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
