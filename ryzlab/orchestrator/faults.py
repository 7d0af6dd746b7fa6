"""Fault tolerance for live workers: heartbeats, a progress watchdog, re-routing and restart.

:class:`WorkerPool` runs ``n`` real worker processes (:mod:`.worker`) behind a balancing
policy (:mod:`.balance`) and guarantees that every submitted unit of work ends as *completed*
or *failed* -- never silently lost:

* **detection** -- a watchdog thread checks each worker every ``watch_interval_s``: the
  process has exited (killed, crashed), its heartbeat (shared memory, written by a side
  thread in the worker) is older than ``heartbeat_timeout_s`` (paused, hung, starved), or it
  holds work but has finished nothing for ``progress_timeout_s`` (stuck compute);
* **recovery** -- the failed worker is killed for good, marked unhealthy for the policy, and
  every unit it held is re-dispatched to the healthy workers (at most ``max_attempts`` tries,
  then the unit is reported failed); a replacement process is started when ``restart`` is on;
* **measurement** -- each fault records ``fault_t`` (when injected, or detection time for
  faults that were not injected), ``detect_t``, ``ready_t`` (replacement serving) and
  ``recover_t`` (replacement serving *and* all re-routed units finished).

Each worker incarnation gets fresh pipes and queue, so a process killed mid-write can never
corrupt the channel of the next one. A unit finishing twice (a result already in flight when
its worker was declared dead) is counted once (``duplicates``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Iterator, Literal, get_args

from .balance import Request, WorkerView
from .stats import StatsCollector

__all__ = ["WorkerPool", "FaultRecord", "UnitRecord", "InjectKind", "INJECT_KINDS"]

log = logging.getLogger(__name__)

InjectKind = Literal["kill", "pause"]
INJECT_KINDS: tuple[str, ...] = get_args(InjectKind)


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


@dataclass
class FaultRecord:
    worker: int
    kind: str
    fault_t: float
    detect_t: float | None = None
    reason: str = ""
    rerouted: list[int] = field(default_factory=list)
    ready_t: float | None = None
    recover_t: float | None = None


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Spawned children inherit the environment at start: one BLAS thread each, as ranks share cores."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


class WorkerPool:
    """Live worker processes + router policy + watchdog. Use as a context manager."""

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
        from .launch import mp_context

        self._ctx = mp_context("forkserver")  # a restart forks in ms instead of re-importing
        self.n = n_workers
        self.policy = policy
        self.mean_work_ms = mean_work_ms
        self.hb_interval, self.hb_timeout = heartbeat_interval_s, heartbeat_timeout_s
        self.progress_timeout, self.watch_interval = progress_timeout_s, watch_interval_s
        self.max_attempts, self.restart, self.start_timeout = max_attempts, restart, start_timeout_s
        self.views = [WorkerView(healthy=False) for _ in range(n_workers)]
        self.units: dict[int, UnitRecord] = {}
        self.faults: list[FaultRecord] = []
        self.duplicates = 0
        self.stats = StatsCollector(reservoir=reservoir)
        """Per-worker *attempt* statistics (an attempt on a failed worker counts as an error there)."""
        self.per_product_s: list[float] = [float("nan")] * n_workers
        self._heartbeats = self._ctx.Array("d", n_workers, lock=False)
        self._procs: list[Any] = [None] * n_workers
        self._tasks: list[Any] = [None] * n_workers
        self._conns: dict[Any, tuple[int, int]] = {}
        self._incarnation = [0] * n_workers
        self._held: list[set[int]] = [set() for _ in range(n_workers)]
        self._last_progress = [0.0] * n_workers
        self._pending_injection: dict[int, FaultRecord] = {}
        self._waiting: list[int] = []  # units with no healthy worker to go to (yet)
        self._lock = threading.RLock()
        self._done_cv = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> "WorkerPool":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start every worker and wait until all of them have reported ready."""
        for i in range(self.n):
            self._spawn(i)
        self._threads = [threading.Thread(target=self._collect_loop, name="ryzlab-pool-collect", daemon=True),
                         threading.Thread(target=self._watch_loop, name="ryzlab-pool-watch", daemon=True)]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + self.start_timeout
        with self._lock:
            while not all(v.healthy for v in self.views):
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"workers not ready after {self.start_timeout:g} s: "
                                       f"{[i for i, v in enumerate(self.views) if not v.healthy]}")
                self._done_cv.wait(0.1)

    def _spawn(self, i: int) -> None:
        self._incarnation[i] += 1
        recv, send = self._ctx.Pipe(duplex=False)
        # a Queue, not a SimpleQueue: put() hands off to a feeder thread and never blocks, so the
        # router cannot stall (holding the lock) on the full pipe of a paused worker
        tasks = self._ctx.Queue()
        tasks.cancel_join_thread()  # tasks left for a dead worker must not block interpreter exit
        from .worker import worker_main

        p = self._ctx.Process(target=worker_main, daemon=True, name=f"ryzlab-worker{i}",
                              args=(i, self._incarnation[i], self.mean_work_ms, self.hb_interval, tasks,
                                    send, self._heartbeats, os.getpid()))
        with _single_threaded_children():
            p.start()
        send.close()
        with self._lock:
            self._procs[i], self._tasks[i] = p, tasks
            self._conns[recv] = (i, self._incarnation[i])
            self._heartbeats[i] = time.time()  # start-up grace: the first beat comes after imports
            self._last_progress[i] = time.time()

    def close(self) -> None:
        """Stop threads, ask workers to exit, kill what remains; idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        for i, p in enumerate(self._procs):
            if p is not None and p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    self._tasks[i].put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 2.0
        for p in self._procs:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(2.0)
        for c in list(self._conns):
            c.close()
        self._conns.clear()

    # -- work ---------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Route ``request`` now (its latency clock starts here)."""
        with self._lock:
            if request.id in self.units:
                raise ValueError(f"request id {request.id} was already submitted")
            self.units[request.id] = UnitRecord(request, time.time())
            self._dispatch(request.id)

    def _dispatch(self, uid: int) -> None:
        u = self.units[uid]
        if u.attempts >= self.max_attempts:
            u.state, u.end_t = "failed", time.time()
            log.warning("unit %d failed after %d attempts", uid, u.attempts)
            self._done_cv.notify_all()
            return
        w = self.policy.choose(u.request, self.views)
        if w is None:
            self._waiting.append(uid)
            return
        u.attempts += 1
        u.worker, u.state = w, "running"
        if not self._held[w]:
            self._last_progress[w] = time.time()  # the progress clock runs only while holding work
        self._held[w].add(uid)
        self.views[w].outstanding += 1
        self.stats.start(w)
        u.dispatch_t = time.time()
        self._tasks[w].put((uid, u.request.size, u.request.prefix_key))

    def wait_all(self, timeout_s: float) -> bool:
        """Block until every submitted unit is done or failed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(u.state in ("pending", "running") for u in self.units.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done_cv.wait(min(left, 0.2))
            return all(f.recover_t is not None for f in self.faults) or self._wait_recovery(deadline)

    def _wait_recovery(self, deadline: float) -> bool:
        while not all(f.recover_t is not None for f in self.faults):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._done_cv.wait(min(left, 0.2))
        return True

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

    # -- fault injection ------------------------------------------------------------------------
    def inject(self, worker: int, kind: str) -> None:
        """``kill`` (SIGKILL) or ``pause`` (SIGSTOP: alive but silent) worker ``worker`` now."""
        if kind not in INJECT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; valid: {', '.join(INJECT_KINDS)}")
        if not 0 <= worker < self.n:
            raise ValueError(f"worker={worker} out of range; valid: 0..{self.n - 1}")
        with self._lock:
            if not self.views[worker].healthy:
                raise ValueError(f"worker {worker} is not serving (starting or restarting); serving: "
                                 f"{[i for i, v in enumerate(self.views) if v.healthy]}")
            rec = FaultRecord(worker, kind, time.time())
            self._pending_injection[worker] = rec
            os.kill(self._procs[worker].pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        log.info("injected %s into worker %d", kind, worker)

    # -- threads ----------------------------------------------------------------------------------
    def _collect_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                conns = list(self._conns)
            if not conns:
                time.sleep(0.05)
                continue
            for c in wait(conns, timeout=0.05):
                with self._lock:  # recv under the lock: _fail_worker may drain the same pipe
                    self._drain(c)

    def _drain(self, c: Any) -> None:
        """Handle every message already waiting on ``c``; close it at EOF. Caller holds the lock."""
        while c in self._conns and c.poll(0):
            try:
                msg = c.recv()
            except (EOFError, OSError):
                self._conns.pop(c, None)
                c.close()
                return
            self._on_message(msg)

    def _on_message(self, msg: tuple) -> None:
        kind, w, inc = msg[0], msg[1], msg[2]
        with self._lock:
            if kind == "ready":
                if inc != self._incarnation[w]:
                    return
                self.per_product_s[w] = msg[3]
                self.views[w].healthy = True
                self._last_progress[w] = time.time()
                for f in self.faults:
                    if f.worker == w and f.ready_t is None:
                        f.ready_t = time.time()
                self._drain_waiting()
            else:
                _, _, _, uid, start, end, hit, _checksum = msg
                u = self.units[uid]
                self._last_progress[w] = time.time()
                if uid in self._held[w] and inc == self._incarnation[w]:
                    self._held[w].discard(uid)
                    self.views[w].outstanding -= 1
                    self.stats.finish(w, (end - u.dispatch_t) * 1000.0, True)
                if u.state == "done":
                    self.duplicates += 1
                    return
                u.state, u.start_t, u.end_t, u.served_by, u.prefix_hit = "done", start, end, w, hit
            self._check_recovered()
            self._done_cv.notify_all()

    def _drain_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for uid in waiting:
            self._dispatch(uid)

    def _check_recovered(self) -> None:
        for f in self.faults:
            if f.recover_t is None and (f.ready_t is not None or not self.restart):
                if all(self.units[u].state in ("done", "failed") for u in f.rerouted):
                    f.recover_t = max([time.time() if f.ready_t is None else f.ready_t] +
                                      [self.units[u].end_t or 0.0 for u in f.rerouted])
                    self._done_cv.notify_all()

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.watch_interval):
            now = time.time()
            with self._lock:
                for w in range(self.n):
                    if not self.views[w].healthy:
                        continue  # starting or restarting: not ready yet
                    p = self._procs[w]
                    if not p.is_alive():
                        reason = f"process exited (code {p.exitcode})"
                    elif now - self._heartbeats[w] > self.hb_timeout:
                        reason = f"no heartbeat for {now - self._heartbeats[w]:.2f} s"
                    elif self._held[w] and now - self._last_progress[w] > self.progress_timeout:
                        reason = f"no progress for {now - self._last_progress[w]:.2f} s holding {len(self._held[w])} unit(s)"
                    else:
                        continue
                    self._fail_worker(w, reason, now)
                self._check_recovered()

    def _fail_worker(self, w: int, reason: str, now: float) -> None:
        # results the worker sent before it died are not lost work: take them before re-routing
        for c, (cw, inc) in list(self._conns.items()):
            if cw == w and inc == self._incarnation[w]:
                self._drain(c)
        rec = self._pending_injection.pop(w, None) or FaultRecord(w, "detected", now)
        rec.detect_t, rec.reason = now, reason
        self.faults.append(rec)
        log.warning("worker %d failed (%s): %s; re-routing %d unit(s)", w, rec.kind, reason, len(self._held[w]))
        self.views[w].healthy = False
        self.views[w].outstanding = 0
        p = self._procs[w]
        if p.is_alive():
            p.kill()  # a paused or hung worker is not trusted again: its replacement starts clean
        if hasattr(self.policy, "forget_worker"):
            self.policy.forget_worker(w)
        held, self._held[w] = sorted(self._held[w]), set()
        for uid in held:
            self.stats.finish(w, (now - self.units[uid].dispatch_t) * 1000.0, False)
        rec.rerouted = held
        for uid in held:
            self._dispatch(uid)
        if self.restart:
            threading.Thread(target=self._respawn, args=(w, p), daemon=True).start()

    def _respawn(self, w: int, old: Any) -> None:
        old.join(5.0)
        if not self._stop.is_set():
            self._spawn(w)

    # -- results ----------------------------------------------------------------------------------
    def unit_rows(self) -> list[dict]:
        with self._lock:
            return [{"request_id": uid, "size": u.request.size, "state": u.state, "attempts": u.attempts,
                     "worker": u.served_by, "prefix_hit": u.prefix_hit, "submit_t": u.submit_t, "start_t": u.start_t, "end_t": u.end_t,
                     "e2el_ms": (u.end_t - u.submit_t) * 1000.0 if u.end_t and u.state == "done" else None}
                    for uid, u in self.units.items()]
