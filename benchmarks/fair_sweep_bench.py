"""Fair sweeps (issue 12): are the demo's attention timings what the same points measure alone?

    .venv/bin/python benchmarks/fair_sweep_bench.py [--demo-dir results/demo] [--repeat 3]

1. The demo (specs/demo.yaml, --jobs 2, default threads = cores // jobs) is run into a temp
   folder, or an existing demo folder is read (--demo-dir).
2. Its attention_bench points are run again alone: --jobs 1, the same torch threads per point
   as in the demo (read from the runs' env.json), each point --repeat times.
3. Per point: the median attn_us in the demo / the median of the alone repeats' medians, with
   the alone spread (min..max). Target: every ratio within 20% (0.8..1.2).
Both in one run on one machine; these machines are shared, so the spread is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ryzlab.report import load_sweep  # noqa: E402
from ryzlab.sweep import run_sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", help="an existing `ryzlab sweep specs/demo.yaml --jobs 2` folder")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ryzlab-fair-"))
    demo_dir = Path(a.demo_dir) if a.demo_dir else tmp / "demo"
    if not a.demo_dir:
        s = run_sweep(ROOT / "specs" / "demo.yaml", jobs=2, out=demo_dir, progress=False)
        print("\n".join(s.lines()), flush=True)
    demo = load_sweep(demo_dir).by_experiment["attention_bench"]
    runs = demo["run_id"].unique()
    threads = {json.loads((demo_dir / r / "env.json").read_text()).get("threads") for r in runs}
    torch_threads = set(demo["torch_threads"])
    print(f"demo: {len(runs)} attention points, sweep threads per point {threads}, torch threads seen {torch_threads}")

    block = next(b for b in yaml.safe_load((ROOT / "specs" / "demo.yaml").read_text())["experiments"]
                 if b["notebook"] == "attention_bench")
    spec = tmp / "alone.yaml"
    spec.write_text(yaml.safe_dump({"name": "alone", **block, "repeat": a.repeat}))
    s = run_sweep(spec, jobs=1, threads=int(next(iter(torch_threads))), out=tmp / "alone", progress=False)
    print("\n".join(s.lines()), flush=True)
    alone = load_sweep(tmp / "alone").by_experiment["attention_bench"]

    keys = ["context", "dtype"]
    d = demo.groupby(keys)["attn_us"].median()
    per_run = alone.groupby(keys + ["run_id"])["attn_us"].median().groupby(keys)
    rows = []
    for k, med in d.items():
        reps = per_run.get_group(k).tolist()
        ref = statistics.median(reps)
        rows.append({"context": k[0], "dtype": k[1], "demo_us": med, "alone_us": ref,
                     "alone_min_us": min(reps), "alone_max_us": max(reps), "ratio": med / ref,
                     "within_20pct": 0.8 <= med / ref <= 1.2})
    out = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(out.to_string(index=False))
    print(f"{int(out['within_20pct'].sum())}/{len(out)} points within 20% of alone   [target: all]")


if __name__ == "__main__":
    main()
