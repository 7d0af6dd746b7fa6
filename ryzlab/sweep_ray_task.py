"""The worker side of ``--executor ray``: one Ray task runs one sweep point and returns its files.

A task does not run the notebook in the Ray worker. It hands the point to the local executor's
point worker (:func:`ryzlab.sweep._point_worker`) started as a fresh process on the worker's node
(``python -m ryzlab.sweep_ray_task``), which runs it in its own fresh kernel (papermill) into a
private temporary folder; the task then reads that folder's files as bytes and returns them.

Why a separate process: the point gets its own process group (``setsid``) and kernel, Ray's
worker stays small and reusable, and a cancelled or timed-out point is stopped by killing that
process tree (:func:`kill_tree`) rather than by unwinding papermill inside Ray's thread.

Like the local executor, a task starts the *next* point's process while its own point runs (one
spare per Ray worker), so kernel start-up and imports (torch, pandas, ...) leave the critical
path. A spare is used only by a task with the same kernel and the same device-visibility
environment (``CUDA_VISIBLE_DEVICES``... as Ray set them for the task that started it);
otherwise it is discarded and the point starts cold. Unused spares are closed after
:data:`SPARE_IDLE_S`.

Faults: if the Ray worker dies, the point's process gets SIGKILL from the kernel
(``PR_SET_PDEATHSIG``, set by the point worker) and its notebook kernel exits when it sees its
parent gone (ipykernel's parent poller). Nothing was written in the results folder (that
happens on the driver); the dead worker's temporary folder is removed by the next task on that
node.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPARE_IDLE_S = 120.0  # a spare waiting longer than this for a point is closed (its kernel holds memory)
ROOT_PREFIX = "ryzlab-ray-"  # <tmp>/ryzlab-ray-<ray worker pid>/: this worker's points


@dataclass
class _Runner:
    """A point worker process and our end of its pipe."""

    proc: subprocess.Popen
    conn: Connection
    folder: Path
    kernel_name: str
    env_sig: tuple
    born: float


_spares: list[_Runner] = []
_lock = threading.Lock()
_reaper: threading.Thread | None = None


def _env_sig() -> tuple:
    """The environment Ray sets per task that a kernel cannot change after it started."""
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k.endswith("_VISIBLE_DEVICES") or k == "OMP_NUM_THREADS"))


def _root() -> Path:
    root = Path(tempfile.gettempdir()) / f"{ROOT_PREFIX}{os.getpid()}"
    root.mkdir(exist_ok=True)
    return root


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _clean_dead_roots() -> None:
    """Remove the temporary folders of Ray workers on this node that died (mid-point or idle)."""
    for d in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"):
        pid = d.name[len(ROOT_PREFIX):]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process, every descendant and every process group one of them leads, and reap them.

    The point worker leads its own group, and the notebook kernel leads another (jupyter_client
    starts kernels in a new session), so killing one group is not enough.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    leaders = {p.pid for p in procs}
    for p in procs:
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            continue
        if pgid in leaders:  # only groups our own processes lead: never the Ray worker's
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _spawn(kernel_name: str) -> _Runner:
    """Start a point worker: it warms a kernel, then waits on its pipe for a point."""
    folder = Path(tempfile.mkdtemp(prefix="point-", dir=_root()))
    ours, theirs = socket.socketpair()
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    with theirs:
        proc = subprocess.Popen([sys.executable, "-m", "ryzlab.sweep_ray_task", str(theirs.fileno()), str(folder),
                                 kernel_name], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
    return _Runner(proc=proc, conn=Connection(ours.detach()), folder=folder, kernel_name=kernel_name,
                   env_sig=_env_sig(), born=time.monotonic())


def _close(r: _Runner, *, kill: bool) -> None:
    if kill:
        kill_tree(r.proc.pid)
    else:
        try:
            r.conn.send(None)  # "no point for you": the worker shuts its kernel down and exits
        except OSError:
            kill_tree(r.proc.pid)
    _finish(r)


def _finish(r: _Runner) -> None:
    """After its point: the worker shuts its kernel down and exits; give it a while, then kill."""
    try:
        r.proc.wait(30)
    except subprocess.TimeoutExpired:
        kill_tree(r.proc.pid)
        r.proc.wait()
    r.conn.close()
    shutil.rmtree(r.folder, ignore_errors=True)


def _reap_idle() -> None:
    """Daemon thread of the Ray worker: close spares nobody used for :data:`SPARE_IDLE_S`."""
    while True:
        time.sleep(5)
        with _lock:
            old = [r for r in _spares if time.monotonic() - r.born > SPARE_IDLE_S]
            for r in old:
                _spares.remove(r)
        for r in old:
            _close(r, kill=False)


def _take(kernel_name: str) -> _Runner:
    """A warm spare that fits this task, else a fresh point worker."""
    sig = _env_sig()
    with _lock:
        spares, _spares[:] = list(_spares), []
    runner = None
    for r in spares:
        if runner is None and r.proc.poll() is None and r.kernel_name == kernel_name and r.env_sig == sig:
            runner = r
        else:
            if r.env_sig != sig:
                log.info("spare point worker discarded: its environment (%s) is not this task's (%s)", r.env_sig, sig)
            _close(r, kill=True)
    return runner or _spawn(kernel_name)


def _notebook(job: dict, data: bytes) -> Path:
    """The driver's notebook path when this node has the same file, else a private copy of its bytes."""
    import hashlib

    nb = Path(job["notebook"])
    try:
        if nb.is_file() and hashlib.sha256(nb.read_bytes()).hexdigest() == job["notebook_sha256"]:
            return nb
    except OSError:
        pass
    copy = _root() / "notebooks" / job["notebook_sha256"] / nb.name
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    return copy


def _read_files(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (symlinks skipped), keyed by its relative POSIX path."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            files[p.relative_to(folder).as_posix()] = p.read_bytes()
    return files


def run_point_task(job: dict, notebook: bytes) -> dict[str, Any]:
    """Body of the Ray task (the driver wraps it in ``ray.remote``): run one point, return its files.

    Returns ``{"entry", "files"}`` (files: relative path -> bytes), ``{"timeout": True}`` when the
    point outlived ``job["timeout"]`` (its process tree is killed first), or ``{"lost": reason}``
    when the point's process died before recording an outcome. ``node`` and ``worker_pid`` say
    where it ran.
    """
    global _reaper

    from .sweep import Point

    t0 = time.time()
    where = {"node": socket.gethostname(), "worker_pid": os.getpid()}
    try:
        import ray

        where["node"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker (tests call this directly): the host name will do
        pass
    _clean_dead_roots()
    if _reaper is None:
        _reaper = threading.Thread(target=_reap_idle, name="ryzlab-spare-reaper", daemon=True)
        _reaper.start()
    runner = _take(job["kernel_name"])
    spare = _spawn(job["kernel_name"])  # the next point's kernel warms while this one runs
    with _lock:
        _spares.append(spare)
    point = Point(notebook=_notebook(job, notebook), experiment=job["experiment"], params=job["params"],
                  run_id=job["run_id"])
    deadline = t0 + job["timeout"] if job.get("timeout") else None
    try:
        runner.conn.send((point, t0))
        # short waits: Ray delivers a cancel as KeyboardInterrupt between Python bytecodes
        while not runner.conn.poll(0.2):
            if runner.proc.poll() is not None and not runner.conn.poll(0):
                return {**where, "lost": f"the point's process exited with code {runner.proc.returncode} "
                                         "before recording an outcome"}
            if deadline is not None and time.time() > deadline:
                kill_tree(runner.proc.pid)
                return {**where, "timeout": True, "wall_s": round(time.time() - t0, 3)}
        entry = runner.conn.recv()
        # the entry is sent after the run folder was renamed into place: its files are complete
        return {**where, "entry": entry, "files": _read_files(runner.folder / point.run_id)}
    except EOFError:
        return {**where, "lost": "the point's process closed its pipe before recording an outcome"}
    except BaseException:
        kill_tree(runner.proc.pid)  # cancelled (KeyboardInterrupt) or broken: the point dies with the task
        raise
    finally:
        # the worker shuts its kernel down after sending the entry: wait for that off the critical path
        threading.Thread(target=_finish, args=(runner,), name="ryzlab-point-finish", daemon=True).start()


class _BackgroundEnv(Mapping):
    """This node's provenance (:func:`ryzlab.sweep._static_env`: imports torch, runs git), computed
    in a thread while the kernel warms up; reading it waits for that thread.

    The local executor computes it once in the sweep process; here every point worker computes
    its own, because what it reports (devices visible to this task) can differ per task.
    """

    def __init__(self) -> None:
        self._env: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        from .sweep import _static_env

        try:
            self._env.update(_static_env())
        except Exception as e:  # noqa: BLE001 - a run without provenance says why instead of failing the point
            self._env["provenance_error"] = f"{type(e).__name__}: {e}"

    def _ready(self) -> dict[str, Any]:
        self._thread.join()
        return self._env

    def __getitem__(self, key: str) -> Any:
        return self._ready()[key]

    def __iter__(self):
        return iter(self._ready())

    def __len__(self) -> int:
        return len(self._ready())


def _point_worker_main(argv: list[str]) -> None:
    """``python -m ryzlab.sweep_ray_task FD FOLDER KERNEL``: the local executor's point worker on a pipe."""
    import papermill  # noqa: F401 - imported now, while nothing waits; the local executor's forkserver preloads it

    from .sweep import _point_worker

    fd, folder, kernel_name = int(argv[0]), Path(argv[1]), argv[2]
    _point_worker(folder, _BackgroundEnv(), kernel_name, Connection(fd))


if __name__ == "__main__":
    _point_worker_main(sys.argv[1:])
