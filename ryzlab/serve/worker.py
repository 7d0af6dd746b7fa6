"""A worker process: one engine (one data-parallel replica) driven over a pipe.

One worker per GPU where there are GPUs, or per ``tp x cp`` GPUs for a replica of several ranks
(the worker is the replica's driver rank and starts the others: :func:`ryzlab.serve.replica.start_replica`);
CPU processes otherwise. The protocol is a few tuples on a ``multiprocessing`` pipe:

parent -> worker: ``("add", rid, prompt, sampling_kwargs)``, ``("abort", rid)``, ``("stop",)``
worker -> parent: ``("ready", info)``, ``("step", [(rid, [ids], finished, error), ...])`` (all
outputs of one engine step), ``("err", rid, message)``, ``("hb", monotonic_time, stats)`` (heartbeat, also sent while
busy so a hung forward shows up as a stale heartbeat), ``("fatal", message)``.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

__all__ = ["worker_main", "HEARTBEAT_S"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.2
"""Seconds between heartbeats; the router's watchdog declares a worker hung after several."""


def worker_main(index: int, engine_kwargs: dict[str, Any], conn: Any, threads: int = 1) -> None:
    """Process entry point: build the engine, then loop (receive commands, step, send outputs)."""
    import torch

    from ..orchestrator.launch import exit_with_parent
    from .engine import SamplingParams
    from .replica import start_replica

    exit_with_parent(os.getppid())  # no orphaned replica if the router is killed
    torch.set_num_threads(threads)
    try:
        engine = start_replica(engine_kwargs, threads=threads)
    except Exception:  # noqa: BLE001 - report why we cannot start, then exit
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", {"pid": os.getpid(), "index": index, "vocab_size": engine.vocab_size,
                         "max_model_len": engine.config.max_model_len}))
    last_hb = 0.0
    while True:
        busy = engine.has_work()
        timeout = 0.0 if busy else HEARTBEAT_S
        try:
            while conn.poll(timeout):
                msg = conn.recv()
                timeout = 0.0
                if msg[0] == "add":
                    _, rid, prompt, sp = msg
                    try:
                        engine.add_request(rid, prompt, SamplingParams(**sp))
                    except ValueError as e:
                        conn.send(("err", rid, str(e)))
                elif msg[0] == "abort":
                    engine.abort(msg[1])
                elif msg[0] == "stop":
                    engine.close()  # the replica's other ranks leave their loop too
                    return
        except (EOFError, OSError):  # parent went away
            engine.close()
            return
        now = time.monotonic()
        if now - last_hb >= HEARTBEAT_S:
            conn.send(("hb", now, engine.stats()))
            last_hb = now
        if not engine.has_work():
            continue
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests of this step, keep serving
            log.exception("worker %d: engine step failed", index)
            for rid in list(engine.by_id):
                engine.abort(rid)
                conn.send(("err", rid, f"engine step failed: {e}"))
            continue
        # one message per step (not per request): fewer pickles and syscalls per token
        if outputs:
            conn.send(("step", [(o.request_id, o.new_tokens, o.finished, o.error) for o in outputs]))
