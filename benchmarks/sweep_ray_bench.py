"""--executor ray vs the local executor on one machine (issue: sweeps on a Ray cluster).

    .venv/bin/python benchmarks/sweep_ray_bench.py [--points 4] [--repeats 2] [--no-kill]

1. The same spec (tiny attention_bench points) through the local executor (--jobs 1) and through
   a local Ray instance with 1 CPU (one point at a time, like --jobs 1), alternating, each run
   into a fresh folder. Per point: the manifest's overhead_s (wall from handing the point out to
   its record, minus the experiment's own compute) and the end-to-end figure
   (sweep wall - total compute) / points, which also counts Ray's scheduling and the transfer
   of the run's files to the driver. Target: Ray's per-point overhead within 1 s of local's.
   The local executor warms the next point's kernel while a point runs; a Ray task does not
   (every point starts its worker, kernel and imports on its own clock), so the gap measured is
   mostly that start-up.
   Also checked: identical run ids, identical file names and metric columns per run.
2. A Ray worker killed by PID mid-point (found from the point's kernel): the sweep finishes,
   that point is retried and ok, and nothing half-written is left in the results folder.
Figures are from one shared machine; compare the two executors within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ryzlab.io import read_jsonl  # noqa: E402
from ryzlab.workbench.sweep import run_sweep  # noqa: E402
from ryzlab.workbench.executors.ray import start_local_ray  # noqa: E402

WAITS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "waits.ipynb"


def spread(xs: list[float]) -> str:
    return f"mean {statistics.mean(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def run_once(spec: Path, out: Path, executor: str) -> dict:
    t0 = time.perf_counter()
    s = run_sweep(spec, out=out, progress=False, executor=executor, threads=1)  # same threads on both
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "manifest.jsonl")
    assert s.ok == len(rows) == s.total, f"{executor}: {s.lines()}; see {out}/manifest.jsonl"
    compute = sum(r["compute_s"] for r in rows)
    return {"wall": wall, "e2e": (wall - compute) / len(rows), "overheads": [r["overhead_s"] for r in rows],
            "rows": {r["run_id"]: r for r in rows}}


def same_results(a: Path, b: Path, run_ids: list[str]) -> None:
    for rid in run_ids:
        fa, fb = sorted(f.name for f in (a / rid).iterdir()), sorted(f.name for f in (b / rid).iterdir())
        assert fa == fb, f"{rid}: files differ: {fa} vs {fb}"
        ca = list(pd.read_parquet(a / rid / "metrics.parquet").columns)
        cb = list(pd.read_parquet(b / rid / "metrics.parquet").columns)
        assert ca == cb, f"{rid}: metric columns differ"


def kill_worker_demo(tmp: Path) -> None:
    sig, go, out = tmp / "sig", tmp / "go", tmp / "kill"
    sig.mkdir()
    spec = tmp / "kill.yaml"
    spec.write_text(yaml.safe_dump({"name": "kill", "notebook": str(WAITS), "grid": {"x": [1]},
                                    "fixed": {"signal_dir": str(sig), "wait_for": str(go)}}))
    res = {}
    t = threading.Thread(target=lambda: res.update(s=run_sweep(spec, out=out, progress=False, executor="ray")))
    t.start()
    while not list(sig.glob("running-1-*")):
        time.sleep(0.1)
    kernel = int(next(sig.glob("running-1-*")).name.rsplit("-", 1)[1])
    worker = next(p for p in psutil.Process(kernel).parents() if p.cmdline() and p.cmdline()[0].startswith("ray::"))
    os.kill(worker.pid, signal.SIGKILL)
    go.touch()
    t.join()
    (row,) = read_jsonl(out / "manifest.jsonl")
    leftovers = sorted(p.name for p in out.iterdir()
                       if p.name not in (".lock", "manifest.jsonl", "spec.yaml", row["run_id"]))
    print(f"killed Ray worker pid {worker.pid} mid-point: sweep finished, point {row['status']} after "
          f"{row['attempts']} attempts, metrics.parquet present: {(out / row['run_id'] / 'metrics.parquet').is_file()}, "
          f"other entries in the results folder: {leftovers or 'none'}   [target: ok, retried, nothing half-written]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-kill", action="store_true", help="skip the killed-worker demonstration")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ryzlab-sweep-ray-bench-"))
    t0 = time.perf_counter()
    start_local_ray(num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False)
    print(f"local Ray instance (1 CPU) started in {time.perf_counter() - t0:.1f} s", flush=True)

    spec = tmp / "overhead.yaml"
    spec.write_text(yaml.safe_dump({"name": "overhead", "notebook": "attention_bench",
                                    "grid": {"context": [64 * (i + 1) for i in range(a.points)]},
                                    "fixed": {"iters": 3, "warmup": 1, "copy_mib": 4, "threads": 1}}))
    results: dict[str, list[dict]] = {"local": [], "ray": []}
    for r in range(a.repeats):
        for executor in ("local", "ray"):
            res = run_once(spec, tmp / f"{executor}{r}", executor)
            results[executor].append(res)
            print(f"repeat {r} {executor:5s}: wall {res['wall']:.1f} s, end-to-end overhead per point {res['e2e']:.2f} s, "
                  f"manifest overhead_s {', '.join(f'{o:.2f}' for o in res['overheads'])}", flush=True)
    ids = sorted(results["local"][0]["rows"])
    assert all(sorted(res["rows"]) == ids for rs in results.values() for res in rs), "run ids differ"
    same_results(tmp / "local0", tmp / "ray0", ids)
    print(f"same run ids ({len(ids)}), same files and metric columns per run: yes")
    summary = {}
    for executor, rs in results.items():
        o = [x for res in rs for x in res["overheads"]]
        e = [res["e2e"] for res in rs]
        summary[executor] = (statistics.mean(o), statistics.mean(e))
        print(f"{executor:5s}: manifest overhead_s per point {spread(o)}; end-to-end per point {spread(e)}")
    d_manifest = summary["ray"][0] - summary["local"][0]
    d_e2e = summary["ray"][1] - summary["local"][1]
    print(f"ray - local per-point overhead: {d_manifest:+.2f} s (manifest), {d_e2e:+.2f} s (end-to-end)   "
          f"[target <= +1.00 s]")
    if not a.no_kill:
        kill_worker_demo(tmp)
    print(f"device: cpu (this machine); outputs in {tmp}")
    print(json.dumps({"ray_minus_local_overhead_s": round(d_manifest, 3), "ray_minus_local_e2e_s": round(d_e2e, 3)}))


if __name__ == "__main__":
    main()
