"""Run one sweep point: a worker process (child of the sweep, its own session) and a fresh kernel.

Process tree of a running point, and who kills what::

    ryzlab sweep (S)
     └─ worker W     own session; PR_SET_PDEATHSIG(SIGTERM) and a thread reading W's stdin from S
        │            (EOF): when S dies, even by kill -9, W SIGKILLs the kernel's group, then its own
        │            child subreaper: orphans below it (a double-forked daemon) come back to it
        └─ kernel K  own process group (jupyter_client starts it with setsid); PR_SET_PDEATHSIG
           └─ ...    whatever the notebook starts (ranks, servers) stays in K's group, or, if it
                     leaves it (setsid), in W's tree and tagged RYZLAB_POINT_TAG in its environment
    --timeout: S SIGKILLs both groups, then every process with the point's tag. A finished point:
    W kills K's group and every descendant and tagged process (:mod:`.reaper`).

The worker is started before its point is known, so kernel start-up and imports overlap the
previous point; every point still gets its own process and its own fresh kernel.

:func:`run_point` runs ONE point anywhere (a Ray task, a script) and returns its run files;
:func:`store_point` writes such a result into a sweep folder. ``ryzlab sweep`` uses
:class:`PointProcess` directly so it can keep a warm spare.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ryzlab.io import append_jsonl, write_bytes, write_json
from ryzlab.workbench import reaper
from ryzlab.workbench.spec import NOTEBOOK_DIR, PACKAGE_DIR, Point

log = logging.getLogger(__name__)

KERNEL_NAME = "ryzlab"
# Modules every experiment notebook imports; a point's kernel imports them while it waits for
# its point (during the previous point's run), so that cost leaves the per-point critical path.
WARM_MODULES = ("torch", "pandas", "pyarrow.parquet", "matplotlib.pyplot", "ryzlab.experiments", "ryzlab.plots")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: ask the kernel to send ``sig`` to this process when its parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def killpg(pgid: int | None) -> None:
    if not pgid:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- in the worker
def _start_kernel(kernel_name: str, ipc_dir: str):
    """A fresh kernel over the ipc transport (unix sockets in a private folder, no TCP port),
    SIGKILLed by the OS if this worker dies."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    # the connection file beside the sockets: one folder to remove (it went to $TMPDIR and stayed there)
    km = AsyncKernelManager(kernel_name=kernel_name, transport="ipc", ip=os.path.join(ipc_dir, "k"),
                            connection_file=os.path.join(ipc_dir, "kernel.json"))
    run_sync(km.start_kernel)(preexec_fn=die_with_parent, cwd=str(NOTEBOOK_DIR))
    return km


def _run_silent(km: Any, code: str) -> None:
    """Execute ``code`` in the kernel without touching its history or outputs."""
    from jupyter_core.utils import run_sync

    kc = km.client()
    kc.start_channels()

    async def go() -> None:
        await kc.wait_for_ready(timeout=120)
        msg_id = kc.execute(code, silent=True, store_history=False)
        while (await kc.get_shell_msg(timeout=300))["parent_header"].get("msg_id") != msg_id:
            pass

    try:
        run_sync(go)()
    finally:
        kc.stop_channels()


def _warm_code(threads: int) -> str:
    return ("import importlib as _ryz_i\n"
            f"for _ryz_m in {WARM_MODULES!r}:\n    _ryz_i.import_module(_ryz_m)\n"
            f"_ryz_i.import_module('torch').set_num_threads({threads})\n"
            "del _ryz_i, _ryz_m")


def execute_point(point: Point, run_dir: Path, *, km: Any, kernel_name: str, env: dict,
                  assigned_at: float) -> dict[str, Any]:
    """Execute one point's notebook (papermill) into ``run_dir``; returns its manifest entry.

    ``wall_s`` counts from ``assigned_at`` (when the sweep handed the point out, wall clock), so
    a kernel still warming up when its point arrives is counted as overhead, not hidden. The
    notebook is saved after every cell, so a point killed by --timeout keeps its partial notebook.
    """
    import papermill as pm

    if point.notebook.parent != NOTEBOOK_DIR.resolve():  # the kernel started there, before its point was known
        _run_silent(km, f"import os as _ryz_os; _ryz_os.chdir({str(point.notebook.parent)!r}); del _ryz_os")
    started = datetime.now(timezone.utc).isoformat()
    write_json(run_dir / "params.json", {"experiment": point.experiment, "notebook": str(point.notebook),
                                         "run_id": point.run_id, "params": point.params})
    entry: dict[str, Any] = {"run_id": point.run_id, "experiment": point.experiment,
                             "params": point.params, "run_dir": point.run_id}
    try:
        pm.execute_notebook(str(point.notebook), str(run_dir / "run.ipynb"),
                            parameters={**point.notebook_params, "run_dir": str(run_dir)}, kernel_name=kernel_name,
                            progress_bar=False, cwd=str(point.notebook.parent),
                            request_save_on_cell_execute=True, km=km)
        if not (run_dir / "metrics.parquet").is_file():
            raise RuntimeError(f"{point.notebook.name} finished without writing metrics.parquet "
                               "(does it call run_experiment(..., run_dir)?)")
        if "repeat" in point.params:
            _label_repeat(run_dir / "metrics.parquet", point.params["repeat"])
        entry.update(status="ok")
    except pm.PapermillExecutionError as e:
        entry.update(status="failed", error=e.ename, message=str(e.evalue)[:2000], cell=e.exec_count,
                     cell_index=e.cell_index)
    except Exception as e:  # noqa: BLE001 - kernel died, missing output...: record, never lose the point
        entry.update(status="failed", error=type(e).__name__, message=str(e)[:2000], cell=None)
    wall = time.time() - assigned_at
    timing = {}
    if (run_dir / "timing.json").is_file():
        timing = json.loads((run_dir / "timing.json").read_text())
    entry.update(wall_s=round(wall, 3), compute_s=timing.get("compute_s"),
                 overhead_s=round(wall - timing["compute_s"], 3) if "compute_s" in timing else None,
                 start=started, end=datetime.now(timezone.utc).isoformat())
    write_json(run_dir / "env.json", {**env, "start": started, "end": entry["end"], "run_id": point.run_id})
    return entry


def _label_repeat(path: Path, repeat: int) -> None:
    """Rows of a repeated point say which repeat they are (the notebook does not know)."""
    import pandas as pd

    from ryzlab.io import write_parquet

    df = pd.read_parquet(path)
    if "repeat" not in df.columns:
        df.insert(min(2, len(df.columns)), "repeat", repeat)
        write_parquet(path, df)


def _worker_main(parent_pid: int, result_fd: int, kernel_name: str, threads: int) -> None:
    """``python -m ryzlab.workbench.point``: the worker. Messages to the sweep are JSON lines on ``result_fd``."""
    os.setsid()  # W's own session and group; S kills it (and K's group) on timeout
    reaper.become_subreaper()  # orphans of the notebook's processes come back to W, not init
    kernel_pgid: list[int] = []
    tag = os.environ.get(reaper.TAG_VAR)
    ipc_dir: list[str] = []

    def kill_point() -> None:
        for pgid in kernel_pgid:
            killpg(pgid)
        reaper.kill_all(os.getpid(), tag)  # what left the kernel's group (setsid, double fork)

    def die(*_: Any) -> None:
        """The sweep is gone: the kernel's group (the notebook's subprocesses in it), whatever
        else the point started, the kernel's folder, then ours."""
        kill_point()
        for d in ipc_dir:
            shutil.rmtree(d, ignore_errors=True)
        os.killpg(0, signal.SIGKILL)

    def watch_sweep() -> None:
        """S holds the only write end of our stdin: EOF means S is gone (a second way to notice)."""
        while sys.stdin.buffer.read(1 << 16):
            pass
        die()

    # SIGTERM, not SIGKILL: W must live long enough to kill the kernel's group first
    signal.signal(signal.SIGTERM, die)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the sweep died before the death signal was armed
        return
    out = os.fdopen(result_fd, "w", buffering=1)
    for var in THREAD_VARS:  # the kernel and whatever it starts inherit these
        os.environ[var] = str(threads)

    ipc_dir.append(reaper.kernel_dir())
    km, start_error = None, None
    try:
        try:
            km = _start_kernel(kernel_name, ipc_dir[0])
            kernel_pgid.append(km.provisioner.pgid or km.provisioner.pid)
            out.write(json.dumps({"kernel_pgid": kernel_pgid[0]}) + "\n")
        except Exception as e:  # noqa: BLE001 - recorded as the point's failure below
            log.exception("kernel %r failed to start", kernel_name)
            start_error = e
        if km is not None:
            try:
                _run_silent(km, _warm_code(threads))
            except Exception:  # noqa: BLE001 - a slow or failed warm-up is not fatal: the notebook imports again
                log.exception("kernel warm-up failed; the point runs anyway")
        line = sys.stdin.readline()
        if not line:  # no point for us (the sweep ended or died)
            return
        threading.Thread(target=watch_sweep, name="ryzlab-watch-sweep", daemon=True).start()
        msg = json.loads(line)
        point = Point.from_json(msg["point"])
        if start_error is not None:
            entry = {"run_id": point.run_id, "experiment": point.experiment, "params": point.params,
                     "run_dir": point.run_id, "status": "failed", "error": "KernelStartFailed",
                     "message": f"kernel {kernel_name!r} did not start: {start_error}"[:2000], "cell": None,
                     "wall_s": round(time.time() - msg["assigned_at"], 3)}
        else:
            entry = execute_point(point, Path(msg["run_dir"]), km=km, kernel_name=kernel_name, env=msg["env"],
                                  assigned_at=msg["assigned_at"])
        out.write(json.dumps({"entry": entry}, default=str) + "\n")
    finally:
        if km is not None:
            from jupyter_core.utils import run_sync

            try:
                run_sync(km.shutdown_kernel)(now=True)
            except Exception:  # noqa: BLE001 - its group is killed next anyway
                pass
        kill_point()  # anything the notebook started and left running
        shutil.rmtree(ipc_dir[0], ignore_errors=True)


# ----------------------------------------------------------------------------- in the sweep
class PointProcess:
    """One worker: started at once (its kernel warms up), given one point, then gone."""

    cleaned = False
    """Whether this process removed the kernel folders earlier sweeps left behind (once is enough)."""

    def __init__(self, work_dir: Path, *, kernel_name: str = KERNEL_NAME, threads: int = 1):
        if not PointProcess.cleaned:
            PointProcess.cleaned = True
            reaper.clean_stale_temp()
        self.work_dir = Path(work_dir)
        self.log_path = self.work_dir / f".tmp-worker-{uuid.uuid4().hex[:12]}.log"
        r, w = os.pipe()
        self.tag = uuid.uuid4().hex  # in the environment of every process of this point
        env = {**os.environ, reaper.TAG_VAR: self.tag}
        if env.get("PYTHONPATH"):  # relative entries meant the sweep's folder; the worker and kernel run elsewhere
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p
                                                for p in env["PYTHONPATH"].split(os.pathsep))
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ryzlab.workbench.point", str(os.getpid()), str(w), kernel_name, str(threads)],
                stdin=subprocess.PIPE, stdout=logf, stderr=logf, pass_fds=(w,), close_fds=True,
                # imports the same ryzlab as the sweep, never a package in the user's folder
                cwd=str(PACKAGE_DIR.parent), env=env)
        os.close(w)
        os.set_blocking(r, False)
        self._results = os.fdopen(r, "rb", buffering=0)
        self._buf = b""
        self.kernel_pgid: int | None = None
        self.entry: dict | None = None
        self.point: Point | None = None
        self.run_dir: Path | None = None
        self.assigned_at = 0.0

    def fileno(self) -> int:
        """Readable when the worker reports something or exits (for ``multiprocessing.connection.wait``)."""
        return self._results.fileno()

    def assign(self, point: Point, env: dict) -> None:
        self.point, self.assigned_at = point, time.time()
        self.run_dir = self.work_dir / f".tmp-{point.run_id}-{self.proc.pid}"
        self.run_dir.mkdir(parents=True)
        try:
            os.link(self.log_path, self.run_dir / "kernel.log")
        except OSError:  # a file system without hard links: the log stays beside the run
            pass
        msg = {"point": point.to_json(), "run_dir": str(self.run_dir), "env": env, "assigned_at": self.assigned_at}
        try:
            self.proc.stdin.write((json.dumps(msg, default=str) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # the worker died while warming up: poll() sees it exit, the point is failed
            log.warning("sweep worker %d exited before its point %s arrived", self.proc.pid, point.run_id)

    def poll(self) -> bool:
        """Read what the worker reported; True once its entry is in or it has exited."""
        while self.entry is None:
            chunk = self._results.read(1 << 16)
            if not chunk:  # None: nothing yet; b"": the worker closed its end
                break
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                self.kernel_pgid = msg.get("kernel_pgid", self.kernel_pgid)
                self.entry = msg.get("entry", self.entry)
        if self.entry is not None:
            try:
                self.proc.wait(timeout=60)  # it only shuts its kernel down
            except subprocess.TimeoutExpired:
                self.kill()
            return True
        return self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL the worker's group and the kernel's group (the notebook's subprocesses with it)."""
        killpg(self.proc.pid)
        killpg(self.kernel_pgid)
        self.proc.wait()
        reaper.kill_all(tag=self.tag)  # what had left both groups (W, its subreaper, is gone now)
        for d in Path(tempfile.gettempdir()).glob(f"{reaper.KERNEL_DIR_PREFIX}{self.proc.pid}-*"):
            shutil.rmtree(d, ignore_errors=True)  # W could not remove its kernel's folder

    def close(self) -> None:
        """After the worker exited (or was killed): release pipes and its log."""
        for f in (self._results, self.proc.stdin):
            try:
                f.close()
            except OSError:
                pass
        self.log_path.unlink(missing_ok=True)

    def lost_entry(self, status: str, timeout: float | None) -> dict[str, Any]:
        """The manifest entry of a point whose worker never reported (timeout, crash)."""
        p = self.point
        return {"run_id": p.run_id, "experiment": p.experiment, "params": p.params, "run_dir": p.run_id,
                "status": status, "error": "Timeout" if status == "timeout" else "WorkerDied",
                "message": (f"point exceeded --timeout {timeout} s" if status == "timeout"
                            else f"sweep worker exited with code {self.proc.returncode}"),
                "cell": None, "wall_s": round(time.time() - self.assigned_at, 3)}


def place(tmp: Path, final: Path) -> None:
    """Move a finished temp run directory into place, replacing an earlier attempt."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def record(sweep_dir: Path, tmp: Path, entry: dict) -> None:
    """Put a point's run folder in place, then append its manifest line (ok means files are there).

    A timed-out or crashed point keeps what it wrote (partial run.ipynb, kernel.log) minus any
    metrics.parquet, so it never looks done."""
    if entry["status"] != "ok":
        (tmp / "metrics.parquet").unlink(missing_ok=True)
    if tmp.is_dir():
        place(tmp, sweep_dir / entry["run_id"])
    append_jsonl(sweep_dir / "manifest.jsonl", entry)


@dataclass
class PointResult:
    entry: dict[str, Any]
    """The point's manifest line: run_id, params, status (ok / failed / timeout), error, timing."""
    files: dict[str, bytes]
    """The run folder's files by name: params.json, run.ipynb, metrics.parquet (ok only), env.json, ..."""


def run_point(point: Point, *, env: dict, kernel_name: str = KERNEL_NAME, threads: int = 1,
              timeout: float | None = None) -> PointResult:
    """Run ONE point in a fresh worker + kernel (own process groups) and return its run files.

    Callable anywhere the notebook and kernel exist (e.g. inside a Ray task); nothing is left on
    disk or running afterwards. ``env`` is the provenance written to env.json (see
    :func:`ryzlab.workbench.sweep.sweep_env`). Call it from a thread that lives until it returns: the
    worker's death signal (PR_SET_PDEATHSIG) fires when the thread that started it exits.
    """
    from multiprocessing.connection import wait

    with tempfile.TemporaryDirectory(prefix="ryzlab-point-") as work:
        pp = PointProcess(Path(work), kernel_name=kernel_name, threads=threads)
        timed_out = False
        try:
            pp.assign(point, env)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not pp.poll():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    timed_out = True
                    pp.kill()
                    break
                wait([pp], timeout=left)
        finally:
            if pp.proc.poll() is None:
                pp.kill()
            pp.close()
        entry = pp.entry or pp.lost_entry("timeout" if timed_out else "failed", timeout)
        if entry["status"] != "ok":
            (pp.run_dir / "metrics.parquet").unlink(missing_ok=True)
        files = {f.name: f.read_bytes() for f in sorted(pp.run_dir.iterdir()) if f.is_file()}
        return PointResult(entry=entry, files=files)


def store_point(sweep_dir: str | os.PathLike, result: PointResult) -> None:
    """Write a :func:`run_point` result into ``sweep_dir`` (run folder + manifest line), atomically."""
    sweep_dir = Path(sweep_dir)
    for name in result.files:  # all checked before anything is written
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"run file name {name!r} is not a plain file name")
    tmp = sweep_dir / f".tmp-{result.entry['run_id']}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    for name, data in result.files.items():
        write_bytes(tmp / name, data)
    record(sweep_dir, tmp, result.entry)


if __name__ == "__main__":
    try:
        _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter finalization: the stdin watcher thread may sit in a blocking read
        os._exit(0)
