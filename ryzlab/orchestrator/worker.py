"""Body of one live compute worker process: real CPU compute sized by the request, plus a heartbeat.

Kept apart from the pool so a worker imports little (numpy, no pandas/torch) and a restart is
quick. The work is a chain of small float32 matrix products whose count is ``size * mean_work_ms``
divided by the per-product time this worker measured at start, so a size-1 request costs about
``mean_work_ms`` of one core. Nothing sleeps: a worker that is paused (SIGSTOP) or starved really
stops making progress, which is what the pool's watchdog (:mod:`.pool`) watches.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any, Callable

__all__ = ["worker_main", "MATMUL_DIM", "start_heartbeat"]

MATMUL_DIM = 48
"""Small enough that one product is ~10-50 us, so request sizes are resolved finely."""


def _calibrate(np: Any, a: Any, b: Any, reps: int = 200) -> float:
    """Seconds per product, best of three short runs (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a = np.tanh(a @ b)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def start_heartbeat(results: Connection, interval_s: float) -> tuple[Callable[[tuple], None], threading.Event]:
    """The pool's worker side: a thread sending ``("hb", time.monotonic())`` every ``interval_s``
    (it stops when the process is killed or paused, not when the main loop is busy), and a
    ``send`` the main loop shares with it (one pipe, one writer at a time)."""
    lock = threading.Lock()
    stop = threading.Event()

    def send(msg: tuple) -> None:
        with lock:
            results.send(msg)

    def beat() -> None:
        while not stop.is_set():
            try:
                send(("hb", time.monotonic()))
            except (OSError, ValueError):  # the pool closed our pipe: it has given up on us
                return
            stop.wait(interval_s)

    threading.Thread(target=beat, daemon=True, name="ryzlab-heartbeat").start()
    return send, stop


def worker_main(index: int, mean_work_ms: float, heartbeat_interval_s: float, tasks: Any,
                results: Connection, pool_pid: int) -> None:
    """Serve ``(unit_id, size, prefix_key)`` tasks until ``None``; report each unit's start, end
    (``time.monotonic``, the pool's clock), whether its prefix was cached here, and a checksum.

    Prefix caching is modelled as in the simulator: a small LRU of prefix keys; a hit costs
    ``PREFIX_HIT_COST`` of the work (the shared part of the prompt is not recomputed).
    """
    import numpy as np

    from ryzlab.orchestrator.launch import exit_with_parent
    from ryzlab.orchestrator.workload import PREFIX_CACHE_SIZE, PREFIX_HIT_COST

    exit_with_parent(pool_pid)
    rng = np.random.default_rng(index)
    a = rng.standard_normal((MATMUL_DIM, MATMUL_DIM)).astype(np.float32) * 0.1
    b = rng.standard_normal((MATMUL_DIM, MATMUL_DIM)).astype(np.float32) * 0.1
    per_product_s = _calibrate(np, a, b)
    products_per_unit = max(1.0, mean_work_ms / 1000.0 / per_product_s)
    cache: OrderedDict = OrderedDict()
    results.send(("ready", {"per_product_s": per_product_s, "pid": os.getpid()}))
    send, stop = start_heartbeat(results, heartbeat_interval_s)
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            unit_id, size, prefix = task
            start = time.monotonic()
            hit = prefix is not None and prefix in cache
            if prefix is not None:
                cache[prefix] = True
                cache.move_to_end(prefix)
                if len(cache) > PREFIX_CACHE_SIZE:
                    cache.popitem(last=False)
            x = a
            for _ in range(max(1, round(size * products_per_unit * (PREFIX_HIT_COST if hit else 1.0)))):
                x = np.tanh(x @ b)
            send(("done", unit_id, start, time.monotonic(), hit, float(x[0, 0])))
    except (OSError, EOFError):
        pass  # the pool is gone or gave up on this incarnation
    finally:
        stop.set()
        results.close()
