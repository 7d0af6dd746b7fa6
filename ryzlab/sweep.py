"""Grid runs of parameterized notebooks: expand a spec, validate every point, run each point in
its own process and kernel (papermill), record every outcome, resume what is missing.

Reads as a pipeline::

    spec = load_spec("specs/demo.yaml")          # YAML -> Spec (unknown keys are errors)
    points = expand(spec)                         # grid x zip x fixed -> [Point]
    validate(points)                              # notebook params + typed configs, all at once
    summary = run_sweep(spec, jobs=2)             # results/<sweep>/<run_id>/..., manifest.jsonl

A point is *done* when the manifest's last line for its ``run_id`` says ``ok`` and its run
directory holds ``metrics.parquet``. Each point is executed in a temporary directory which is
renamed into place when it is finished (ok or failed), so a killed sweep never leaves a
half-written run that counts as done; re-running the same spec runs only what is missing.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError
from .io import append_jsonl, read_jsonl, write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "ryzlab"
SPEC_KEYS = ("name", "notebook", "grid", "zip", "fixed", "description", "resources")
BLOCK_KEYS = ("notebook", "grid", "zip", "fixed", "description", "resources")


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True, kw_only=True)
class Block:
    """One notebook with its grid: the cartesian product of ``grid``, times ``zip`` (axes that
    vary together), each point completed by ``fixed``."""

    notebook: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    """Ray resources of each point (``--executor ray``), overriding the defaults; see sweep_ray."""


@dataclass(frozen=True, kw_only=True)
class Spec:
    name: str
    blocks: tuple[Block, ...]
    path: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Point:
    notebook: Path
    experiment: str
    params: dict[str, Any]
    run_id: str
    resources: dict[str, Any] = field(default_factory=dict)  # the block's `resources:`; not in run_id

    @property
    def label(self) -> str:
        return f"{self.experiment}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def _resolve_notebook(name: str, base: Path) -> Path:
    p = Path(name)
    candidates = [p, base / p, NOTEBOOK_DIR / p]
    if p.suffix != ".ipynb":
        candidates += [c.with_suffix(".ipynb") for c in candidates]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    have = sorted(q.stem for q in NOTEBOOK_DIR.glob("*.ipynb"))
    raise ConfigError([f"notebook {name!r} not found; notebooks in {NOTEBOOK_DIR}: {', '.join(have)}"])


def _block(raw: Any, base: Path, where: str) -> Block:
    problems = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: expected a mapping with keys {', '.join(BLOCK_KEYS)}"])
    for k in raw:
        if k not in BLOCK_KEYS:
            problems.append(f"{where}: unknown key {k!r}; valid keys: {', '.join(BLOCK_KEYS)}")
    if "notebook" not in raw:
        problems.append(f"{where}: 'notebook' is required")
    grid, zp, fixed = raw.get("grid") or {}, raw.get("zip") or {}, raw.get("fixed") or {}
    for key, section in (("grid", grid), ("zip", zp), ("fixed", fixed)):
        if not isinstance(section, dict):
            problems.append(f"{where}: {key!r} must be a mapping of parameter -> value(s)")
    if problems:
        raise ConfigError(problems)
    for key, values in list(grid.items()) + list(zp.items()):
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: {key!r} must be a non-empty list of values, got {values!r}")
    if len({len(v) for v in zp.values() if isinstance(v, list)}) > 1:
        problems.append(f"{where}: zip axes must have equal lengths, got "
                        + ", ".join(f"{k}={len(v)}" for k, v in zp.items()))
    from .sweep_ray import check_resources  # --- ray executor: `resources:` per block (no ray import)

    problems.extend(check_resources(raw.get("resources"), where))
    names = list(grid) + list(zp) + list(fixed)
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: parameter {dup!r} appears in more than one of grid/zip/fixed")
    if problems:
        raise ConfigError(problems)
    return Block(notebook=_resolve_notebook(str(raw["notebook"]), base), grid=dict(grid), zip=dict(zp),
                 fixed=dict(fixed), resources=dict(raw.get("resources") or {}))


def load_spec(path: str | os.PathLike) -> Spec:
    """Parse a sweep spec; structural problems raise :class:`ConfigError` before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"spec file {str(path)!r} does not exist"])
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: a spec is a mapping; see specs/demo.yaml"])
    valid = SPEC_KEYS + ("experiments",)
    unknown = [f"unknown key {k!r}; valid keys: {', '.join(valid)}" for k in raw if k not in valid]
    if unknown:
        raise ConfigError(unknown, str(path))
    name = str(raw.get("name") or path.stem)
    if not name.replace("-", "_").replace(".", "_").isidentifier():
        raise ConfigError([f"name {name!r} must be a plain folder name (letters, digits, -, _)"], str(path))
    if "experiments" in raw:
        if "notebook" in raw:
            raise ConfigError(["use either 'notebook' (one block) or 'experiments' (a list), not both"], str(path))
        items = raw["experiments"]
        if not isinstance(items, list) or not items:
            raise ConfigError(["'experiments' must be a non-empty list of {notebook, grid, zip, fixed}"], str(path))
        blocks = tuple(_block(b, path.parent, f"experiments[{i}]") for i, b in enumerate(items))
    else:
        blocks = (_block({k: v for k, v in raw.items() if k in BLOCK_KEYS}, path.parent, "spec"),)
    return Spec(name=name, blocks=blocks, path=path.resolve())


def run_id_for(notebook: Path, params: dict[str, Any]) -> str:
    """Stable id of (notebook content, params): same inputs -> same folder -> resumable."""
    h = hashlib.sha256(notebook.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return f"{notebook.stem}-{h.hexdigest()[:12]}"


def _experiment_name(notebook: Path) -> str:
    return notebook.stem


def expand(spec: Spec) -> list[Point]:
    points: list[Point] = []
    for b in spec.blocks:
        gkeys = list(b.grid)
        zkeys = list(b.zip)
        zrows = list(zip(*(b.zip[k] for k in zkeys))) if zkeys else [()]
        for gvals in itertools.product(*(b.grid[k] for k in gkeys)):
            for zvals in zrows:
                params = {**b.fixed, **dict(zip(gkeys, gvals)), **dict(zip(zkeys, zvals))}
                points.append(Point(notebook=b.notebook, experiment=_experiment_name(b.notebook),
                                    params=params, run_id=run_id_for(b.notebook, params),
                                    resources=b.resources))
    seen: dict[str, Point] = {}
    for p in points:
        if p.run_id in seen:
            raise ConfigError([f"two points are identical: {p.label}"])
        seen[p.run_id] = p
    return points


# ----------------------------------------------------------------------------- validation
def validate(points: list[Point], *, kernel_name: str = KERNEL_NAME) -> None:
    """Check every point against its notebook's parameters and ryzlab's typed config.

    Collects every problem of every point into one :class:`ConfigError`; nothing has run and
    nothing has been written when it raises.
    """
    import papermill as pm

    from .experiments import EXPERIMENTS, RESERVED, make_config

    problems: list[str] = []
    nb_params: dict[Path, dict] = {}
    for nb in sorted({p.notebook for p in points}):
        params = pm.inspect_notebook(str(nb))
        if not params:
            problems.append(f"{nb.name}: has no code cell tagged 'parameters' (papermill needs one)")
        elif "run_dir" not in params:
            problems.append(f"{nb.name}: its parameters cell must define run_dir = None "
                            "(where the sweep tells it to save metrics.parquet)")
        nb_params[nb] = params
    for p in points:
        valid = [k for k in nb_params[p.notebook] if k not in RESERVED]
        for k in p.params:
            if k in RESERVED:
                problems.append(f"{p.label}: {k!r} is set by the sweep itself and cannot be swept")
            elif nb_params[p.notebook] and k not in nb_params[p.notebook]:
                problems.append(f"{p.label}: unknown parameter {k!r} for {p.notebook.name}; "
                                f"valid parameters: {', '.join(valid)}")
        if p.experiment in EXPERIMENTS:
            try:
                make_config(p.experiment, {k: v for k, v in p.params.items() if k not in RESERVED})
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

    def lines(self) -> list[str]:
        out = [f"sweep {self.name}: {self.total} points, {self.skipped} already done, {self.ok} ok, "
               f"{self.failed} failed, {self.timeout} timed out in {self.wall_s:.1f} s -> {self.out_dir}"]
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


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when the sweep process dies (kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _place(tmp: Path, final: Path) -> None:
    """Move a finished temp run directory into place, replacing an earlier failed attempt."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


# Modules every experiment notebook imports; a point's kernel imports them while it waits for
# its point (during the previous point's run), so that cost leaves the per-point critical path.
WARM_MODULES = ("torch", "pandas", "pyarrow.parquet", "matplotlib.pyplot", "ryzlab.experiments", "ryzlab.plots")


def _start_warm_kernel(kernel_name: str):
    """Start a fresh kernel and import :data:`WARM_MODULES` in it without touching its namespace."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    km = AsyncKernelManager(kernel_name=kernel_name)
    run_sync(km.start_kernel)()
    kc = km.client()
    kc.start_channels()
    code = ("import importlib as _ryz_i\n"
            f"for _ryz_m in {WARM_MODULES!r}:\n    _ryz_i.import_module(_ryz_m)\n"
            "del _ryz_i, _ryz_m")

    async def warm() -> None:
        await kc.wait_for_ready(timeout=120)
        msg_id = kc.execute(code, silent=True, store_history=False)
        while (await kc.get_shell_msg(timeout=300))["parent_header"].get("msg_id") != msg_id:
            pass

    try:
        run_sync(warm)()
    finally:
        kc.stop_channels()
    return km


def _point_worker(sweep_dir: Path, env: dict, kernel_name: str,
                  conn: multiprocessing.connection.Connection) -> None:
    """Child process: start and warm a kernel, wait for a point, run it, record the outcome.

    Started before its point is known, so kernel start-up and imports overlap the previous
    point's run. Every point still gets its own process and its own fresh kernel.
    """
    os.setsid()  # own process group: a timeout kills this process and its kernel together
    _die_with_parent()
    # the kernel's own chatter goes to the run's log, not over the progress bar
    log_path = sweep_dir / f".tmp-worker-{os.getpid()}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    km = None
    try:
        try:
            km = _start_warm_kernel(kernel_name)
        except Exception:  # noqa: BLE001 - papermill will start a kernel itself and report its failure
            logging.getLogger(__name__).exception("warm kernel failed to start; the point starts its own")
        msg = conn.recv()
        if msg is not None:
            point, assigned_at = msg
            _run_point(point, assigned_at, sweep_dir, env, kernel_name, conn, km, log_path)
    finally:
        if km is not None:
            from jupyter_core.utils import run_sync

            try:
                run_sync(km.shutdown_kernel)(now=True)
            except Exception:  # noqa: BLE001 - the process group is killed anyway
                pass
        log_path.unlink(missing_ok=True)


def _run_point(point: Point, assigned_at: float, sweep_dir: Path, env: dict, kernel_name: str,
               conn: multiprocessing.connection.Connection, km: Any, log_path: Path) -> None:
    """Execute one point's notebook (papermill) in a temporary run directory, then move it into place.

    ``wall_s`` counts from ``assigned_at`` (when the sweep handed the point out, wall clock), so
    a kernel still warming up when its point arrives is counted as overhead, not hidden.
    """
    import papermill as pm

    started = datetime.now(timezone.utc).isoformat()
    tmp = sweep_dir / f".tmp-{point.run_id}-{os.getpid()}"
    tmp.mkdir(parents=True)
    os.link(log_path, tmp / "kernel.log")
    write_json(tmp / "params.json", {"experiment": point.experiment, "notebook": str(point.notebook),
                                     "run_id": point.run_id, "params": point.params})
    entry: dict[str, Any] = {"run_id": point.run_id, "experiment": point.experiment,
                             "params": point.params, "run_dir": point.run_id}
    try:
        pm.execute_notebook(str(point.notebook), str(tmp / "run.ipynb"),
                            parameters={**point.params, "run_dir": str(tmp)}, kernel_name=kernel_name,
                            progress_bar=False, cwd=str(point.notebook.parent),
                            request_save_on_cell_execute=False, km=km)
        if not (tmp / "metrics.parquet").is_file():
            raise RuntimeError(f"{point.notebook.name} finished without writing metrics.parquet "
                               "(does it call run_experiment(..., run_dir)?)")
        entry.update(status="ok")
    except pm.PapermillExecutionError as e:
        entry.update(status="failed", error=e.ename, message=str(e.evalue)[:2000], cell=e.exec_count,
                     cell_index=e.cell_index)
    except Exception as e:  # noqa: BLE001 - kernel died, missing output...: record, never lose the point
        entry.update(status="failed", error=type(e).__name__, message=str(e)[:2000], cell=None)
    wall = time.time() - assigned_at
    timing = {}
    if (tmp / "timing.json").is_file():
        timing = json.loads((tmp / "timing.json").read_text())
    entry.update(wall_s=round(wall, 3), compute_s=timing.get("compute_s"),
                 overhead_s=round(wall - timing["compute_s"], 3) if "compute_s" in timing else None,
                 start=started, end=datetime.now(timezone.utc).isoformat())
    write_json(tmp / "env.json", {**env, "start": started, "end": entry["end"], "run_id": point.run_id})
    _place(tmp, sweep_dir / point.run_id)
    append_jsonl(sweep_dir / "manifest.jsonl", entry)  # after the rename: ok means files are there
    conn.send(entry)
    conn.close()


def _kill_group(proc: mp.process.BaseProcess, sweep_dir: Path) -> None:
    """SIGKILL a point worker with its kernel, and drop its log (its point is recorded elsewhere)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.join(5)
    (sweep_dir / f".tmp-worker-{proc.pid}.log").unlink(missing_ok=True)


def _static_env(world_size: int | None = None) -> dict:
    from .provenance import collect_env

    env = collect_env()
    env.pop("time_utc", None)
    return env


def run_sweep(spec: Spec | str | os.PathLike, *, jobs: int = 1, out: str | os.PathLike | None = None,
              timeout: float | None = None, kernel_name: str = KERNEL_NAME, progress: bool = True,
              executor: str = "local", address: str | None = None, retries: int | None = None) -> SweepSummary:
    """Validate every point, then run the missing ones, ``jobs`` processes at a time (``executor="local"``)
    or as Ray tasks on the cluster at ``address`` (``executor="ray"``, see :mod:`ryzlab.sweep_ray`)."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if jobs < 1:
        raise ConfigError([f"--jobs must be >= 1, got {jobs}"])
    if timeout is not None and timeout <= 0:
        raise ConfigError([f"--timeout must be > 0 seconds, got {timeout}"])
    # --- executor choice (ray: ryzlab/sweep_ray.py) ---
    from .sweep_ray import check_executor_args, plan_ray

    check_executor_args(executor, address=address, retries=retries, jobs=jobs)
    points = expand(spec)
    validate(points, kernel_name=kernel_name)
    ray_plan = plan_ray(points, address=address, retries=retries) if executor == "ray" else None

    sweep_dir = Path(out) if out else REPO_ROOT / "results" / spec.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for stale in sweep_dir.glob(".tmp-*"):  # leftovers of a killed sweep: never counted as done
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    latest = manifest_status(sweep_dir)
    todo = deque(p for p in points if not is_done(sweep_dir, p.run_id, latest))
    summary = SweepSummary(name=spec.name, out_dir=sweep_dir, total=len(points),
                           skipped=len(points) - len(todo))
    if spec.path:
        shutil.copyfile(spec.path, sweep_dir / ".spec.yaml.tmp")
        os.replace(sweep_dir / ".spec.yaml.tmp", sweep_dir / "spec.yaml")
    if ray_plan is not None:  # --- ray executor hook: every missing point becomes one Ray task ---
        return ray_plan.run(todo, sweep_dir, summary, timeout=timeout, kernel_name=kernel_name, progress=progress)
    env = _static_env()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["papermill", "jupyter_client", "ryzlab.sweep"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=spec.name, unit="pt", dynamic_ncols=True)

    def post() -> None:
        if bar is not None:
            bar.set_postfix(ok=summary.ok, failed=summary.failed + summary.timeout,
                            left=len(todo) + len(running))
            bar.update(1)

    running: dict[int, tuple[mp.process.BaseProcess, Point, float, Any]] = {}
    spares: deque[tuple[mp.process.BaseProcess, Any]] = deque()  # warming workers without a point

    def spawn() -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_point_worker, args=(sweep_dir, env, kernel_name, child_conn),
                           name="ryzlab-sweep-point")
        proc.start()
        child_conn.close()
        spares.append((proc, parent_conn))

    t_start = time.perf_counter()
    try:
        while todo or running:
            # `jobs` points run; one more worker warms its kernel for the next point
            while len(spares) + len(running) < jobs + 1 and len(spares) < len(todo):
                spawn()
            while todo and spares and len(running) < jobs:
                point = todo.popleft()
                proc, conn = spares.popleft()
                conn.send((point, time.time()))
                running[proc.sentinel] = (proc, point, time.monotonic(), conn)
            multiprocessing.connection.wait(list(running), timeout=0.5)
            now = time.monotonic()
            for sentinel, (proc, point, t0, conn) in list(running.items()):
                timed_out = timeout is not None and now - t0 > timeout and proc.is_alive()
                if proc.is_alive() and not timed_out:
                    continue
                del running[sentinel]
                entry = None
                if timed_out:
                    _kill_group(proc, sweep_dir)
                else:
                    proc.join()
                    entry = conn.recv() if conn.poll() else None
                conn.close()
                if entry is None:  # killed by timeout or died before recording: record it here
                    status = "timeout" if timed_out else "failed"
                    entry = {"run_id": point.run_id, "experiment": point.experiment, "params": point.params,
                             "status": status, "error": "Timeout" if timed_out else "WorkerDied",
                             "message": (f"point exceeded --timeout {timeout} s" if timed_out
                                         else f"sweep worker exited with code {proc.exitcode}"),
                             "cell": None, "wall_s": round(now - t0, 3)}
                    for stale in sweep_dir.glob(f".tmp-{point.run_id}-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                    append_jsonl(sweep_dir / "manifest.jsonl", entry)
                summary.ok += entry["status"] == "ok"
                summary.failed += entry["status"] == "failed"
                summary.timeout += entry["status"] == "timeout"
                if entry["status"] == "ok" and entry.get("overhead_s") is not None:
                    summary.overheads_s.append(entry["overhead_s"])
                if entry["status"] != "ok":
                    log.warning("%s %s: %s: %s", point.label, entry["status"], entry.get("error"),
                                entry.get("message", "")[:300])
                post()
    except BaseException:
        while spares:
            _kill_group(spares.popleft()[0], sweep_dir)
        for proc, point, _, _ in running.values():
            _kill_group(proc, sweep_dir)
            for stale in sweep_dir.glob(f".tmp-{point.run_id}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        raise
    finally:
        for proc, conn in spares:  # normally none are left: spares never outnumber the points to do
            conn.send(None)
            proc.join(10)
        if bar is not None:
            bar.close()
    summary.wall_s = time.perf_counter() - t_start
    return summary
