"""Process groups and single-node launch: ``env://`` rendezvous, so ``torchrun`` works unchanged.

``launch(fn, world_size)`` starts one spawned process per rank, sets the variables ``torchrun``
would set (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins
the process group through :func:`init_from_env` and returns every rank's ``fn`` result in
rank order. The parent watches one result pipe and one process sentinel per rank, so:

* the first failure (an exception, or a rank that dies without reporting) ends the launch
  at once: every other rank is terminated (SIGTERM, then SIGKILL after a grace period) and a
  :class:`RankFailedError` naming the rank and carrying its traceback is raised;
* rendezvous is bounded by ``init_timeout_s`` and the whole run by ``timeout_s``; gloo/nccl
  collectives get ``collective_timeout_s`` so a rank stuck in a collective raises too;
* world_size 1 runs the same code path (one spawned rank, a one-member process group).

``fn`` and ``args`` are serialized *by value* with cloudpickle (as Ray and loky do), so a function
defined in a notebook cell or in ``python -`` launches; a rank that cannot load or run it reports
why, naming itself. Results travel back through pipes (pickled in memory, never on disk).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator, Literal, get_args

from ryzlab.config import BACKENDS, check_choice

log = logging.getLogger(__name__)

__all__ = ["launch", "start_ranks", "join_group", "RankProcesses", "init_from_env", "choose_backend", "free_port",
           "DistContext", "LaunchError", "RankFailedError", "LaunchTimeoutError"]

TERMINATE_GRACE_S = 1.0
"""SIGTERM -> SIGKILL grace: short, so a failing launch ends well inside its 5 s budget."""


class LaunchError(RuntimeError):
    """Base class for every launch failure."""


class RankFailedError(LaunchError):
    """A rank raised or died; ``rank`` is the first one that failed, ``remote_traceback`` its trace."""

    def __init__(self, rank: int, remote_traceback: str, exitcode: int | None = None,
                 failed_at: float | None = None):
        self.rank = rank
        self.failed_at = failed_at
        """Wall-clock time (``time.time()``) at which the rank failed, or was seen dead."""
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode
        super().__init__(f"rank {rank} failed (exitcode={exitcode}):\n{remote_traceback}")


class LaunchTimeoutError(LaunchError):
    """Rendezvous or the whole run took longer than allowed; ``ranks`` are the ones not done."""

    def __init__(self, what: str, timeout_s: float, ranks: list[int]):
        self.ranks = ranks
        super().__init__(f"{what} exceeded {timeout_s:g} s; ranks not finished: {ranks}")


@dataclass(frozen=True)
class DistContext:
    """What a rank knows about itself after joining the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    """``gloo`` or ``nccl``: what the process group actually uses."""
    device: str
    """``cuda:<local_rank>`` under nccl, ``cpu`` under gloo."""


def choose_backend(backend: str = "auto", local_world_size: int = 1) -> str:
    """``auto`` -> nccl when this node has at least ``local_world_size`` CUDA devices, else gloo.

    Asking for nccl without enough CUDA devices is a ``ValueError`` (nccl would hang or fail
    late inside the first collective).
    """
    check_choice("backend", backend, BACKENDS)
    import torch

    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if n_cuda >= local_world_size and n_cuda > 0 else "gloo"
    if backend == "nccl" and n_cuda < local_world_size:
        raise ValueError(f"backend='nccl' needs {local_world_size} CUDA device(s) on this node, found "
                         f"{n_cuda}; valid backends here: 'gloo', 'auto'")
    return backend


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; tiny race accepted, as in torchrun)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: str = "auto", *, collective_timeout_s: float = 120.0) -> DistContext:
    """Join the process group described by ``torchrun``-style environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``), and
    ``MASTER_ADDR``/``MASTER_PORT`` through ``init_method="env://"``. Without those variables
    (a plain ``python script.py``) it behaves as rank 0 of 1 on a fresh local port, so the same
    code runs at world_size 1. Idempotent: a second call returns the current context.
    """
    import torch
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not dist.is_initialized():
        from ryzlab.orchestrator.nodes import choose_gloo_interface

        choose_gloo_interface(os.environ["MASTER_ADDR"])  # several hosts: bind gloo where the others can reach
        chosen = choose_backend(backend, local_world)
        if chosen == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(chosen, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=collective_timeout_s))
    chosen = dist.get_backend()
    device = f"cuda:{local_rank}" if chosen == "nccl" else "cpu"
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=chosen, device=device)


def exit_with_parent(launcher_pid: int, interval_s: float = 0.5) -> None:
    """Exit this process once ``launcher_pid`` is gone (even by SIGKILL): no orphaned ranks/workers.

    Watching ``getppid()`` is not enough: under the fork server the parent is the server, which
    itself stays up while any child it forked is alive.
    """
    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(launcher_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # pid reused by another user's process: ours is gone
                os._exit(1)

    threading.Thread(target=watch, name="ryzlab-parent-watch", daemon=True).start()


def _rank_main(rank: int, world_size: int, port: int, backend: str, collective_timeout_s: float,
               threads: int, payload: bytes, conn: Connection, launcher_pid: int) -> None:
    """Body of one spawned rank: env, process group, ``fn``, report, tear down.

    A failure is reported *before* anything else happens (no group teardown first), with its
    wall-clock time, so the parent can tell the rank that failed first from peers that failed
    because of it (their collectives break once the first rank is gone).
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    exit_with_parent(launcher_pid)
    try:
        import torch
        import torch.distributed as dist

        import cloudpickle

        torch.set_num_threads(threads)
        fn, args = cloudpickle.loads(payload)  # before the group: a bad payload fails alone, at once
        init_from_env(backend, collective_timeout_s=collective_timeout_s)
        conn.send(("ready", None))
        result = fn(rank, world_size, *args)
        dist.destroy_process_group()
        # plain pickle bytes: a Connection would share tensor storage through file descriptors
        # (torch.multiprocessing's reductions), which dies with this process
        conn.send(("ok", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException:  # noqa: BLE001 - everything a rank raises goes to the parent
        try:
            conn.send(("error", (time.time(), f"[rank {rank}] " + traceback.format_exc())))
        except (OSError, ValueError):
            pass
        conn.close()
        os._exit(1)
    conn.close()


def _stop(procs: list, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM every live process, SIGKILL what is left after ``grace_s``, reap all: no orphans."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5.0)


FORKSERVER_PRELOAD = ["torch", "torch.distributed", "ryzlab.orchestrator.launch", "ryzlab.orchestrator.worker"]
"""One list for every user of the (process-wide) fork server: ranks and live workers."""
StartMethod = Literal["forkserver", "spawn"]
START_METHODS: tuple[str, ...] = get_args(StartMethod)


def mp_context(start_method: str = "forkserver") -> Any:
    """A multiprocessing context for ranks. ``forkserver`` (default on Linux) forks each rank
    from a clean single-threaded server that imported torch once, so a rank starts in
    milliseconds instead of re-importing torch (seconds per rank on a busy 2-core machine);
    ``spawn`` starts a fresh interpreter per rank. Neither inherits the caller's threads."""
    import torch.multiprocessing as mp

    check_choice("start_method", start_method, START_METHODS)
    if start_method == "forkserver":
        if "forkserver" not in mp.get_all_start_methods():
            return mp.get_context("spawn")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        return ctx
    return mp.get_context("spawn")


@dataclass
class RankProcesses:
    """Ranks started by :func:`start_ranks`: their processes, result pipes and rendezvous port."""

    ranks: list[int]
    procs: list[Any]
    conns: list[Connection]
    port: int
    backend: str

    def dead(self) -> list[int]:
        """Ranks whose process has exited (for a driver rank that must not outlive its group)."""
        return [r for r, p in zip(self.ranks, self.procs) if not p.is_alive()]

    def stop(self) -> None:
        _stop(self.procs)
        for c in self.conns:
            c.close()


def _check_launch_args(fn: Callable[..., Any], world_size: int, **timeouts: float) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for name, value in timeouts.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")


def start_ranks(fn: Callable[..., Any], world_size: int, ranks: range | list[int], *, args: tuple = (),
                backend: str = "auto", collective_timeout_s: float = 120.0, threads_per_rank: int | None = None,
                start_method: str = "forkserver", port: int | None = None) -> RankProcesses:
    """Start ``fn(rank, world_size, *args)`` in one process per rank of ``ranks`` (not waiting).

    :func:`launch` starts every rank this way; a serving driver starts ranks ``1..world_size-1``
    and joins the group itself as rank 0 (:func:`join_group`). ``fn`` and ``args`` travel by
    value (cloudpickle). Raises ``ValueError`` for bad arguments before any process starts.
    """
    _check_launch_args(fn, world_size, collective_timeout_s=collective_timeout_s)
    import cloudpickle

    try:
        payload = cloudpickle.dumps((fn, tuple(args)))
    except Exception as e:  # noqa: BLE001 - any pickling failure is the caller's input
        raise ValueError(f"cannot serialize fn / args for the ranks: {type(e).__name__}: {e}") from e
    chosen = choose_backend(backend, world_size)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp_context(start_method)
    group = RankProcesses(list(ranks), [], [], port or free_port(), chosen)
    try:
        with _main_not_rerun():
            _start_each(ctx, group, world_size, collective_timeout_s, threads, payload)
    except BaseException:
        group.stop()
        raise
    log.info("started rank(s) %s of %d on %s, port %d", group.ranks, world_size, chosen, group.port)
    return group


def _start_each(ctx: Any, group: RankProcesses, world_size: int, collective_timeout_s: float, threads: int,
                payload: bytes) -> None:
    for rank in group.ranks:
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_main, name=f"ryzlab-rank{rank}", daemon=True,
                        args=(rank, world_size, group.port, group.backend, collective_timeout_s, threads, payload,
                              send, os.getpid()))
        p.start()
        send.close()  # the child holds the only write end: EOF on recv means it is gone
        group.procs.append(p)
        group.conns.append(recv)


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start ranks without multiprocessing re-running the launcher's ``__main__`` in them.

    ``fn`` travels by value, so the ranks never need the launcher's script; re-running it would
    fail for ``python -`` (no file) and run unguarded top-level code of a script twice.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is not None and getattr(main, "__spec__", None) is None:
        del main.__file__
    try:
        yield
    finally:
        if path is not None and getattr(main, "__spec__", None) is None:
            main.__file__ = path


def join_group(rank: int, world_size: int, port: int, backend: str, *, collective_timeout_s: float = 120.0
               ) -> DistContext:
    """Join the process group of ranks started by :func:`start_ranks` from this process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    return init_from_env(backend, collective_timeout_s=collective_timeout_s)


def launch(fn: Callable[..., Any], world_size: int, *, args: tuple = (), backend: str = "auto",
           timeout_s: float = 600.0, init_timeout_s: float = 60.0, collective_timeout_s: float = 120.0,
           threads_per_rank: int | None = None, start_method: str = "forkserver") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank.

    ``backend``: ``auto`` (nccl with enough CUDA devices, else gloo), ``gloo`` or ``nccl``.
    ``init_timeout_s`` bounds process start + rendezvous, ``timeout_s`` the whole run,
    ``collective_timeout_s`` each collective inside ``fn``. ``threads_per_rank`` defaults to
    the CPU count split evenly over ranks (ranks oversubscribing cores slow each other down).
    ``start_method``: ``forkserver`` (default; spawn-clean, torch imported once) or ``spawn``.
    Raises :class:`RankFailedError` for the first rank that fails (all others are stopped),
    :class:`LaunchTimeoutError` on a timeout, ``ValueError`` for bad arguments (before any
    process starts).
    """
    _check_launch_args(fn, world_size, timeout_s=timeout_s, init_timeout_s=init_timeout_s,
                       collective_timeout_s=collective_timeout_s)
    t0 = time.monotonic()
    group = start_ranks(fn, world_size, range(world_size), args=args, backend=backend,
                        collective_timeout_s=collective_timeout_s, threads_per_rank=threads_per_rank,
                        start_method=start_method)
    try:
        return _collect(group.procs, group.conns, t0, timeout_s, init_timeout_s)
    finally:
        group.stop()


FIRST_FAILURE_WINDOW_S = 0.3
"""After a failure arrives, how long to listen for an earlier one still in flight from a peer."""


def _first_failure(procs: list, conns: dict[Connection, int], first: tuple[int, float, str]) -> RankFailedError:
    """The earliest-stamped failure among ``first`` and any others arriving within a short window.
    ``conns``: the other ranks' pipes -> their rank (a position in a filtered list is not a rank: a
    peer's traceback was once reported under the first failing rank's number)."""
    failures = [first]
    conns = dict(conns)
    deadline = time.monotonic() + FIRST_FAILURE_WINDOW_S
    while time.monotonic() < deadline and conns:
        for conn in wait(list(conns), timeout=0.05):
            rank = conns[conn]
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                del conns[conn]
                continue
            if kind == "error":
                failures.append((rank, payload[0], payload[1]))
    rank, stamp, tb = min(failures, key=lambda f: f[1])
    return RankFailedError(rank, tb, procs[rank].exitcode, failed_at=stamp)


def _collect(procs: list, conns: list[Connection], t0: float, timeout_s: float,
             init_timeout_s: float) -> list[Any]:
    n = len(procs)
    ready: set[int] = set()
    results: dict[int, Any] = {}
    open_conns = {c: r for r, c in enumerate(conns)}
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}

    def fail(rank: int, stamp: float, tb: str) -> RankFailedError:
        others = {c: r for c, r in open_conns.items() if r != rank}
        return _first_failure(procs, others, (rank, stamp, tb))

    while len(results) < n:
        now = time.monotonic()
        if len(ready) < n and now - t0 > init_timeout_s:
            raise LaunchTimeoutError("process start + rendezvous", init_timeout_s,
                                     sorted(set(range(n)) - ready))
        if now - t0 > timeout_s:
            raise LaunchTimeoutError("launch", timeout_s, sorted(set(range(n)) - set(results)))
        waitables = list(open_conns) + [s for s, r in sentinels.items() if r not in results]
        for obj in wait(waitables, timeout=0.05):
            rank = open_conns.get(obj)
            if rank is not None:
                try:
                    kind, payload = obj.recv()
                except (EOFError, OSError):
                    del open_conns[obj]  # writer gone; the sentinel tells whether it reported
                    continue
                if kind == "ready":
                    ready.add(rank)
                elif kind == "ok":
                    results[rank] = pickle.loads(payload)
                else:
                    raise fail(rank, *payload)
            else:
                rank = sentinels[obj]
                if rank in results:
                    continue
                conn = conns[rank]  # drain a report sent just before exit
                while conn in open_conns and conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "ok":
                        results[rank] = pickle.loads(payload)
                    elif kind == "error":
                        raise fail(rank, *payload)
                if rank not in results:
                    procs[rank].join(0.1)
                    code = procs[rank].exitcode
                    raise fail(rank, time.time(), f"[rank {rank}] process exited with code {code} "
                                                  f"without reporting (killed or crashed)")
    log.info("launch finished in %.2f s", time.monotonic() - t0)
    return [results[r] for r in range(n)]
