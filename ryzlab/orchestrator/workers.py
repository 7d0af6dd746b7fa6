"""Live compute workers: the one pool (:mod:`.pool`) running :mod:`.worker`, with fault tolerance.

:class:`WorkerPool` runs ``n`` real worker processes behind a balancing policy (:mod:`.balance`)
and guarantees that every submitted unit of work ends as *completed* or *failed* -- never
silently lost. Detection, re-routing (at most ``max_attempts`` tries per unit) and restart are
the shared pool's (:class:`~ryzlab.orchestrator.pool.ProcessPool`, also under the serving router);
this module adds the units, their statistics and the recovery time of each fault:
``fault_t`` (when injected, or detection time for faults that were not injected), ``detect_t``,
``ready_t`` (replacement serving) and ``recover_t`` (replacement serving *and* all re-routed units
finished), all on the pool's monotonic clock.

A unit finishing twice is counted once (``duplicates``); a failed worker's pipe is read to the end
before its units are re-routed and then closed, so results already sent are not redone.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from ryzlab.orchestrator.balance import Request
from ryzlab.orchestrator.faults import INJECT_KINDS, FaultRecord, InjectKind, reroute
from ryzlab.orchestrator.pool import ProcessPool, Slot
from ryzlab.orchestrator.stats import StatsCollector

__all__ = ["WorkerPool", "FaultRecord", "UnitRecord", "InjectKind", "INJECT_KINDS"]

log = logging.getLogger(__name__)


@dataclass
class UnitRecord:
    request: Request
    submit_t: float
    attempts: int = 0
    worker: int | None = None
    start_t: float | None = None
    end_t: float | None = None
    dispatch_t: float | None = None
    state: Literal["pending", "running", "done", "failed"] = "pending"
    served_by: int | None = None
    prefix_hit: bool = False


class WorkerPool(ProcessPool):
    """Live compute workers + policy + watchdog (the shared pool). Use as a context manager."""

    def __init__(self, n_workers: int, policy: Any, *, mean_work_ms: float = 5.0,
                 heartbeat_interval_s: float = 0.1, heartbeat_timeout_s: float = 1.0,
                 progress_timeout_s: float = 10.0, watch_interval_s: float = 0.05, max_attempts: int = 3,
                 restart: bool = True, start_timeout_s: float = 60.0, reservoir: int | None = 100_000):
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        if not 0 < heartbeat_interval_s < heartbeat_timeout_s:
            raise ValueError(f"need 0 < heartbeat_interval_s < heartbeat_timeout_s, got "
                             f"{heartbeat_interval_s}, {heartbeat_timeout_s}")
        if mean_work_ms <= 0 or max_attempts < 1:
            raise ValueError(f"need mean_work_ms > 0 and max_attempts >= 1, got {mean_work_ms}, {max_attempts}")
        from ryzlab.orchestrator.launch import mp_context

        super().__init__(n_workers, policy, ctx=mp_context("forkserver"),  # a restart forks in ms
                         heartbeat_interval_s=heartbeat_interval_s, heartbeat_timeout_s=heartbeat_timeout_s,
                         progress_timeout_s=progress_timeout_s, watch_interval_s=watch_interval_s,
                         max_attempts=max_attempts, restart=restart, start_timeout_s=start_timeout_s)
        self.n = n_workers
        self.mean_work_ms = mean_work_ms
        self.units: dict[int, UnitRecord] = {}
        self.duplicates = 0
        self.stats = StatsCollector(reservoir=reservoir)
        """Per-worker *attempt* statistics (an attempt on a failed worker counts as an error there)."""
        self.per_product_s: list[float] = [float("nan")] * n_workers
        self._waiting: list[int] = []  # units with no healthy worker to go to (yet)

    @property
    def views(self) -> list[Slot]:
        """What the policy sees of each worker (``healthy``, ``outstanding``)."""
        return self.workers

    def __enter__(self) -> "WorkerPool":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _worker_process(self, slot: Slot, tasks: Any, results: Any) -> Any:
        from ryzlab.orchestrator.worker import worker_main

        return self._ctx.Process(target=worker_main, daemon=True, name=f"ryzlab-worker{slot.index}",
                                 args=(slot.index, self.mean_work_ms, self.hb_interval, tasks, results, os.getpid()))

    def _worker_env(self, slot: Slot) -> dict[str, str]:
        return {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}

    # -- work ---------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Route ``request`` now (its latency clock starts here)."""
        with self._lock:
            if self.error is not None:
                raise RuntimeError(self.error)
            if request.id in self.units:
                raise ValueError(f"request id {request.id} was already submitted")
            self.units[request.id] = UnitRecord(request, self.clock())
            self._dispatch(request.id)

    def _dispatch(self, uid: int) -> None:
        u = self.units[uid]
        if u.attempts >= self.max_attempts:
            self._give_up(u)
            return
        t = self.clock()  # before the task can reach the worker: its end is never before this
        w = self._assign(uid, u.request, (uid, u.request.size, u.request.prefix_key))
        if w is None:
            self._waiting.append(uid)
            return
        u.attempts += 1
        u.worker, u.state, u.dispatch_t = w, "running", t
        self.stats.start(w)

    def _give_up(self, u: UnitRecord) -> None:
        u.state, u.end_t = "failed", self.clock()
        log.warning("unit %d failed after %d attempts", u.request.id, u.attempts)
        self._cv.notify_all()

    def wait_all(self, timeout_s: float) -> bool:
        """Block until every submitted unit is done or failed and every fault recovered; False on timeout."""
        done = self.wait_until(lambda: self.error is not None or (
            not any(u.state in ("pending", "running") for u in self.units.values())
            and all(f.recover_t is not None for f in self.faults)), timeout_s)
        if self.error is not None:
            raise RuntimeError(self.error)
        return done

    def reset(self) -> None:
        """Forget finished units and fault records so the started workers serve another run."""
        with self._lock:
            busy = [uid for uid, u in self.units.items() if u.state in ("pending", "running")]
            if busy or self._waiting:
                raise ValueError(f"reset() with {len(busy)} unit(s) still in flight; call wait_all first")
            self.units.clear()
            self.faults.clear()
            self.duplicates = 0
            self.stats = StatsCollector(reservoir=self.stats.reservoir)

    # -- pool hooks (the lock is held) ----------------------------------------------------------
    def _on_ready(self, slot: Slot, info: Any) -> None:
        self.per_product_s[slot.index] = info["per_product_s"]
        waiting, self._waiting = self._waiting, []
        for uid in waiting:
            self._dispatch(uid)
        self._check_recovered()

    def _on_message(self, slot: Slot, msg: tuple) -> None:
        _, uid, start, end, hit, _checksum = msg
        u = self.units[uid]
        w = slot.index
        if uid in slot.held:
            slot.held.discard(uid)
            slot.served += 1
            self.stats.finish(w, (end - u.dispatch_t) * 1000.0, True)
        if u.state == "done":
            self.duplicates += 1
            return
        u.state, u.start_t, u.end_t, u.served_by, u.prefix_hit = "done", start, end, w, hit
        self._check_recovered()

    def _stranded(self, slot: Slot, uids: list, why: str) -> None:
        now = self.clock()  # under the lock, after every dispatch it could have seen: never negative
        for uid in uids:
            self.stats.finish(slot.index, (now - self.units[uid].dispatch_t) * 1000.0, False)
        reroute(self.policy, slot.index, uids, attempts=lambda uid: self.units[uid].attempts,
                max_attempts=self.max_attempts, send=self._dispatch, give_up=lambda uid: self._give_up(self.units[uid]))

    def _after_watch(self) -> None:
        self._check_recovered()

    def _check_recovered(self) -> None:
        for f in self.faults:
            if f.recover_t is None and (f.ready_t is not None or not self.restart):
                if all(self.units[u].state in ("done", "failed") for u in f.rerouted if u in self.units):
                    f.recover_t = max([self.clock() if f.ready_t is None else f.ready_t] +
                                      [self.units[u].end_t or 0.0 for u in f.rerouted if u in self.units])
                    self._cv.notify_all()

    # -- results ----------------------------------------------------------------------------------
    def unit_rows(self) -> list[dict]:
        with self._lock:
            return [{"request_id": uid, "size": u.request.size, "state": u.state, "attempts": u.attempts,
                     "worker": u.served_by, "prefix_hit": u.prefix_hit, "submit_t": u.submit_t,
                     "start_t": u.start_t, "end_t": u.end_t,
                     "e2el_ms": (u.end_t - u.submit_t) * 1000.0 if u.end_t and u.state == "done" else None}
                    for uid, u in self.units.items()]
