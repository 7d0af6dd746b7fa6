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
How a point's processes are started and killed: :mod:`ryzlab.workbench.point`; the executors that
run the points (local processes, Ray tasks): :mod:`ryzlab.workbench.executors`.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ryzlab.config import ConfigError
from ryzlab.workbench.executors.base import EXECUTORS, Executor, SweepSummary, resolve_threads, sweep_env  # noqa: F401 - API
from ryzlab.workbench.executors.local import run_local
from ryzlab.workbench.executors.ray import check_executor_args, plan_ray
from ryzlab.workbench.point import KERNEL_NAME, cores, run_point, store_point  # noqa: F401 - API
from ryzlab.workbench.spec import (MAX_POINTS, NOTEBOOK_DIR, PACKAGE_DIR, Point, Spec, SpecBlock,  # noqa: F401 - API
                                   count_points, expand, load_spec, run_id_for)

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
def manifest_status(sweep_dir: Path) -> dict[str, dict]:
    """The last manifest entry for every run_id (later lines win: a retry replaces a failure)."""
    return read_manifest(sweep_dir)[0]


def read_manifest(sweep_dir: Path) -> tuple[dict[str, dict], int]:
    """(:func:`manifest_status`, how many non-empty lines were unusable): a results folder is
    data, so a line that is not JSON, not an object or has no string ``run_id`` is counted and
    skipped, never raised on."""
    latest: dict[str, dict] = {}
    bad = 0
    path = sweep_dir / "manifest.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line (a writer killed mid-append) or junk
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("run_id"), str):
            latest[row["run_id"]] = row
        else:
            bad += 1
    return latest, bad


def is_done(sweep_dir: Path, run_id: str, latest: dict[str, dict]) -> bool:
    row = latest.get(run_id)
    return bool(row and row.get("status") == "ok" and (sweep_dir / run_id / "metrics.parquet").is_file())


def estimate_line(todo: list[Point], latest: dict[str, dict], *, jobs: int) -> str | None:
    """A time estimate for ``todo`` from the earlier ok points of the same notebook in this results
    folder (their manifest ``wall_s``); None when the folder holds no such point.

    Each point is taken to last the median wall time of its notebook's earlier ok points. Points
    of one notebook run ``min(jobs, block jobs)`` at a time and notebooks one after another (as
    :func:`run_sweep` runs them), so the estimate is the sum over notebooks of their points' time
    divided by that parallelism. An estimate, not a promise: a point's parameters (context, rate)
    change its time, and the medians do not know which ones."""
    import statistics

    past: dict[str, list[float]] = {}
    for row in latest.values():
        if row.get("status") == "ok" and isinstance(row.get("wall_s"), (int, float)):
            past.setdefault(str(row.get("experiment")), []).append(float(row["wall_s"]))
    if not past:
        return None
    total, parts, unknown = 0.0, [], {}
    by_exp: dict[str, list[Point]] = {}
    for p in todo:
        by_exp.setdefault(p.experiment, []).append(p)
    for exp, pts in by_exp.items():
        if exp not in past:
            unknown[exp] = len(pts)
            continue
        med = statistics.median(past[exp])
        at_once = max(1, min(jobs, *(p.jobs or jobs for p in pts)))
        total += med * len(pts) / at_once
        parts.append(f"{exp} {len(pts)} x {med:.1f} s / {at_once} at a time "
                     f"(median of {len(past[exp])} earlier ok point{'s' if len(past[exp]) != 1 else ''})")
    if not parts:
        return (f"no time estimate: no earlier ok point of {', '.join(sorted(unknown))} in this results folder")
    line = f"estimate from past runs: ~{_duration(total)} for {sum(len(v) for k, v in by_exp.items() if k in past)} " \
           f"point(s): " + "; ".join(parts)
    if unknown:
        line += "; not estimated (no earlier ok point): " + ", ".join(f"{k} x {n}" for k, n in sorted(unknown.items()))
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
              threads: int | None = None, max_points: int = MAX_POINTS, executor: Executor = "local",
              address: str | None = None, retries: int | None = None) -> SweepSummary:
    """Validate every point, then run the missing ones, ``jobs`` processes at a time, each with
    ``threads`` torch threads (default ``cores // jobs``); or, with ``executor="ray"``, as Ray
    tasks on the cluster at ``address`` (:mod:`ryzlab.workbench.executors.ray`)."""
    if jobs < 1:
        raise ConfigError([f"--jobs must be >= 1, got {jobs}"])
    if timeout is not None and timeout <= 0:
        raise ConfigError([f"--timeout must be > 0 seconds, got {timeout}"])
    # --- ray executor: its flags, then (after validation) the cluster, before anything is written
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
            return run_local(todo, summary, sweep_dir, jobs=jobs, timeout=timeout, kernel_name=kernel_name,
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
