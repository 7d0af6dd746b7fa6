"""Router over worker processes: data-parallel engine replicas behind one API.

Requests are placed by the orchestrator's load-balancing policies
(:func:`ryzlab.orchestrator.balance.make_policy`): round-robin, least-outstanding,
power-of-two choices, prefix-affinity (the prefix key is the hash of the prompt's first
``affinity_tokens`` tokens, so requests sharing a system prompt meet their cached blocks).

Fault handling: a worker whose pipe closes (process died) or whose heartbeat is older than
``heartbeat_timeout_s`` (hung) is declared dead and killed. Each of its in-flight requests is
re-sent to a healthy worker as prompt + tokens already streamed (greedy decoding continues
exactly where it stopped; the client sees one uninterrupted stream), or, when no healthy
worker is left or the request was already re-routed ``max_reroutes`` times, answered with an
error. Nothing is lost silently. The dead worker is restarted when ``restart`` is set.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .engine import EngineError, SamplingParams
from .worker import worker_main

__all__ = ["Router", "WorkerHandle", "RouteRequest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteRequest:
    """What a policy sees of a request."""

    id: str
    size: float
    prefix_key: int | None


@dataclass(eq=False)
class WorkerHandle:
    """The router's view of one worker (the ``outstanding``/``healthy`` a policy reads)."""

    index: int
    process: Any = None
    conn: Any = None
    outstanding: int = 0
    healthy: bool = False
    last_heartbeat_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    requests: set[str] = field(default_factory=set)
    restarts: int = 0
    pid: int | None = None
    generation: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    served: int = 0


@dataclass(eq=False)
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    worker: int = -1
    emitted: list[int] = field(default_factory=list)
    reroutes: int = 0
    t0: float = field(default_factory=time.monotonic)


class Router:
    """``workers`` engine processes behind a load-balancing policy (see module docstring)."""

    def __init__(self, *, workers: int = 2, policy: str = "least_outstanding",
                 engine_kwargs: dict[str, Any] | None = None, threads_per_worker: int = 1,
                 heartbeat_timeout_s: float = 2.0, restart: bool = True, max_reroutes: int = 2,
                 affinity_tokens: int = 32, model_name: str = "ryzlab-reference", seed: int = 0,
                 start_timeout_s: float = 120.0):
        from ..orchestrator.balance import make_policy
        from ..orchestrator.stats import StatsCollector

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        from .engine import EngineConfig
        from .replica import check_engine_args

        self.policy = make_policy(policy, seed=seed)
        check_engine_args(**(engine_kwargs or {}))  # bad model/codec fails here, before any process
        EngineConfig(**(engine_kwargs or {}).get("config", {}))
        self.policy_name = policy
        self.engine_kwargs = dict(engine_kwargs or {})
        self.threads_per_worker = threads_per_worker
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.restart = restart
        self.max_reroutes = max_reroutes
        self.affinity_tokens = affinity_tokens
        self.model_name = model_name
        from .replica import tokenizer_for

        self.tokenizer = tokenizer_for((engine_kwargs or {}).get("model", "reference"))
        """The model's tokenizer, for the API's string prompts (files / metadata only, no weights)."""
        self.start_timeout_s = start_timeout_s
        self.workers = [WorkerHandle(i) for i in range(workers)]
        self.vocab_size = 0
        self.max_model_len = 0
        self._ctx = mp.get_context("spawn")
        self._lock = threading.RLock()
        self._reqs: dict[str, _Req] = {}
        self._ready = [threading.Event() for _ in range(workers)]
        self._closing = False
        self._fatal: dict[int, str] = {}
        self.events: list[dict[str, Any]] = []
        """Fault timeline: kill / detected / rerouted / failed / restarted, with monotonic times."""
        self.latency = StatsCollector(reservoir=100_000, seed=seed)
        """End-to-end request latency per worker and overall (the orchestrator's statistics)."""
        self.counters = {"requests": 0, "completed": 0, "failed": 0, "rerouted": 0, "worker_deaths": 0}
        self._watchdog = threading.Thread(target=self._watch, name="ryzlab-router-watchdog", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Router":
        """Spawn every worker and wait until each has loaded its model."""
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + self.start_timeout_s
        for i, ev in enumerate(self._ready):
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                self.shutdown()
                raise RuntimeError(f"worker {i} did not become ready within {self.start_timeout_s:.0f} s")
            if i in self._fatal:
                self.shutdown()
                last = self._fatal[i].strip().splitlines()[-1]
                raise RuntimeError(f"worker {i} could not start: {last}")
        self._watchdog.start()
        return self

    def _spawn(self, w: WorkerHandle) -> None:
        parent, child = self._ctx.Pipe()
        kwargs = dict(self.engine_kwargs)
        ranks = kwargs.get("tp", 1) * kwargs.get("cp", 1)
        env = {}
        if kwargs.get("device") == "cuda":
            import torch

            n = max(1, torch.cuda.device_count())
            if ranks == 1:  # one replica per GPU: worker i on device i (mod count)
                kwargs["device"] = f"cuda:{w.index % n}"
            else:  # a replica of tp x cp ranks on its own GPUs (rank r on cuda:r of them)
                first = (w.index * ranks) % n
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str((first + r) % n) for r in range(ranks))
        w.generation += 1
        # a replica's driver starts its other ranks itself: daemonic processes may not have children
        proc = self._ctx.Process(target=worker_main, args=(w.index, kwargs, child, self.threads_per_worker),
                                 name=f"ryzlab-worker-{w.index}", daemon=ranks == 1)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # spawn copies the environment at start()
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        w.process, w.conn, w.pid = proc, parent, proc.pid
        w.last_heartbeat_s = time.monotonic()
        threading.Thread(target=self._read, args=(w, parent, w.generation), daemon=True,
                         name=f"ryzlab-router-reader-{w.index}").start()

    def shutdown(self) -> None:
        self._closing = True
        for w in self.workers:
            try:
                with w.send_lock:
                    w.conn.send(("stop",))
            except (OSError, AttributeError, ValueError):
                pass
        for w in self.workers:
            if w.process is not None:
                w.process.join(timeout=3)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(timeout=3)
        with self._lock:
            for req in list(self._reqs.values()):
                self._fail(req, "router shut down")

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ worker messages
    def _read(self, w: WorkerHandle, conn: Any, generation: int) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                if not self._closing and w.generation == generation:
                    self._worker_died(w, "pipe closed (process exited)")
                return
            kind = msg[0]
            if kind == "hb":
                w.last_heartbeat_s = time.monotonic()
                w.stats = msg[2]
            elif kind == "ready":
                info = msg[1]
                self.vocab_size, self.max_model_len = info["vocab_size"], info["max_model_len"]
                w.last_heartbeat_s = time.monotonic()
                w.healthy = True
                if w.generation > 1:
                    self.events.append({"t": time.monotonic(), "event": "restarted", "worker": w.index})
                self._ready[w.index].set()
            elif kind == "fatal":
                log.error("worker %d could not start:\n%s", w.index, msg[1])
                self._fatal[w.index] = msg[1]
                self._ready[w.index].set()  # wake start(): it raises with the reason
                return
            elif kind == "step":
                for rid, toks, finished, err in msg[1]:
                    if err:
                        self._on_output(w, "err", ("err", rid, err))
                        continue
                    if toks:
                        self._on_output(w, "tok", ("tok", rid, toks))
                    if finished:
                        self._on_output(w, "done", ("done", rid))
            else:
                self._on_output(w, kind, msg)

    def _on_output(self, w: WorkerHandle, kind: str, msg: tuple) -> None:
        rid = msg[1]
        with self._lock:
            req = self._reqs.get(rid)
            if req is None or req.worker != w.index:
                return  # aborted, or a late message from before a re-route
            if kind == "tok":
                req.emitted.extend(msg[2])
                self._put(req, msg[2])
            elif kind == "done":
                self._release(req)
                self.latency.record(w.index, (time.monotonic() - req.t0) * 1000.0, True)
                self.counters["completed"] += 1
                w.served += 1
                self._put(req, None)
            elif kind == "err":
                self._release(req)
                self.latency.record(w.index, (time.monotonic() - req.t0) * 1000.0, False)
                self.counters["failed"] += 1
                self._put(req, EngineError(msg[2]))

    @staticmethod
    def _put(req: _Req, item: Any) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:
            pass  # the client's event loop is gone

    def _release(self, req: _Req) -> None:
        self._reqs.pop(req.rid, None)
        if 0 <= req.worker < len(self.workers):
            w = self.workers[req.worker]
            w.requests.discard(req.rid)
            w.outstanding = len(w.requests)

    def _fail(self, req: _Req, message: str) -> None:
        self._release(req)
        self.latency.record("router", (time.monotonic() - req.t0) * 1000.0, False)
        self.counters["failed"] += 1
        self.events.append({"t": time.monotonic(), "event": "failed", "request": req.rid})
        self._put(req, EngineError(message))

    # ------------------------------------------------------------------ faults
    def _watch(self) -> None:
        while not self._closing:
            time.sleep(min(0.1, self.heartbeat_timeout_s / 4))
            now = time.monotonic()
            for w in self.workers:
                if w.healthy and now - w.last_heartbeat_s > self.heartbeat_timeout_s:
                    self._worker_died(w, f"no heartbeat for {now - w.last_heartbeat_s:.1f} s (hung)")

    def _worker_died(self, w: WorkerHandle, why: str) -> None:
        with self._lock:
            if not w.healthy and not w.requests:
                return
            w.healthy = False
            self.counters["worker_deaths"] += 1
            self.events.append({"t": time.monotonic(), "event": "detected", "worker": w.index, "why": why})
            log.warning("worker %d is dead: %s; re-routing %d request(s)", w.index, why, len(w.requests))
            if hasattr(self.policy, "forget_worker"):
                self.policy.forget_worker(w.index)
            orphans = [self._reqs[r] for r in list(w.requests) if r in self._reqs]
            w.requests.clear()
            w.outstanding = 0
            for req in orphans:
                req.worker = -1
                self._reroute(req, f"worker {w.index} died ({why})")
        if w.process is not None and w.process.is_alive():
            w.process.kill()
        if self.restart and not self._closing:
            w.restarts += 1
            self._ready[w.index].clear()
            self._spawn(w)

    def _reroute(self, req: _Req, why: str) -> None:
        remaining = req.params.max_tokens - len(req.emitted)
        if remaining <= 0:
            self._release(req)
            self.counters["completed"] += 1
            self._put(req, None)
            return
        if req.reroutes >= self.max_reroutes:
            self._fail(req, f"{why}; already re-routed {req.reroutes} time(s)")
            return
        req.reroutes += 1
        if self._dispatch(req):
            self.counters["rerouted"] += 1
            self.events.append({"t": time.monotonic(), "event": "rerouted", "request": req.rid,
                                "worker": req.worker})
        else:
            self._fail(req, f"{why}; no healthy worker left")

    def kill_worker(self, index: int) -> None:
        """Fault injection: SIGKILL worker ``index`` (the router detects it like any crash)."""
        w = self.workers[index]
        self.events.append({"t": time.monotonic(), "event": "kill", "worker": index})
        if w.pid is not None:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ requests
    def _dispatch(self, req: _Req) -> bool:
        """Send ``req`` (continuing after ``req.emitted``) to the policy's pick; False if none."""
        key = hash(tuple(req.prompt[: self.affinity_tokens])) if len(req.prompt) >= self.affinity_tokens else None
        for _ in range(len(self.workers)):
            i = self.policy.choose(RouteRequest(req.rid, float(len(req.prompt) + req.params.max_tokens), key),
                                   self.workers)
            if i is None:
                return False
            w = self.workers[i]
            sp = {"max_tokens": req.params.max_tokens - len(req.emitted), "temperature": req.params.temperature,
                  "seed": req.params.seed, "stop_token_ids": tuple(req.params.stop_token_ids)}
            try:
                with w.send_lock:
                    w.conn.send(("add", req.rid, req.prompt + req.emitted, sp))
            except (OSError, ValueError, BrokenPipeError):
                w.healthy = False  # the reader thread will report the death
                continue
            req.worker = i
            w.requests.add(req.rid)
            w.outstanding = len(w.requests)
            return True
        return False

    async def generate(self, request_id: str, prompt: list[int], params: Any) -> AsyncIterator[list[int]]:
        """Stream new token ids; raises :class:`EngineError` when the request fails."""
        sp = params if isinstance(params, SamplingParams) else SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, seed=params.seed,
            stop_token_ids=tuple(params.stop_token_ids))
        req = _Req(request_id, list(prompt), sp, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._reqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._reqs[request_id] = req
            self.counters["requests"] += 1
            if not self._dispatch(req):
                self._fail(req, "no healthy worker")
        try:
            while True:
                item = await req.queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            req = self._reqs.get(request_id)
            if req is None:
                return
            w = self.workers[req.worker] if req.worker >= 0 else None
            self._release(req)
        if w is not None:
            try:
                with w.send_lock:
                    w.conn.send(("abort", request_id))
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------ observability
    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        per = [{"worker": w.index, "healthy": w.healthy, "pid": w.pid, "outstanding": w.outstanding,
                "heartbeat_age_s": round(now - w.last_heartbeat_s, 3), "restarts": w.restarts}
               for w in self.workers]
        n = sum(w.healthy for w in self.workers)
        return {"healthy": n > 0, "reason": f"{n}/{len(self.workers)} workers healthy",
                "healthy_workers": n, "workers": per}

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.counters, "workers": len(self.workers), "policy": self.policy_name,
                               "healthy_workers": sum(w.healthy for w in self.workers)}
        stats = [w.stats for w in self.workers if w.stats]
        for key in ("kv_cache_usage_perc", "prefix_cache_hit_rate"):
            vals = [s[key] for s in stats if key in s]
            if vals:
                out[key] = sum(vals) / len(vals)
        out["preemptions"] = sum(s.get("preemptions", 0) for s in stats)
        out["latency"] = self.latency.to_frame().to_dict(orient="records")
        out["per_worker"] = [{"worker": w.index, "outstanding": w.outstanding, "served": w.served,
                              **{k: w.stats.get(k) for k in ("kv_cache_usage_perc", "preemptions",
                                                            "num_running", "num_waiting")}}
                             for w in self.workers]
        return out
