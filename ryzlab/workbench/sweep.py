"""Grid runs of parameterized notebooks: expand a spec, validate every point, run each point in
its own process and kernel (papermill), record every outcome, resume what is missing.

Reads as a pipeline::

    spec = load_spec("specs/demo.yaml")          # YAML -> Spec (unknown keys are errors)
    points = expand(spec)                         # grid x zip x fixed x repeat -> [Point]
    validate(points)                              # notebook params + typed configs, all at once
    summary = run_sweep(spec, jobs=2)             # results/<sweep>/<run_id>/..., manifest.jsonl

A point is *done* when the manifest's last line for its ``run_id`` says ``ok`` and its run
directory holds ``metrics.parquet``. Each point is executed in a temporary directory which is
renamed into place when it is finished, so a killed sweep never leaves a half-written run that
counts as done; re-running the same spec runs only what is missing. One sweep at a time per
results folder (a lock); points run with ``cores // jobs`` torch threads unless told otherwise,
and points of different experiments never run side by side.
How a point's processes are started and killed: :mod:`ryzlab.workbench.point`.
"""
from __future__ import annotations

import fcntl
import logging
import multiprocessing.connection
import os
import shutil
import socket
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ryzlab.config import ConfigError
from ryzlab.io import read_jsonl
from ryzlab.workbench.point import KERNEL_NAME, PointProcess, cores, record, run_point, store_point  # noqa: F401 - API
from ryzlab.workbench.spec import (MAX_POINTS, NOTEBOOK_DIR, PACKAGE_DIR, Block, Point, Spec, count_points, expand, load_spec,  # noqa: F401
                   run_id_for)

log = logging.getLogger(__name__)
REPO_ROOT = PACKAGE_DIR.parent
"""The checkout holding ryzlab/ in a development install (notebooks run from there resolve a
relative ``results/`` against it); site-packages' ryzlab/ in a wheel install."""


# ----------------------------------------------------------------------------- validation
def validate(points: list[Point], *, kernel_name: str = KERNEL_NAME) -> None:
    """Check every point against its notebook's parameters and ryzlab's typed config.

    Collects every problem of every point into one :class:`ConfigError`; nothing has run and
    nothing has been written when it raises.
    """
    import papermill as pm

    from ryzlab.experiments import EXPERIMENTS, RESERVED, make_config

    problems: list[str] = []
    nb_params: dict[Path, dict] = {}
    for nb in sorted({p.notebook for p in points}):
        try:
            params = pm.inspect_notebook(str(nb))
        except Exception as e:  # noqa: BLE001 - not JSON, not nbformat...: one clear line per notebook
            problems.append(f"{nb.name}: not a readable Jupyter notebook ({type(e).__name__}: {str(e)[:200]})")
            nb_params[nb] = {}
            continue
        if not params:
            problems.append(f"{nb.name}: has no code cell tagged 'parameters' (papermill needs one)")
        elif "run_dir" not in params:
            problems.append(f"{nb.name}: its parameters cell must define run_dir = None "
                            "(where the sweep tells it to save metrics.parquet)")
        nb_params[nb] = params
    for p in points:
        valid = [k for k in nb_params[p.notebook] if k not in RESERVED]
        for k in p.notebook_params:
            if k in RESERVED:
                problems.append(f"{p.label}: {k!r} is set by the sweep itself and cannot be swept")
            elif nb_params[p.notebook] and k not in nb_params[p.notebook]:
                problems.append(f"{p.label}: unknown parameter {k!r} for {p.notebook.name}; "
                                f"valid parameters: {', '.join(valid)}")
        if p.experiment in EXPERIMENTS:
            try:
                make_config(p.experiment, {k: v for k, v in p.notebook_params.items() if k not in RESERVED})
            except ConfigError as e:
                problems.extend(f"{p.label}: {msg}" for msg in e.problems
                                if not msg.startswith("unknown parameter"))
        else:
            log.info("%s is not a registered experiment; its parameters are checked against the "
                     "notebook only", p.notebook.name)
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        problems.append(f"Jupyter kernel {kernel_name!r} is not installed; run `make env` "
                        f"(it registers it) or pass --kernel NAME")
    if problems:
        # de-duplicate while keeping order: one message per problem
        raise ConfigError(list(dict.fromkeys(problems)), "sweep")


# ----------------------------------------------------------------------------- execution
@dataclass
class SweepSummary:
    name: str
    out_dir: Path
    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    timeout: int = 0
    wall_s: float = 0.0
    overheads_s: list[float] = field(default_factory=list)
    jobs: int = 1
    threads: int = 1
    executor: str = "local"

    def add(self, entry: dict, label: str, bar: Any = None, left: int = 0) -> None:
        """Count one recorded point (and tick the progress bar, if any)."""
        self.ok += entry["status"] == "ok"
        self.failed += entry["status"] == "failed"
        self.timeout += entry["status"] == "timeout"
        if entry["status"] == "ok" and entry.get("overhead_s") is not None:
            self.overheads_s.append(entry["overhead_s"])
        if entry["status"] != "ok":
            log.warning("%s %s: %s: %s", label, entry["status"], entry.get("error"), str(entry.get("message", ""))[:300])
        if bar is not None:
            bar.set_postfix(ok=self.ok, failed=self.failed + self.timeout, left=left)
            bar.update(1)

    def lines(self) -> list[str]:
        out = [f"sweep {self.name}: {self.total} points, {self.skipped} already done, {self.ok} ok, "
               f"{self.failed} failed, {self.timeout} timed out in {self.wall_s:.1f} s -> {self.out_dir}",
               f"{self.jobs} point(s) at a time, {self.threads} torch thread(s) each on {cores()} core(s)"
               if self.executor == "local" else
               "one Ray task per point (threads per point: --threads, else its task's num_cpus)"]
        if self.overheads_s:
            o = sorted(self.overheads_s)
            out.append(f"per-point overhead (kernel start, parameter injection, imports, saving): "
                       f"mean {sum(o) / len(o):.2f} s, max {o[-1]:.2f} s over {len(o)} points")
        return out


def manifest_status(sweep_dir: Path) -> dict[str, dict]:
    """The last manifest entry for every run_id (later lines win: a retry replaces a failure)."""
    latest: dict[str, dict] = {}
    for row in read_jsonl(sweep_dir / "manifest.jsonl"):
        if "run_id" in row:
            latest[row["run_id"]] = row
    return latest


def is_done(sweep_dir: Path, run_id: str, latest: dict[str, dict]) -> bool:
    row = latest.get(run_id)
    return bool(row and row.get("status") == "ok" and (sweep_dir / run_id / "metrics.parquet").is_file())


class SweepLocked(ConfigError):
    """Another live sweep holds this results folder."""


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``sweep_dir/.lock`` (flock) for the whole sweep: a second sweep on the same folder is
    refused. The OS drops the lock when its holder dies (kill -9 included), so a lock left by a
    killed sweep is stale by construction; it is reported and taken over."""
    path = sweep_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise SweepLocked([f"{sweep_dir} is in use by another sweep ({holder}); wait for it to finish "
                               "or write to another folder with --out"]) from None
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale:
            log.warning("%s: taking over a stale lock (%s): that sweep ended without releasing it "
                        "(killed?); its unfinished points run again", sweep_dir, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)


def sweep_env(*, jobs: int, threads: int) -> dict:
    """Provenance shared by every point of this sweep (each run adds its start/end)."""
    from ryzlab.provenance import collect_env

    env = collect_env()
    env.pop("time_utc", None)
    env.update(jobs=jobs, threads=threads, cores=cores())
    return env


def resolve_threads(jobs: int, threads: int | None) -> int:
    """torch threads per point: ``cores // jobs`` by default; a warning when points oversubscribe."""
    n = cores()
    if threads is None:
        return max(1, n // jobs)
    if threads < 1:
        raise ConfigError([f"--threads must be >= 1, got {threads}"])
    if jobs * threads > n:
        log.warning("--jobs %d x --threads %d = %d threads on %d cores: points slow each other down and "
                    "their timings are not comparable with points run alone", jobs, threads, jobs * threads, n)
    return threads


def plan(spec: Spec | str | os.PathLike, *, max_points: int = MAX_POINTS,
         kernel_name: str = KERNEL_NAME) -> tuple[Spec, list[Point]]:
    """Load, expand and validate: every point, or a :class:`ConfigError` listing every problem."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    points = expand(spec, max_points=max_points)
    validate(points, kernel_name=kernel_name)
    return spec, points


def default_out(spec: Spec) -> Path:
    return Path.cwd() / "results" / spec.name


def run_sweep(spec: Spec | str | os.PathLike, *, jobs: int = 1, out: str | os.PathLike | None = None,
              timeout: float | None = None, kernel_name: str = KERNEL_NAME, progress: bool = True,
              threads: int | None = None, max_points: int = MAX_POINTS, executor: str = "local",
              address: str | None = None, retries: int | None = None) -> SweepSummary:
    """Validate every point, then run the missing ones, ``jobs`` processes at a time, each with
    ``threads`` torch threads (default ``cores // jobs``); or, with ``executor="ray"``, as Ray
    tasks on the cluster at ``address`` (:mod:`ryzlab.workbench.sweep_ray`)."""
    if jobs < 1:
        raise ConfigError([f"--jobs must be >= 1, got {jobs}"])
    if timeout is not None and timeout <= 0:
        raise ConfigError([f"--timeout must be > 0 seconds, got {timeout}"])
    # --- ray executor: its flags, then (after validation) the cluster, before anything is written
    from ryzlab.workbench.sweep_ray import check_executor_args, plan_ray

    check_executor_args(executor, address=address, retries=retries, jobs=jobs, threads=threads)
    spec, points = plan(spec, max_points=max_points, kernel_name=kernel_name)
    ray_plan = plan_ray(points, address=address, retries=retries, threads=threads) if executor == "ray" else None
    threads = resolve_threads(jobs, threads) if ray_plan is None else threads
    sweep_dir = (Path(out) if out else default_out(spec)).resolve()
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with sweep_lock(sweep_dir):
            todo, summary = _resume(spec, points, sweep_dir, jobs=jobs, threads=threads)
            if ray_plan is not None:
                summary.executor = "ray"
                return ray_plan.run(todo, sweep_dir, summary, timeout=timeout, kernel_name=kernel_name,
                                    progress=progress)
            return _run_locked(todo, summary, sweep_dir, jobs=jobs, timeout=timeout, kernel_name=kernel_name,
                               progress=progress, threads=threads)
    finally:
        if ray_plan is not None:
            ray_plan.close()


def _resume(spec: Spec, points: list[Point], sweep_dir: Path, *, jobs: int,
            threads: int | None) -> tuple[deque[Point], SweepSummary]:
    """Under the lock: clear a killed sweep's leftovers, keep the spec, list the points not done."""
    for stale in sweep_dir.glob(".tmp-*"):  # leftovers of a killed sweep: never counted as done
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    latest = manifest_status(sweep_dir)
    todo = deque(p for p in points if not is_done(sweep_dir, p.run_id, latest))
    summary = SweepSummary(name=spec.name, out_dir=sweep_dir, total=len(points),
                           skipped=len(points) - len(todo), jobs=jobs, threads=threads or 0)
    if spec.path:
        shutil.copyfile(spec.path, sweep_dir / ".spec.yaml.tmp")
        os.replace(sweep_dir / ".spec.yaml.tmp", sweep_dir / "spec.yaml")
    return todo, summary


def _run_locked(todo: deque[Point], summary: SweepSummary, sweep_dir: Path, *, jobs: int, timeout: float | None,
                kernel_name: str, progress: bool, threads: int) -> SweepSummary:
    env = sweep_env(jobs=jobs, threads=threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=summary.name, unit="pt", dynamic_ncols=True)

    running: list[PointProcess] = []
    spares: deque[PointProcess] = deque()  # warming workers without a point

    def finish(pp: PointProcess, status: str | None) -> None:
        """Record a finished (status None) or killed (status given) point."""
        entry = pp.entry if status is None and pp.entry is not None else pp.lost_entry(status or "failed", timeout)
        record(sweep_dir, pp.run_dir, entry)
        pp.close()
        summary.add(entry, pp.point.label, bar, left=len(todo) + len(running))

    def cap() -> int:
        """Points at once: the running block's (the next block waits for it), else the next point's."""
        p = running[0].point if running else (todo[0] if todo else None)
        return min(jobs, p.jobs or jobs) if p is not None else jobs

    t_start = time.perf_counter()
    try:
        while todo or running:
            # cap() points run (--jobs, or fewer if their block says so); one more worker warms its
            # kernel for the next point. Never more: a warming kernel takes a core from a timing.
            while len(spares) + len(running) < cap() + 1 and len(spares) < len(todo):
                spares.append(PointProcess(sweep_dir, kernel_name=kernel_name, threads=threads))
            # one experiment at a time: a timing is never taken beside another experiment's points
            # (a serving point alone runs several processes); the cost is an idle slot at each switch
            while todo and spares and len(running) < cap() and \
                    all(r.point.experiment == todo[0].experiment for r in running):
                pp = spares.popleft()
                point = todo.popleft()
                pp.assign(point, {**env, "jobs": min(jobs, point.jobs or jobs)})  # as this point ran
                running.append(pp)
            multiprocessing.connection.wait(running, timeout=0.5)
            for pp in list(running):
                if pp.poll():
                    running.remove(pp)
                    finish(pp, None)
                elif timeout is not None and time.time() - pp.assigned_at > timeout:
                    running.remove(pp)
                    pp.kill()
                    finish(pp, "timeout")
    except BaseException:
        for pp in list(spares) + running:
            pp.kill()
            pp.close()
            if pp.run_dir is not None:
                shutil.rmtree(pp.run_dir, ignore_errors=True)
        raise
    finally:
        for pp in spares:  # normally none are left: spares never outnumber the points to do
            pp.kill()
            pp.close()
        if bar is not None:
            bar.close()
    summary.wall_s = time.perf_counter() - t_start
    return summary
