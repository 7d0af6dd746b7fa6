"""Fair sweeps (issue 12): are the demo's attention timings what the same points measure alone?

    .venv/bin/python benchmarks/fair_sweep_bench.py [--rounds 2]

Each round: the whole demo (specs/demo.yaml, --jobs 2, default threads = cores // jobs) into a
temp folder, then its attention_bench points alone (--jobs 1, the same torch threads per point
as in the demo, read from the runs' env.json). Rounds alternate demo / alone so drifting load
from other users of the machine hits both. Per point: median attn_us in the demo / alone (the
median over rounds of each run's median), each round's value, and the same ratio for the
fastest iteration. Target: every median ratio within 20% (0.8..1.2).
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
from ryzlab.workbench.report import load_sweep  # noqa: E402
from ryzlab.workbench.sweep import run_sweep  # noqa: E402


def attention_stats(sweep_dir: Path) -> pd.DataFrame:
    """Per (context, dtype): median and min attn_us of each attention point of a sweep folder."""
    df = load_sweep(sweep_dir).by_experiment["attention_bench"]
    return df.groupby(["context", "dtype"])["attn_us"].agg(["median", "min"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="demo / alone pairs, alternated (external load drifts)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ryzlab-fair-"))
    block = next(b for b in yaml.safe_load((ROOT / "specs" / "demo.yaml").read_text())["experiments"]
                 if b["notebook"] == "attention_bench")
    demo_rounds, alone_rounds = [], []
    for i in range(a.rounds):
        s = run_sweep(ROOT / "specs" / "demo.yaml", jobs=2, out=tmp / f"demo{i}", progress=False)
        print(f"round {i} demo: " + " | ".join(s.lines()), flush=True)
        threads = {json.loads(p.read_text()).get("threads") for p in (tmp / f"demo{i}").glob("attention_bench-*/env.json")}
        (t,) = threads
        spec = tmp / "alone.yaml"
        spec.write_text(yaml.safe_dump({"name": "alone", **block}))
        s = run_sweep(spec, jobs=1, threads=t, out=tmp / f"alone{i}", progress=False)
        print(f"round {i} alone ({t} torch thread(s), as in the demo): " + " | ".join(s.lines()), flush=True)
        demo_rounds.append(attention_stats(tmp / f"demo{i}"))
        alone_rounds.append(attention_stats(tmp / f"alone{i}"))
    rows = []
    for k in demo_rounds[0].index:
        d = [r.loc[k] for r in demo_rounds]
        al = [r.loc[k] for r in alone_rounds]
        dm, am = statistics.median(x["median"] for x in d), statistics.median(x["median"] for x in al)
        rows.append({"context": k[0], "dtype": k[1], "demo_median_us": dm, "alone_median_us": am,
                     "ratio_median": dm / am,
                     "demo_rounds": "/".join(f"{x['median']:.3g}" for x in d),
                     "alone_rounds": "/".join(f"{x['median']:.3g}" for x in al),
                     "ratio_min": min(x["min"] for x in d) / min(x["min"] for x in al)})
    out = pd.DataFrame(rows)
    out["within_20pct"] = out["ratio_median"].between(0.8, 1.2)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3g}".format):
        print(out.to_string(index=False))
    print(f"{int(out['within_20pct'].sum())}/{len(out)} points' median within 20% of the same point alone "
          f"[target: all]; ratio of the fastest iterations: {out['ratio_min'].min():.2f}..{out['ratio_min'].max():.2f}")


if __name__ == "__main__":
    main()
