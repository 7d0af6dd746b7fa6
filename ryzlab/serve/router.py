"""Router over worker processes: data-parallel engine replicas behind one API.

Requests are placed by the orchestrator's load-balancing policies
(:func:`ryzlab.orchestrator.balance.make_policy`): round-robin, least-outstanding,
power-of-two choices, prefix-affinity (the prefix key is the hash of the prompt's first
``affinity_tokens`` tokens, so requests sharing a system prompt meet their cached blocks).

The workers live in the orchestrator's one worker pool (:class:`ryzlab.orchestrator.pool.ProcessPool`):
it spawns them, watches heartbeats (timeout from the measured beat gaps, at least
``heartbeat_timeout_s``), detects a dead, paused or hung worker (also while it restarts), kills it,
re-routes what it held and restarts it. Re-routing a request here means re-sending it to a healthy
worker as prompt + tokens already streamed (greedy decoding continues exactly where it stopped; the
client sees one uninterrupted stream), or, when no healthy worker is left or the request was
already re-routed ``max_reroutes`` times, answering it with an error. Nothing is lost silently.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ryzlab.orchestrator.pool import ProcessPool, Slot, reroute
from ryzlab.serve.engine import EngineError, NoWorkerAvailable
from ryzlab.serve.sampling import TokenChunk
from ryzlab.serve.spec import ReplicaSpec
from ryzlab.serve.stream import TokenStream
from ryzlab.serve.worker import HEARTBEAT_S, worker_main

__all__ = ["Router", "RouteRequest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteRequest:
    """What a policy sees of a request."""

    id: str
    size: float
    prefix_key: int | None


@dataclass(eq=False)
class _Req:
    rid: str
    prompt: list[int]
    params: Any
    stream: TokenStream
    worker: int = -1
    emitted: list[int] = field(default_factory=list)
    reroutes: int = 0
    t0: float = field(default_factory=time.monotonic)


class Router(ProcessPool):
    """``workers`` engine processes behind a load-balancing policy (see module docstring), each
    one replica of ``spec`` (default: the reference model, one rank)."""

    def __init__(self, *, workers: int = 2, policy: str = "least_outstanding",
                 spec: ReplicaSpec | None = None, threads_per_worker: int = 1,
                 heartbeat_timeout_s: float = 2.0, restart: bool = True, max_reroutes: int = 2,
                 affinity_tokens: int = 32, model_name: str = "ryzlab-reference", seed: int = 0,
                 start_timeout_s: float = 120.0, progress_timeout_s: float | None = 120.0):
        from ryzlab.orchestrator.balance import make_policy
        from ryzlab.orchestrator.launch import mp_context
        from ryzlab.orchestrator.stats import StatsCollector
        from ryzlab.serve.replica import tokenizer_for

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not heartbeat_timeout_s > HEARTBEAT_S:
            raise ValueError(f"heartbeat_timeout_s must be > the {HEARTBEAT_S} s beat, got {heartbeat_timeout_s}")
        if max_reroutes < 0:
            raise ValueError(f"max_reroutes must be >= 0, got {max_reroutes}")
        pol = make_policy(policy, seed=seed)
        spec = ReplicaSpec() if spec is None else spec
        if not isinstance(spec, ReplicaSpec):  # a bad model / codec / layout failed when the spec was made
            raise TypeError(f"spec must be a ReplicaSpec, got {type(spec).__name__}")
        simple = not spec.device.startswith("cuda") and spec.world_size == 1
        # one-rank CPU workers fork from the fork server (torch imported once: a restart takes far
        # less); CUDA workers get their devices through the environment, which only a spawned child
        # copies, and a replica's driver starts its own fork server for its ranks
        super().__init__(workers, pol, ctx=mp_context("forkserver" if simple else "spawn"),
                         heartbeat_interval_s=HEARTBEAT_S, heartbeat_timeout_s=heartbeat_timeout_s,
                         progress_timeout_s=progress_timeout_s, max_attempts=max_reroutes + 1,
                         restart=restart, start_timeout_s=start_timeout_s)
        self.policy_name = policy
        self.spec = spec
        self.threads_per_worker = threads_per_worker
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_reroutes = max_reroutes
        self.affinity_tokens = affinity_tokens
        self.model_name = model_name
        self.tokenizer = tokenizer_for(spec.model)
        """The model's tokenizer, for the API's string prompts (files / metadata only, no weights)."""
        self.vocab_size = 0
        self.max_model_len = 0
        self._reqs: dict[str, _Req] = {}
        self.latency = StatsCollector(reservoir=100_000, seed=seed)
        """End-to-end request latency per worker and overall (the orchestrator's statistics)."""
        self.counters = {"requests": 0, "completed": 0, "failed": 0, "rerouted": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Router":
        """Spawn every worker and wait until each has loaded its model."""
        super().start()
        return self

    def shutdown(self) -> None:
        self.close()
        with self._lock:
            for req in list(self._reqs.values()):
                self._fail_req(req, "router shut down")

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _ranks(self) -> int:
        return self.spec.world_size

    def _worker_process(self, slot: Slot, tasks: Any, results: Any) -> Any:
        spec = self.spec
        if spec.device == "cuda" and self._ranks() == 1:
            import torch

            spec = spec.on_device(f"cuda:{slot.index % max(1, torch.cuda.device_count())}")  # one replica per GPU
        # a replica's driver starts its other ranks itself: daemonic processes may not have children
        return self._ctx.Process(target=worker_main, name=f"ryzlab-worker-{slot.index}", daemon=self._ranks() == 1,
                                 args=(slot.index, spec, tasks, results, self.threads_per_worker, os.getpid()))

    def _worker_env(self, slot: Slot) -> dict[str, str]:
        ranks = self._ranks()
        if self.spec.device != "cuda" or ranks == 1:
            return {}
        import torch

        n = max(1, torch.cuda.device_count())  # a replica of tp x cp ranks on its own GPUs (rank r on cuda:r)
        first = (slot.index * ranks) % n
        return {"CUDA_VISIBLE_DEVICES": ",".join(str((first + r) % n) for r in range(ranks))}

    # ------------------------------------------------------------------ worker messages (lock held)
    def _on_ready(self, slot: Slot, info: Any) -> None:
        self.vocab_size, self.max_model_len = info["vocab_size"], info["max_model_len"]

    def _on_message(self, slot: Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "stats":
            slot.stats = msg[1]
        elif kind == "step":
            for rid, toks, finish_reason, err in msg[1]:
                if err:
                    self._on_output(slot, rid, "err", err)
                    continue
                if toks:  # the last chunk carries the finish_reason (the client reads it there)
                    self._on_output(slot, rid, "tok", toks)
                if finish_reason is not None:
                    self._on_output(slot, rid, "done", None)
        elif kind == "err":
            self._on_output(slot, msg[1], "err", msg[2])

    def _on_output(self, slot: Slot, rid: str, kind: str, payload: Any) -> None:
        req = self._reqs.get(rid)
        if req is None or req.worker != slot.index:
            return  # aborted, or a late message from before a re-route
        if kind == "tok":
            req.emitted.extend(payload)
            self._put(req, payload)
            return
        self._release(req)
        ok = kind == "done"
        self.latency.record(slot.index, (time.monotonic() - req.t0) * 1000.0, ok)
        self.counters["completed" if ok else "failed"] += 1
        slot.served += ok
        self._put(req, None if ok else EngineError(payload))

    @staticmethod
    def _put(req: _Req, item: Any) -> None:
        req.stream.put(item)  # False: the client's event loop is gone, nobody to tell

    def _release(self, req: _Req) -> None:
        self._reqs.pop(req.rid, None)
        if 0 <= req.worker < len(self.workers):
            self.workers[req.worker].held.discard(req.rid)

    def _fail_req(self, req: _Req, message: str, error: type[EngineError] = EngineError) -> None:
        self._release(req)
        self.latency.record("router", (time.monotonic() - req.t0) * 1000.0, False)
        self.counters["failed"] += 1
        self._put(req, error(message))

    # ------------------------------------------------------------------ faults (lock held)
    def _stranded(self, slot: Slot, uids: list, why: str) -> None:
        reqs = [self._reqs[r] for r in uids if r in self._reqs]
        for req in reqs:
            req.worker = -1
        reroute(self.policy, slot.index, reqs, attempts=lambda r: r.reroutes + 1, max_attempts=self.max_attempts,
                send=lambda r: self._resend(r, why),
                give_up=lambda r: self._fail_req(r, f"{why}; already re-routed {r.reroutes} time(s)"))

    def _resend(self, req: _Req, why: str) -> None:
        if self._remaining(req) <= 0:  # it had streamed everything: nothing to redo
            self._release(req)
            self.counters["completed"] += 1
            # a stop token would have come with its finish in the same step message: max_tokens it was
            end = TokenChunk()
            end.finish_reason = "length"
            self._put(req, end)
            self._put(req, None)
            return
        req.reroutes += 1
        if self._dispatch(req):
            self.counters["rerouted"] += 1
        else:
            self._fail_req(req, f"{why}; no healthy worker left", NoWorkerAvailable)

    def kill_worker(self, index: int) -> None:
        """Fault injection: SIGKILL worker ``index`` (the pool detects it like any crash)."""
        self.inject(index, "kill")

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _remaining(req: _Req) -> int:
        return req.params.max_tokens - len(req.emitted)

    def _dispatch(self, req: _Req) -> bool:
        """Send ``req`` (continuing after ``req.emitted``) to the policy's pick; False if none."""
        key = hash(tuple(req.prompt[: self.affinity_tokens])) if len(req.prompt) >= self.affinity_tokens else None
        route = RouteRequest(req.rid, float(len(req.prompt) + req.params.max_tokens), key)
        i = self._assign(req.rid, route, ("add", req.rid, req.prompt + req.emitted, req.params, len(req.emitted)))
        if i is None:
            return False
        req.worker = i
        return True

    async def generate(self, request_id: str, prompt: list[int], params: Any) -> AsyncIterator[list[int]]:
        """Stream new token ids; raises :class:`EngineError` when the request fails. ``params``
        (anything with the engine's sampling field names) goes to the worker unchanged."""
        req = _Req(request_id, list(prompt), params, TokenStream())
        with self._lock:
            if request_id in self._reqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._reqs[request_id] = req
            self.counters["requests"] += 1
            if self.error is not None:
                self._fail_req(req, f"router cannot serve: {self.error}")
            elif not self._dispatch(req):
                self._fail_req(req, "no healthy worker", NoWorkerAvailable)
        try:
            async for chunk in req.stream.drain():
                yield chunk
        finally:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            req = self._reqs.get(request_id)
            if req is None:
                return
            self._release(req)
            if req.worker >= 0:
                self._send(req.worker, ("abort", request_id))

    # ------------------------------------------------------------------ observability
    def health(self) -> dict[str, Any]:
        per = self.pool_health()
        n = sum(w["healthy"] for w in per)
        return {"healthy": n > 0 and self.error is None,
                "reason": self.error or f"{n}/{len(self.workers)} workers healthy",
                "healthy_workers": n, "heartbeat_timeout_s": self.beat_timeout(), "workers": per}

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {**self.counters, "worker_deaths": len(self.faults),
                                   "worker_restarts": sum(w.restarts for w in self.workers),
                                   "workers": len(self.workers), "policy": self.policy_name,
                                   "healthy_workers": sum(w.healthy for w in self.workers),
                                   "heartbeat_timeout_s": self.beats.timeout(),
                                   "heartbeat_gap_p99_s": self.beats.p99()}
            stats = [w.stats for w in self.workers if w.stats]
            per_worker = [{"worker": w.index, "outstanding": w.outstanding, "served": w.served,
                           **{k: w.stats.get(k) for k in ("kv_cache_usage_perc", "preemptions",
                                                         "num_running", "num_waiting")}}
                          for w in self.workers]
        for key in ("kv_cache_usage_perc", "prefix_cache_hit_rate"):
            vals = [s[key] for s in stats if key in s]
            if vals:
                out[key] = sum(vals) / len(vals)
        out["preemptions"] = sum(s.get("preemptions", 0) for s in stats)
        out["latency"] = self.latency.to_frame().to_dict(orient="records")
        out["per_worker"] = per_worker
        return out
