"""A serving worker process: one engine (one data-parallel replica) driven by the worker pool.

One worker per GPU where there are GPUs, or per ``tp x cp`` GPUs for a replica of several ranks
(the worker is the replica's driver rank and starts the others: :func:`ryzlab.serve.replica.start_replica`);
CPU processes otherwise. It speaks the pool's protocol (:mod:`ryzlab.orchestrator.pool`):

parent -> worker (task queue): ``("add", rid, prompt, params, n_done)`` -- ``params`` is the caller's
object, forwarded unchanged (:func:`sampling_params` reads it; ``n_done`` tokens were already
streamed by a worker that died, so ``max_tokens`` shrinks by that much), ``("abort", rid)``,
``None`` (stop).
worker -> parent (pipe): ``("ready", info)``, ``("hb", monotonic_t)`` (side thread: a paused or dead
process stops beating, a long step does not), ``("stats", engine_stats)`` (from the main loop,
at most every ``HEARTBEAT_S``), ``("step", [(rid, [ids], finish_reason, error), ...])`` (all outputs of
one engine step; ``finish_reason`` None while the request runs), ``("err", rid, message)``, ``("fatal", traceback)``.
"""
from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from dataclasses import fields, replace
from typing import Any

__all__ = ["worker_main", "sampling_params", "HEARTBEAT_S"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.2
"""Seconds between heartbeats; the pool's timeout is a multiple of the measured gaps (floor: the router's)."""


def sampling_params(params: Any, done: int = 0) -> Any:
    """The engine's ``SamplingParams`` from any params object with the same field names (the API's
    ``CompletionParams`` included), ``max_tokens`` lowered by ``done`` tokens already streamed."""
    from ryzlab.serve.engine import SamplingParams

    if not isinstance(params, SamplingParams):
        params = SamplingParams(**{f.name: getattr(params, f.name) for f in fields(SamplingParams)
                                   if hasattr(params, f.name)})
    return replace(params, max_tokens=params.max_tokens - done, stop_token_ids=tuple(params.stop_token_ids))


def worker_main(index: int, spec: Any, tasks: Any, results: Any, threads: int = 1,
                parent_pid: int | None = None) -> None:
    """Process entry point: build the engine of ``spec`` (a :class:`~ryzlab.serve.spec.ReplicaSpec`,
    validated by the router), then loop (receive commands, step, send outputs)."""
    import torch

    from ryzlab.orchestrator.launch import exit_with_parent
    from ryzlab.orchestrator.worker import start_heartbeat
    from ryzlab.serve.replica import start_replica

    exit_with_parent(parent_pid or os.getppid())  # no orphaned replica if the router is killed
    torch.set_num_threads(threads)
    try:
        engine = start_replica(spec, threads=threads)
    except Exception:  # noqa: BLE001 - report why we cannot start, then exit
        results.send(("fatal", traceback.format_exc()))
        return
    results.send(("ready", {"pid": os.getpid(), "index": index, "vocab_size": engine.vocab_size,
                            "max_model_len": engine.config.max_model_len}))
    send, stop = start_heartbeat(results, HEARTBEAT_S)
    last_stats = 0.0
    try:
        while True:
            msgs = []
            if not engine.has_work():
                try:
                    msgs.append(tasks.get(timeout=HEARTBEAT_S))
                except queue.Empty:
                    pass
            while True:
                try:
                    msgs.append(tasks.get_nowait())
                except queue.Empty:
                    break
            for msg in msgs:
                if msg is None:
                    return
                if msg[0] == "add":
                    _, rid, prompt, params, done = msg
                    try:
                        engine.add_request(rid, prompt, sampling_params(params, done))
                    except (ValueError, TypeError) as e:
                        send(("err", rid, str(e)))
                elif msg[0] == "abort":
                    engine.abort(msg[1])
            now = time.monotonic()
            if now - last_stats >= HEARTBEAT_S:
                send(("stats", engine.stats()))
                last_stats = now
            if not engine.has_work():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests of this step, keep serving
                log.exception("worker %d: engine step failed", index)
                for rid in list(engine.by_id):
                    engine.abort(rid)
                    send(("err", rid, f"engine step failed: {e}"))
                continue
            # one message per step (not per request): fewer pickles and syscalls per token
            if outputs:
                send(("step", [(o.request_id, o.new_tokens, o.finish_reason, o.error) for o in outputs]))
    except (EOFError, OSError):  # the router went away, or gave up on this incarnation
        pass
    finally:
        stop.set()
        engine.close()  # the replica's other ranks leave their loop too
