"""Sweep machinery figures (issue: foundation): per-point overhead and --jobs 2 vs --jobs 1.

    .venv/bin/python benchmarks/sweep_bench.py [--points 8] [--point-s 10]

1. Overhead: a grid of tiny attention_bench points; per point, wall time minus the
   experiment's own compute time (kernel start, parameter injection, imports incl. torch,
   saving). Target: at most 5 s.
2. Parallelism: an 8-point grid of ~10 s single-threaded points (iterations calibrated per
   point so both jobs get equal work), run with --jobs 1 and then
   --jobs 2 (fresh output folders). Target: jobs-2 wall time at most 0.65x of jobs-1.
Both in one run on one machine; the ratio is what counts (these machines are shared).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ryzlab.experiments.attention_bench import Config, run  # noqa: E402
from ryzlab.workbench.sweep import run_sweep  # noqa: E402


def spec_file(tmp: Path, name: str, grid: dict, fixed: dict) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "notebook": "attention_bench", "grid": grid, "fixed": fixed}))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--point-s", type=float, default=10.0, help="target compute seconds per point")
    ap.add_argument("--overhead-points", type=int, default=4)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ryzlab-sweep-bench-"))

    tiny = {"iters": 3, "warmup": 1, "copy_mib": 4, "threads": 1}
    s = run_sweep(spec_file(tmp, "overhead", {"context": [64 * (i + 1) for i in range(a.overhead_points)]}, tiny),
                  jobs=1, out=tmp / "overhead", progress=False)
    print(f"per-point overhead over {len(s.overheads_s)} points (jobs 1): mean {statistics.mean(s.overheads_s):.2f} s, "
          f"max {max(s.overheads_s):.2f} s (the first point waits for a cold kernel)   [target <= 5 s]", flush=True)

    # 8 points of ~point_s seconds each: every context gets its own iteration count, calibrated
    # here, so the two jobs get equal work. Contexts stay cache-resident (batch 1, <= 2k tokens)
    # so two points side by side measure the sweep's parallelism, not a shared memory bus.
    torch.set_num_threads(1)
    contexts = [256 * (i + 1) for i in range(a.points)]
    iters = []
    for c in contexts:
        t_step = statistics.median(run(Config(context=c, batch=1, iters=20, warmup=3, threads=1,
                                              copy_mib=4))["attn_us"]) / 1e6
        iters.append(max(5, int(a.point_s / t_step)))
    fixed = {"batch": 1, "warmup": 1, "threads": 1, "copy_mib": 4}
    n = len(contexts)
    walls = {}
    for jobs in (1, 2):
        t0 = time.perf_counter()
        p = tmp / f"jobs{jobs}.yaml"
        p.write_text(yaml.safe_dump({"name": f"jobs{jobs}", "notebook": "attention_bench",
                                     "zip": {"context": contexts, "iters": iters}, "fixed": fixed}))
        r = run_sweep(p, jobs=jobs, out=tmp / f"jobs{jobs}", progress=False)
        walls[jobs] = time.perf_counter() - t0
        assert r.ok == n, f"{r.failed} failed points; see {tmp / f'jobs{jobs}'}/manifest.jsonl"
        compute = sum(json.loads(line)["compute_s"] for line in (tmp / f"jobs{jobs}" / "manifest.jsonl").open())
        print(f"--jobs {jobs}: {n} points, {compute:.1f} s of experiment compute in all, wall {walls[jobs]:.1f} s",
              flush=True)
    print(f"jobs 2 / jobs 1 wall time: {walls[2] / walls[1]:.2f}   [target <= 0.65]")
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}; outputs in {tmp}")


if __name__ == "__main__":
    main()
