"""The Ray executor, driver side: ``ryzlab sweep SPEC --executor ray [--address auto|ray://HOST:PORT]``.

Every missing point of a sweep becomes one Ray task that asks for the resources the point needs,
so a cluster runs as many points at once as it has room for. The semantics are the local
executor's (:mod:`.local`); :mod:`ryzlab.workbench.sweep` holds the results folder's lock and resumes:

* everything is checked before the first task is submitted: the spec, every point's parameters,
  the address, and that every point fits on at least one node of the cluster;
* a task runs its point with :func:`ryzlab.workbench.point.run_point` (a fresh worker process and kernel,
  in their own process groups, on the task's node; see :mod:`.ray_task`) and returns
  the run's files as bytes; the driver writes them with :func:`ryzlab.workbench.point.store_point` (a
  temporary folder renamed into place, then the manifest line). No shared file system is
  assumed, and a point whose worker or node dies has written nothing in the results folder;
* ``--timeout`` is enforced by ``run_point`` on the node (counted from the point's start there):
  it kills the point's process groups and the point is recorded ``timeout``, like locally;
* as locally, points of different experiments never run side by side and a block's ``jobs:``
  caps its points at once; within that, the cluster runs as many as its resources allow;
* a Ray worker or node dying mid-point, or the point's worker process dying before it recorded
  an outcome, is a fault: the point is submitted again, up to ``--retries`` times, then recorded
  ``failed`` with the reason. A notebook that raises is not a fault (it would raise again). The
  manifest line's ``attempt_nodes`` lists the node of every attempt (a lost one's from Ray's
  error, None where Ray does not name it); ``ray_node`` is the node of the last.

Resources per point (Ray task options): on a cluster with GPUs, a point whose ``device`` is not
``cpu`` is a GPU point and asks for ``num_gpus`` = its world size (tp x cp x workers of its
config) and one CPU; every other point asks for ``num_cpus`` = its world size. An experiment
block's ``resources:`` (``num_cpus``, ``num_gpus``, ``memory`` in bytes, ``custom``: {name: amount};
parsed and checked in :mod:`ryzlab.workbench.spec`) replaces those defaults key by key. A point runs with
``--threads`` torch threads, else its task's ``num_cpus`` (at least 1).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ryzlab.config import ConfigError

from ryzlab.workbench.executors.base import EXECUTORS, SweepSummary

if TYPE_CHECKING:
    from ryzlab.workbench.spec import Point

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 2  # a dead worker or node is usually transient; a third death says it is the point
WORLD_FIELDS = ("tp", "cp", "workers")  # config fields whose product is the processes a point starts
ADDRESS_FORMS = "'auto', 'local', 'HOST:PORT' or 'ray://HOST:PORT'"
_NODE_IP = re.compile(r"[Nn]ode IP:? ([0-9A-Fa-f.:]+[0-9A-Fa-f])")
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+$")


# ----------------------------------------------------------------------------- checks (no ray import)
def check_executor_args(executor: str, *, address: str | None, retries: int | None, jobs: int,
                        threads: int | None = None) -> None:
    """Executor flags that make no sense together fail before anything is expanded or run."""
    problems = []
    if executor not in EXECUTORS:
        problems.append(f"--executor {executor!r} is not valid; choose one of {', '.join(EXECUTORS)}")
    elif executor == "local":
        if address is not None:
            problems.append("--address needs --executor ray")
        if retries is not None:
            problems.append("--retries applies to --executor ray (the local executor records a dead worker "
                            "as failed)")
    else:
        if jobs != 1:
            problems.append("--jobs applies to the local executor; with --executor ray the cluster runs as "
                            "many points at once as their resources allow")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            problems.append(f"--retries must be an integer >= 0, got {retries!r}")
        if threads is not None and threads < 1:
            problems.append(f"--threads must be >= 1, got {threads}")
        if address is not None and address not in ("auto", "local") and not _ADDRESS.match(address):
            problems.append(f"--address {address!r} is not valid; use {ADDRESS_FORMS}")
    if problems:
        raise ConfigError(problems, "sweep")


def point_world_size(point: Point) -> int:
    """Processes (devices, on GPU points) a point starts: tp x cp x workers of its typed config."""
    from ryzlab.experiments import EXPERIMENTS, RESERVED, make_config

    if point.experiment not in EXPERIMENTS:
        return 1
    cfg = make_config(point.experiment, {k: v for k, v in point.notebook_params.items() if k not in RESERVED})
    size = 1
    for name in WORLD_FIELDS:
        value = getattr(cfg, name, 1)
        size *= value if isinstance(value, int) and value > 0 else 1
    return size


def point_resources(point: Point, *, cluster_has_gpus: bool) -> dict[str, Any]:
    """Ray task options for ``point``: defaults from its world size, then its block's ``resources:``."""
    world = point_world_size(point)
    gpu_point = cluster_has_gpus and point.params.get("device") != "cpu"
    opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": world} if gpu_point else {"num_cpus": world, "num_gpus": 0}
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in point.resources:
            opts[key] = point.resources[key]
    if point.resources.get("custom"):
        opts["resources"] = dict(point.resources["custom"])
    return opts


def _needs(opts: dict[str, Any]) -> dict[str, float]:
    """Ray task options -> the node resources they consume (Ray's names: CPU, GPU, memory, custom)."""
    need = {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0), "memory": opts.get("memory", 0),
            **opts.get("resources", {})}
    return {k: float(v) for k, v in need.items() if v}


def fit_problems(points: list[Point], resources: dict[str, dict], nodes: list[dict[str, float]]) -> list[str]:
    """A task runs on one node: every point must fit on at least one node of the cluster."""
    problems = []
    for p in points:
        need = _needs(resources[p.run_id])
        if any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
            continue
        largest = ", ".join(f"{k}={max((n.get(k, 0.0) for n in nodes), default=0.0):g}" for k in need)
        problems.append(f"{p.label}: needs {', '.join(f'{k}={v:g}' for k, v in need.items())} on one node, but "
                        f"no node of the Ray cluster has that (largest: {largest}); set `resources:` in its "
                        "experiment block or add nodes")
    return problems


# ----------------------------------------------------------------------------- connect and plan
def _ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(["--executor ray needs Ray: pip install 'ryzlab[cluster]'"], "sweep") from e
    return ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(**init_kwargs: Any) -> Any:
    """``ray.init(**init_kwargs)`` for a new local instance that also starts on a loaded machine.

    Ray 2.60's raylet waits a fixed 15 s for the dashboard agent to write its port files and
    aborts the whole start-up after that; on a busy 2-core machine the agent's imports alone take
    longer. Handing every agent port to both sides up front (chosen by the OS) removes those waits.
    This reaches into two Ray internals; where they are missing (another Ray version) it falls
    back to a plain ``ray.init`` and logs that it did.
    """
    import ray

    try:
        from ray._private import parameter, services

        orig_init, orig_start = parameter.RayParams.__init__, services.start_ray_process
    except (ImportError, AttributeError):
        log.warning("fallback: plain ray.init (this Ray has no RayParams/start_ray_process to pass agent ports)")
        return ray.init(**init_kwargs)
    ports = {k: _free_port() for k in ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port",
                                       "runtime_env_agent_port")}

    def params_init(self: Any, *a: Any, **kw: Any) -> None:
        orig_init(self, *a, **kw)
        for k, v in ports.items():
            setattr(self, k, getattr(self, k, None) or v)

    def start(command: list[str], process_type: str, *a: Any, **kw: Any) -> Any:
        if process_type == "raylet":  # the one port the raylet is not told by Ray's own launcher
            command = [*command, f"--dashboard_agent_listen_port={ports['dashboard_agent_listen_port']}"]
        return orig_start(command, process_type, *a, **kw)

    parameter.RayParams.__init__, services.start_ray_process = params_init, start
    try:
        return ray.init(**init_kwargs)
    finally:
        parameter.RayParams.__init__, services.start_ray_process = orig_init, orig_start


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started the connection (and so ends it)."""
    if ray.is_initialized():
        if address is not None:
            log.info("Ray is already initialized in this process; --address %s is not used", address)
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address == "local" or (address is None and not os.environ.get("RAY_ADDRESS")):
            # a new instance on this machine; a sweep needs no dashboard (a process and a port)
            start_local_ray(address=address, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...: all mean "no cluster"
        raise ConfigError([f"cannot connect to Ray at {address or 'a new local instance'}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"], "sweep") from e
    return True


def plan_ray(points: list[Point], *, address: str | None, retries: int | None, threads: int | None) -> RayPlan:
    """Connect to the cluster and size every point's task; any point that fits no node is an error.

    Runs after the spec and the points were validated and before anything is written or submitted.
    """
    ray = _ray()
    owns = _connect(ray, address)
    try:
        nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
        has_gpus = any(n.get("GPU", 0) > 0 for n in nodes)
        resources = {p.run_id: point_resources(p, cluster_has_gpus=has_gpus) for p in points}
        problems = fit_problems(points, resources, nodes)
        if problems:
            raise ConfigError(problems, "sweep")
    except BaseException:
        if owns:
            ray.shutdown()
        raise
    return RayPlan(resources=resources, retries=DEFAULT_RETRIES if retries is None else retries, owns_ray=owns,
                   threads=threads)


# ----------------------------------------------------------------------------- run
def _fault_types(ray: Any) -> tuple[type, ...]:
    """Ray errors that mean the machinery failed (worker, node, raylet, object), not the point."""
    names = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OutOfMemoryError",
             "RaySystemError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass
class RayPlan:
    """Per-point Ray task options, the retry budget, and whether the sweep owns the Ray connection."""

    resources: dict[str, dict[str, Any]]
    retries: int = DEFAULT_RETRIES
    owns_ray: bool = False
    threads: int | None = None
    inflight: dict[Any, tuple[Point, int]] = field(default_factory=dict)
    attempt_nodes: dict[str, list[str | None]] = field(default_factory=dict)
    """Per run id, the node (IP) of each attempt so far; the manifest's ``attempt_nodes``."""

    def close(self) -> None:
        """End the Ray connection this sweep started (a local instance stops with it)."""
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False

    def run(self, todo: Any, sweep_dir: Path, summary: SweepSummary, *, timeout: float | None, kernel_name: str,
            progress: bool) -> SweepSummary:
        """Submit every point in ``todo``, store each result as it arrives, retry faults."""
        import ray

        from ryzlab.workbench.executors.ray_task import run_point_task

        task = ray.remote(max_retries=0, retry_exceptions=False)(run_point_task)  # retries are ours: counted
        faults = _fault_types(ray)
        notebooks: dict[Path, Any] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=summary.name, unit="pt", dynamic_ncols=True)

        def submit(point: Point, attempt: int) -> None:
            if point.notebook not in notebooks:  # one copy per notebook in the object store, not per point
                data = point.notebook.read_bytes()
                notebooks[point.notebook] = (ray.put(data), hashlib.sha256(data).hexdigest())
            nb_ref, sha = notebooks[point.notebook]
            opts = self.resources[point.run_id]
            job = {"point": point.to_json(), "notebook_sha256": sha, "kernel_name": kernel_name, "timeout": timeout,
                   "threads": self.threads or max(1, int(opts.get("num_cpus", 1))), "attempt": attempt}
            ref = task.options(**opts, name=f"ryzlab-point:{point.run_id}").remote(job, nb_ref)
            self.inflight[ref] = (point, attempt)

        queue = deque((p, 1) for p in todo)
        t_start = time.perf_counter()
        try:
            while queue or self.inflight:
                # as locally: experiments never run side by side, and a block's `jobs:` caps its points
                # at once (`jobs: 1` timings taken alone); otherwise the cluster's resources decide
                while queue and all(p.experiment == queue[0][0].experiment for p, _ in self.inflight.values()) \
                        and len(self.inflight) < (queue[0][0].jobs or len(queue) + len(self.inflight)):
                    submit(*queue.popleft())
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    point, attempt = self.inflight.pop(ref)
                    entry = self._collect(ray, ref, point, attempt, sweep_dir, faults)
                    if entry is None:  # a fault with retries left: next in line
                        queue.appendleft((point, attempt + 1))
                    else:
                        summary.add(entry, point.label, bar, left=len(queue) + len(self.inflight))
        except BaseException:
            # Ctrl-C or a driver error: stop every task (run_point kills its point's process groups)
            for ref in self.inflight:
                ray.cancel(ref)
            raise
        finally:
            if bar is not None:
                bar.close()
        summary.wall_s = time.perf_counter() - t_start
        return summary

    def _collect(self, ray: Any, ref: Any, point: Point, attempt: int, sweep_dir: Path, faults: tuple) -> dict | None:
        """The manifest entry of a finished task (its run folder stored first), or None to retry."""
        from ryzlab.io import append_jsonl
        from ryzlab.workbench.point import PointResult, store_point

        nodes = self.attempt_nodes.setdefault(point.run_id, [])
        base = {"run_id": point.run_id, "experiment": point.experiment, "params": point.params,
                "run_dir": point.run_id, "executor": "ray", "attempts": attempt, "attempt_nodes": nodes}
        try:
            out = ray.get(ref)
            nodes.append(out["node"])
            entry = {**out["entry"], **base, "ray_node": out["node"], "ray_worker_pid": out["worker_pid"]}
            fault = None
            if entry.get("error") == "WorkerDied":  # the point's worker process died before it reported
                fault = entry.get("message")
        except faults as e:
            out, entry, fault = None, None, _first_line(e)
            # a dead node's task never reported; Ray's error names the node ("Node IP: 10.0.0.2")
            m = _NODE_IP.search(str(e))
            nodes.append(m.group(1) if m else None)
        except ray.exceptions.RayTaskError as e:  # the task's own code failed: not a fault, no retry
            entry = {**base, "status": "failed", "error": type(e.cause).__name__ if e.cause else "RayTaskError",
                     "message": _first_line(e.cause or e)[:2000], "cell": None}
            append_jsonl(sweep_dir / "manifest.jsonl", entry)
            return entry
        if fault is not None:
            if attempt <= self.retries:
                log.warning("%s: attempt %d of %d lost (%s); submitting it again", point.label, attempt,
                            self.retries + 1, fault)
                return None
            entry = {**(entry or base), "status": "failed", "error": "WorkerDied", "cell": None,
                     "message": f"the point's Ray worker, node or process died in each of {attempt} attempts "
                                f"(--retries {self.retries}); last: {fault}"[:2000]}
            if out is None:
                append_jsonl(sweep_dir / "manifest.jsonl", entry)
                return entry
        # params.json as the driver knows the point (the task may have run a private copy of the notebook)
        files = {**out["files"], "params.json": json.dumps(
            {"experiment": point.experiment, "notebook": str(point.notebook), "run_id": point.run_id,
             "params": point.params}, indent=1, sort_keys=True, default=str).encode()}
        try:
            store_point(sweep_dir, PointResult(entry=entry, files=files))
        except ValueError as e:  # a task result that would write outside its run folder: refuse it, record why
            entry = {**base, "status": "failed", "error": "BadTaskResult", "message": str(e)[:2000], "cell": None}
            append_jsonl(sweep_dir / "manifest.jsonl", entry)
        return entry
