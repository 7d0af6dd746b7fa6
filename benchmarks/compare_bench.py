"""`ryzlab compare` false and true alarms (issue 12).

    .venv/bin/python benchmarks/compare_bench.py [--out DIR] [--jobs 1]

1. Two runs of the same 20-point attention_bench sweep (20 timed metrics: attn_us per point),
   compared: how many are flagged. Target: at most 1 of 20.
2. B with one metric's samples scaled by 1.3 (a copy of B, samples.parquet edited): that
   metric must be flagged, as a regression.
Both runs on the same machine in one go; on a shared machine a point that ran during a burst
of other work is a real slowdown of that run, and is what a flag then reports.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ryzlab.workbench.compare import compare, terminal_table  # noqa: E402
from ryzlab.workbench.sweep import run_sweep  # noqa: E402

SPEC = {"name": "cmp", "notebook": "attention_bench",
        "grid": {"context": [64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096], "dtype": ["float32", "bfloat16"]},
        "fixed": {"batch": 2, "iters": 30, "threads": 1, "copy_mib": 8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the two sweeps (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="compare the sweeps already in --out (no new runs)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="compare-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "cmp.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    for side in ("A", "B") if not args.reuse else ():
        s = run_sweep(spec, jobs=args.jobs, out=root / side, progress=False)
        print(*s.lines(), sep="\n")

    c = compare(root / "A", root / "B")
    print(terminal_table(c))
    n, flagged = len(c.table), len(c.flagged)
    print(f"\n[same sweep twice] {flagged} of {n} metrics flagged (target: at most 1 of 20)")

    scaled = root / "B_scaled"
    shutil.rmtree(scaled, ignore_errors=True)
    shutil.copytree(root / "B", scaled)
    target = sorted(p for p in scaled.glob("attention_bench-*/samples.parquet"))[0]
    df = pd.read_parquet(target)
    df.loc[df["metric"] == "attn_us", "value"] *= 1.3
    df.to_parquet(target, index=False)
    point = target.parent.name
    c2 = compare(root / "A", scaled)
    ctx = int(df["context"].iloc[0]), str(df["dtype"].iloc[0])
    row = c2.table[c2.table["point"].str.contains(f"context={ctx[0]}, ") & c2.table["point"].str.contains(ctx[1])]
    print(row[["point", "metric", "b_over_a", "ci_low", "ci_high", "verdict"]].to_string(index=False))
    print(f"[one metric x1.3] {point} (context={ctx[0]}, {ctx[1]}): verdict {row['verdict'].iloc[0]}; "
          f"{len(c2.flagged)} of {len(c2.table)} flagged in total")


if __name__ == "__main__":
    main()
