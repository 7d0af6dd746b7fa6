"""The Ray executor, worker side (``--executor ray``): one Ray task runs one sweep point and returns its files.

The task calls :func:`ryzlab.workbench.point.run_point`, which starts a fresh worker process and kernel in
their own process groups on this node, enforces ``--timeout`` (killing both groups) and returns
the run's files as bytes. A cancelled task (Ctrl-C on the driver) gets ``KeyboardInterrupt``
inside ``run_point``, which kills both groups on its way out. A Ray worker that dies takes its
point with it: the point's worker gets SIGTERM from the OS (``PR_SET_PDEATHSIG``) and kills the
kernel's group first. Nothing is written in the results folder (the driver does that).

No warm spare: every point starts its worker and kernel (and the kernel's warm-up imports) on
its own critical path; ``benchmarks/sweep_ray_bench.py`` measures what that costs against the
local executor, which warms the next point's kernel while a point runs.

``run_point`` works in a temporary folder; a Ray worker killed mid-point cannot remove it, so
each worker's points use ``<tmp>/ryzlab-ray-<worker pid>/`` and the next task on the node removes
the folders of workers that are gone.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

ROOT_PREFIX = "ryzlab-ray-"


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _root() -> Path:
    """This Ray worker's folder; the folders of dead workers on this node are removed first."""
    base = Path(tempfile.gettempdir())
    for d in base.glob(f"{ROOT_PREFIX}*"):
        pid = d.name[len(ROOT_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    root = base / f"{ROOT_PREFIX}{os.getpid()}"
    root.mkdir(exist_ok=True)
    return root


def _notebook(root: Path, path: str, sha256: str, data: bytes) -> Path:
    """The driver's notebook path when this node has the same file, else a private copy of its bytes."""
    nb = Path(path)
    try:
        if nb.is_file() and hashlib.sha256(nb.read_bytes()).hexdigest() == sha256:
            return nb
    except OSError:
        pass
    copy = root / "notebooks" / sha256 / nb.name
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    return copy


@functools.lru_cache(maxsize=8)
def _node_env(threads: int, visible: tuple) -> dict:
    """This node's provenance (imports torch, runs git): once per Ray worker and device set."""
    from ryzlab.workbench.executors.base import sweep_env

    return {**sweep_env(jobs=1, threads=threads), "jobs": None}  # points at once: the cluster's, unknown here


def run_point_task(job: dict, notebook: bytes) -> dict[str, Any]:
    """Body of the Ray task (the driver wraps it in ``ray.remote``): run one point, return its files.

    Returns ``{"entry", "files", "node", "worker_pid"}``: the :class:`ryzlab.workbench.point.PointResult`
    (files: name -> bytes) and where it ran.
    """
    from ryzlab.workbench.point import run_point
    from ryzlab.workbench.spec import Point

    node = socket.gethostname()
    try:
        import ray

        node = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker (called directly): the host name will do
        pass
    root = _root()
    point = Point.from_json(job["point"])
    point = dataclasses.replace(point, notebook=_notebook(root, job["point"]["notebook"], job["notebook_sha256"],
                                                          notebook))
    visible = tuple(sorted((k, v) for k, v in os.environ.items() if k.endswith("_VISIBLE_DEVICES")))
    env = {**_node_env(job["threads"], visible), "executor": "ray", "ray_node": node, "ray_worker_pid": os.getpid(),
           "attempts": job["attempt"]}
    saved, tempfile.tempdir = tempfile.tempdir, str(root)  # run_point's folder: under this worker's root
    try:
        result = run_point(point, env=env, kernel_name=job["kernel_name"], threads=job["threads"],
                           timeout=job["timeout"])
    finally:
        tempfile.tempdir = saved
    return {"entry": result.entry, "files": result.files, "node": node, "worker_pid": os.getpid()}
