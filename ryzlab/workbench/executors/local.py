"""The local executor: ``jobs`` points at a time, each in its own worker process and fresh kernel on
this machine, with one spare worker warming its kernel for the next point
(:class:`ryzlab.workbench.point.PointProcess`)."""
from __future__ import annotations

import multiprocessing.connection
import shutil
import time
from collections import deque
from pathlib import Path

from ryzlab.workbench.executors.base import SweepSummary, sweep_env
from ryzlab.workbench.point import PointProcess, record
from ryzlab.workbench.spec import Point


def run_local(todo: deque[Point], summary: SweepSummary, sweep_dir: Path, *, jobs: int, timeout: float | None,
              kernel_name: str, progress: bool, threads: int) -> SweepSummary:
    """Run every point in ``todo``: ``jobs`` at a time (fewer where a block says so), one experiment at
    a time, each killed after ``timeout`` seconds; every outcome is recorded in the manifest."""
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
