"""The one worker pool: spawn, heartbeat, detect, re-route, restart -- for every kind of worker.

The serving router (:class:`ryzlab.serve.router.Router`, engine workers) and the orchestrator's
:class:`ryzlab.orchestrator.workers.WorkerPool` (compute workers) are this pool with their own worker
body and messages; the simulator (:mod:`ryzlab.orchestrator.sim`) re-routes with the same
:func:`~ryzlab.orchestrator.faults.reroute`. One fault record (:class:`~ryzlab.orchestrator.faults.FaultRecord`), one clock (``time.monotonic``, which on
Linux is system-wide, so the workers' time stamps are on it too).

A slot's life: ``starting`` -> ``serving`` -> ``failed`` -> ``starting`` (next incarnation) ...
Each incarnation gets a fresh task queue and result pipe, so a process killed mid-write can never
corrupt the channel of the next one. The watchdog (one thread, time read *under* the lock, so
nothing dispatched after the read is judged by it) fails an incarnation when

* its process exited (the collector also sees the pipe close), serving or still starting: a
  worker that dies while restarting is restarted again;
* it is serving and sent no heartbeat for :meth:`ProcessPool.beat_timeout` seconds: the largest of
  the floor ``heartbeat_timeout_s``, ``HEARTBEAT_FACTOR`` beat intervals and ``HEARTBEAT_FACTOR``
  times the p99 of the beat gaps measured so far (a loaded machine stretches every gap; a fixed
  guess gives false positives there). Beats already in the pipe are read before judging;
* it holds work and its main loop sent nothing for ``progress_timeout_s`` (stuck compute);
* it did not become ready within ``start_timeout_s``.

A failed incarnation is killed (a paused or hung worker is not trusted again), its units are
re-routed (:func:`reroute`: at most ``max_attempts`` tries each) and a replacement is started.
A watchdog or collector tick that raises is logged and the loop goes on; after
``MAX_TICK_FAILURES`` in a row the pool fails loudly (:attr:`ProcessPool.error`, every waiter woken).

Worker protocol (on the result pipe): ``("ready", info)``, ``("hb", monotonic_t)`` from a side
thread, ``("fatal", traceback)``; anything else is the subclass's (and counts as progress).
Parent -> worker: the subclass's messages on the task queue, ``None`` to stop.
"""
from __future__ import annotations

import abc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Hashable, Literal

from ryzlab.orchestrator.faults import (HEARTBEAT_FACTOR, INJECT_KINDS, BeatGaps, FaultRecord, InjectKind,
                                       reroute)

__all__ = ["ProcessPool", "Slot", "FaultRecord", "BeatGaps", "reroute", "InjectKind", "INJECT_KINDS",
           "HEARTBEAT_FACTOR", "MAX_TICK_FAILURES"]
"""FaultRecord, BeatGaps, reroute and the injection kinds live in :mod:`.faults` (the simulator
needs them without threads or processes); they are importable from here as before."""

log = logging.getLogger(__name__)

SlotState = Literal["starting", "serving", "failed", "stopped"]
MAX_TICK_FAILURES = 20
"""Watchdog / collector ticks that may raise in a row before the pool gives up loudly."""

@dataclass(eq=False)
class Slot:
    """One worker place: what a policy reads (``healthy``, ``outstanding``) and its current process."""

    index: int
    state: str = "stopped"
    process: Any = None
    pid: int | None = None
    incarnation: int = 0
    tasks: Any = None
    conn: Any = None
    held: set = field(default_factory=set)
    last_beat: float = 0.0
    last_stamp: float | None = None
    last_progress: float = 0.0
    spawn_t: float = 0.0
    restarts: int = 0
    start_failures: int = 0
    served: int = 0
    fatal: str | None = None
    stats: dict = field(default_factory=dict)
    """The worker's own numbers (the serving engine's cache usage, queue sizes ...)."""

    @property
    def healthy(self) -> bool:
        return self.state == "serving"

    @property
    def outstanding(self) -> int:
        return len(self.held)


class ProcessPool(abc.ABC):
    """Live worker processes + policy + collector + watchdog. Subclasses give the worker process
    (:meth:`_worker_process`) and handle their messages, readiness and stranded units."""

    def __init__(self, n: int, policy: Any, *, ctx: Any, heartbeat_interval_s: float, heartbeat_timeout_s: float,
                 progress_timeout_s: float | None, watch_interval_s: float = 0.05, max_attempts: int = 3,
                 restart: bool = True, start_timeout_s: float = 60.0, max_start_failures: int = 3):
        if n < 1:
            raise ValueError(f"need at least one worker, got {n}")
        if max_attempts < 1 or watch_interval_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"need max_attempts >= 1, watch_interval_s > 0, start_timeout_s > 0; got "
                             f"{max_attempts}, {watch_interval_s}, {start_timeout_s}")
        if progress_timeout_s is not None and progress_timeout_s <= 0:
            raise ValueError(f"progress_timeout_s must be > 0 or None, got {progress_timeout_s}")
        self.beats = BeatGaps(heartbeat_timeout_s, heartbeat_interval_s)
        self._ctx = ctx
        self.policy = policy
        self.hb_interval = heartbeat_interval_s
        self.progress_timeout, self.watch_interval = progress_timeout_s, watch_interval_s
        self.max_attempts, self.restart, self.start_timeout = max_attempts, restart, start_timeout_s
        self.max_start_failures = max_start_failures
        self.workers = [Slot(i) for i in range(n)]
        self.faults: list[FaultRecord] = []
        self.clock: Callable[[], float] = time.monotonic
        self.error: str | None = None
        """Why the pool cannot go on (its watchdog or collector kept failing); None while fine."""
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._spawn_lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self._conns: dict[Any, tuple[Slot, int]] = {}
        self._pending_injection: dict[int, FaultRecord] = {}
        self._threads: list[threading.Thread] = []

    # -- subclass hooks (caller holds the lock, except _worker_process) -------------------------
    @abc.abstractmethod
    def _worker_process(self, slot: Slot, tasks: Any, results: Any) -> Any:
        """An unstarted process running the worker loop for ``slot``."""

    def _worker_env(self, slot: Slot) -> dict[str, str]:
        """Environment the worker is started with (copied at ``start()``)."""
        return {}

    @abc.abstractmethod
    def _on_message(self, slot: Slot, msg: tuple) -> None:
        """A worker message other than ready / heartbeat / fatal."""

    def _on_ready(self, slot: Slot, info: Any) -> None:
        pass

    @abc.abstractmethod
    def _stranded(self, slot: Slot, uids: list, why: str) -> None:
        """Re-route the units ``slot`` held (with :func:`reroute`)."""

    def _after_watch(self) -> None:
        pass

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker and wait until all are serving; raise (after cleaning up) if not."""
        for s in self.workers:
            self._spawn(s)
        self._threads = [threading.Thread(target=self._loop, args=("collector",), name="ryzlab-pool-collect",
                                          daemon=True),
                         threading.Thread(target=self._loop, args=("watchdog",), name="ryzlab-pool-watch",
                                          daemon=True)]
        for t in self._threads:
            t.start()
        deadline = self.clock() + self.start_timeout
        problem = None
        with self._lock:
            while problem is None and not all(s.healthy for s in self.workers):
                bad = [s for s in self.workers if s.state in ("failed", "stopped")]
                if bad:
                    s = bad[0]
                    last = (s.fatal or "").strip().splitlines()[-1:] or [self.faults[-1].reason if self.faults else "exited"]
                    problem = RuntimeError(f"worker {s.index} could not start: {last[0]}")
                elif self.clock() > deadline:
                    problem = TimeoutError(f"workers not ready after {self.start_timeout:g} s: "
                                           f"{[s.index for s in self.workers if not s.healthy]}")
                else:
                    self._cv.wait(0.1)
            self._started = problem is None
        if problem is not None:
            self.close()
            raise problem

    def _spawn(self, s: Slot) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            s.incarnation += 1
            inc = s.incarnation
            s.state, s.process, s.pid, s.fatal, s.last_stamp = "starting", None, None, None, None
            s.spawn_t = self.clock()
        tasks = self._ctx.Queue()  # put() hands off to a feeder thread: never blocks on a paused worker
        tasks.cancel_join_thread()  # tasks left for a dead worker must not block interpreter exit
        recv, send = self._ctx.Pipe(duplex=False)
        with self._spawn_lock:  # the environment is process-wide
            p = self._worker_process(s, tasks, send)
            env = self._worker_env(s)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                p.start()
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        send.close()
        with self._lock:
            if self._stop.is_set() or s.incarnation != inc:
                p.kill()
                recv.close()
                return
            s.process, s.pid, s.tasks, s.conn = p, p.pid, tasks, recv
            s.last_beat = s.last_progress = s.spawn_t = self.clock()
            self._conns[recv] = (s, inc)
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the threads, ask workers to exit, kill what remains; idempotent."""
        self._stop.set()
        with self._lock:
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)
        procs = []
        with self._lock:
            for s in self.workers:
                p = s.process
                if p is not None and p.is_alive():
                    try:
                        os.kill(p.pid, signal.SIGCONT)  # a paused worker must be able to read its stop
                        s.tasks.put(None)
                    except (OSError, ValueError):
                        pass
                procs.append(p)
        deadline = time.monotonic() + 3.0
        for p in procs:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(3.0)
        with self._lock:
            for c in list(self._conns):
                c.close()
            self._conns.clear()
            for s in self.workers:
                s.state = "stopped"
            self._cv.notify_all()

    def wait_until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``pred()`` (checked under the pool lock at every state change) is true."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return pred()
                self._cv.wait(min(left, 0.5))
            return True

    # -- work ---------------------------------------------------------------------------------
    def _assign(self, uid: Hashable, request: Any, message: Any) -> int | None:
        """Send ``message`` to the policy's pick for ``request``; None when no worker serves."""
        i = self.policy.choose(request, self.workers)
        if i is None:
            return None
        s = self.workers[i]
        if not s.held:
            s.last_progress = self.clock()  # the progress clock runs only while holding work
        s.held.add(uid)
        s.tasks.put(message)
        return i

    def _send(self, i: int, message: Any) -> None:
        try:
            self.workers[i].tasks.put(message)
        except (OSError, ValueError, AttributeError):
            pass  # the worker is gone; its failure path handles what it held

    # -- fault injection ------------------------------------------------------------------------
    def inject(self, worker: int, kind: str) -> None:
        """``kill`` (SIGKILL) or ``pause`` (SIGSTOP: alive but silent) worker ``worker`` now."""
        if kind not in INJECT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; valid: {', '.join(INJECT_KINDS)}")
        if not 0 <= worker < len(self.workers):
            raise ValueError(f"worker={worker} out of range; valid: 0..{len(self.workers) - 1}")
        with self._lock:
            s = self.workers[worker]
            if not s.healthy:
                raise ValueError(f"worker {worker} is not serving ({s.state}); serving: "
                                 f"{[w.index for w in self.workers if w.healthy]}")
            self._pending_injection[worker] = FaultRecord(worker, kind, self.clock())
            os.kill(s.pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        log.info("injected %s into worker %d", kind, worker)

    def beat_timeout(self) -> float:
        """The missed-beat timeout now (see :class:`BeatGaps`)."""
        with self._lock:
            return self.beats.timeout()

    # -- threads ----------------------------------------------------------------------------------
    def _loop(self, name: str) -> None:
        """Run the ``collector`` or ``watchdog`` tick until close; an exception is logged and the
        loop goes on (it never dies silently); too many in a row fail the pool loudly."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._collect_once() if name == "collector" else self._watch_once()
                failures = 0
            except Exception:  # noqa: BLE001 - a bad tick must not end fault detection
                failures += 1
                log.exception("pool %s tick failed (%d in a row); continuing", name, failures)
                if failures >= MAX_TICK_FAILURES:
                    with self._lock:
                        self.error = f"pool {name} failed {failures} ticks in a row; see the log"
                        self._cv.notify_all()
                    log.critical("%s: the pool cannot detect faults any more", self.error)
                    return

    def _collect_once(self) -> None:
        with self._lock:
            conns = list(self._conns)
        if not conns:
            self._stop.wait(0.05)
            return
        try:
            ready = wait(conns, timeout=0.05)
        except (OSError, ValueError):
            return  # a pipe was closed by a failure while we waited: the next round has the new list
        for c in ready:
            with self._lock:  # recv under the lock: the failure path may drain the same pipe
                self._drain_conn(c)

    def _drain_conn(self, c: Any) -> None:
        """Handle every message already waiting on ``c``; fail its incarnation at EOF. Holds the lock."""
        while c in self._conns:
            s, inc = self._conns[c]
            try:
                if not c.poll(0):
                    return
                msg = c.recv()
            except (EOFError, OSError):
                self._unregister(c)
                self._fail(s, inc, "pipe closed (process exited)")
                return
            self._handle(s, msg)

    def _drain(self, s: Slot) -> None:
        if s.conn is not None and s.conn in self._conns:
            self._drain_conn(s.conn)

    def _unregister(self, c: Any) -> None:
        self._conns.pop(c, None)
        try:
            c.close()
        except OSError:
            pass

    def _handle(self, s: Slot, msg: tuple) -> None:
        kind = msg[0]
        now = self.clock()
        s.last_beat = now  # any message shows the process is alive; gaps are measured on its stamps
        if kind == "hb":
            if s.last_stamp is not None:
                self.beats.add(msg[1] - s.last_stamp)
            s.last_stamp = msg[1]
            return
        s.last_progress = now
        if kind == "ready":
            s.state, s.start_failures = "serving", 0
            for f in self.faults:
                if f.worker == s.index and f.ready_t is None:
                    f.ready_t = now
            self._on_ready(s, msg[1])
        elif kind == "fatal":
            s.fatal = msg[1]
            log.error("worker %d could not start:\n%s", s.index, msg[1])
        else:
            self._on_message(s, msg)
        self._cv.notify_all()

    def _watch_once(self) -> None:
        if self._stop.wait(self.watch_interval):
            return
        with self._lock:
            now = self.clock()  # under the lock: nothing dispatched after this read is judged by it
            timeout = self.beats.timeout()
            for s in self.workers:
                reason = self._diagnose(s, now, timeout)
                if reason is not None:
                    self._fail(s, s.incarnation, reason, timeout_s=timeout)
            self._after_watch()

    def _diagnose(self, s: Slot, now: float, timeout: float) -> str | None:
        """Why ``s``'s incarnation has failed, or None. Holds the lock."""
        if s.state not in ("starting", "serving") or s.process is None:
            return None
        if not s.process.is_alive():
            return f"process exited (code {s.process.exitcode})"
        if s.state == "starting":
            if now - s.spawn_t > self.start_timeout:
                return f"not ready after {now - s.spawn_t:.1f} s"
            return None
        if now - s.last_beat > timeout:
            self._drain(s)  # beats already in the pipe (the collector fell behind) are not missed
            if s.state == "serving" and now - s.last_beat > timeout:
                return f"no heartbeat for {now - s.last_beat:.2f} s (timeout {timeout:.2f} s from measured gaps)"
            return None
        if (self.progress_timeout is not None and s.held and s.state == "serving"
                and now - s.last_progress > self.progress_timeout):
            return f"no progress for {now - s.last_progress:.2f} s holding {len(s.held)} unit(s)"
        return None

    def _fail(self, s: Slot, inc: int, reason: str, timeout_s: float | None = None) -> None:
        """Fail incarnation ``inc`` of ``s`` (once): record, kill, re-route, restart. Holds the lock."""
        with self._lock:
            if s.incarnation != inc or s.state not in ("starting", "serving") or self._stop.is_set():
                return
            self._drain(s)  # results it sent before it died are not lost work
            if s.incarnation != inc or s.state not in ("starting", "serving"):
                return
            was = s.state
            if s.fatal:
                reason = f"could not start: {s.fatal.strip().splitlines()[-1]}"
            now = self.clock()
            rec = self._pending_injection.pop(s.index, None) or FaultRecord(s.index, "detected", now)
            rec.detect_t, rec.reason, rec.incarnation = now, reason, inc
            rec.timeout_s = timeout_s if "heartbeat" in reason else None
            self.faults.append(rec)
            log.warning("worker %d (incarnation %d, %s) failed (%s): %s; re-routing %d unit(s)",
                        s.index, inc, was, rec.kind, reason, len(s.held))
            s.state = "failed"
            if s.conn is not None:
                self._unregister(s.conn)
            try:
                s.tasks.close()  # its feeder thread ends instead of idling for good
            except (AttributeError, OSError, ValueError):
                pass
            p = s.process
            if p is not None and p.is_alive():
                p.kill()  # a paused or hung worker is not trusted again: its replacement starts clean
            held, s.held = sorted(s.held, key=str), set()
            rec.rerouted = held
            self._stranded(s, held, f"worker {s.index} failed ({reason})")
            if was == "starting":
                s.start_failures += 1
            self._cv.notify_all()
            if not (self.restart and self._started):
                return
            if s.start_failures >= self.max_start_failures:
                s.state = "stopped"
                log.error("worker %d failed to start %d times in a row; not restarting it (last: %s)",
                          s.index, s.start_failures, reason)
                return
        threading.Thread(target=self._respawn, args=(s, p, inc), daemon=True,
                         name=f"ryzlab-pool-respawn-{s.index}").start()

    def _respawn(self, s: Slot, old: Any, inc: int) -> None:
        if old is not None:
            old.join(5.0)
        with self._lock:
            if self._stop.is_set() or s.incarnation != inc or s.state != "failed":
                return
            s.restarts += 1
        self._spawn(s)

    # -- observability ----------------------------------------------------------------------------
    def pool_health(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return [{"worker": s.index, "state": s.state, "healthy": s.healthy, "pid": s.pid,
                     "outstanding": s.outstanding, "heartbeat_age_s": round(now - s.last_beat, 3),
                     "restarts": s.restarts, "incarnation": s.incarnation} for s in self.workers]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The fault timeline from the fault records: injection, detection, replacement ready."""
        out = []
        with self._lock:
            for f in self.faults:
                if f.kind != "detected":
                    out.append({"t": f.fault_t, "event": f.kind, "worker": f.worker})
                out.append({"t": f.detect_t, "event": "detected", "worker": f.worker, "why": f.reason,
                            "rerouted": len(f.rerouted)})
                if f.ready_t is not None:
                    out.append({"t": f.ready_t, "event": "restarted", "worker": f.worker})
        return sorted(out, key=lambda e: e["t"])

