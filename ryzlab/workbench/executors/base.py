"""What every sweep executor shares: the summary it fills in, the provenance of its points and the
torch threads each point gets. The executors themselves: :mod:`.local` (processes on this machine,
a warm spare kernel) and :mod:`.ray` (one Ray task per point)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ryzlab.config import ConfigError
from ryzlab.workbench.point import cores

log = logging.getLogger(__name__)

Executor = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")


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



def sweep_env(*, jobs: int, threads: int) -> dict:
    """Provenance shared by every point of this sweep (each run adds its start/end)."""
    from ryzlab.provenance import collect_env

    env = collect_env()
    env.pop("time_utc", None)
    env.update(jobs=jobs, threads=threads, cores=cores())
    try:  # what else the machine was doing when the sweep started (timings on a busy box are slower)
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        pass
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
