"""Compare two sweeps point by point: per metric, B/A with a bootstrap confidence interval over
the stored per-step samples, and a verdict that flags only changes beyond noise.

    ryzlab compare results/A results/B [--fail-on-regression]

Points are matched by their parameters (the manifest's ``params``, without ``repeat``: the
repeats of a point are pooled) plus the label columns of their samples (layout, dtype...), and
the experiment. For each metric the statistic is median(B) / median(A); its confidence interval
comes from resampling the steps of A and of B independently with replacement (percentile
bootstrap, as pyperf and asv do). A metric is flagged when the whole interval lies beyond
``min_change`` (B/A above 1 + min_change or below 1 / (1 + min_change); defaults: 99% interval,
5%): the change is real *and* big enough to matter (asv's ``--factor`` idea). Whether a flagged change is a regression depends on the
metric's direction (times and errors: lower is better; rates and throughput: higher is better);
a metric whose direction is unknown counts as a regression when flagged, so CI never misses it.

The page (``html_page``) also draws B/A with its interval per metric (one row each, on a log axis,
the ``min_change`` band shaded) and lists how the two sweeps' environments differ (versions,
threads, cores, device, machine load when recorded): a difference there is a reason for a change
that is not the code's.

Only metrics with stored samples are compared (``samples.parquet`` or, for older runs, the
per-step rows of ``metrics.parquet``); single-value metrics have no noise estimate to judge by.
"""
from __future__ import annotations

import html
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ryzlab.config import ConfigError
from ryzlab.workbench.report import resolve_sweep_dir, safe_run_dir
from ryzlab.io import tuples_from_lists
from ryzlab.samples import load_samples
from ryzlab.workbench.sweep import manifest_status

NOT_KEYS = ("run_id", "device_name", "repeat", "metric", "sample", "value")
"""Columns that never identify a point: provenance (the CPU/GPU model may differ on purpose)
and repeat (repeats of one point are pooled)."""
LOWER_IS_BETTER = re.compile(r"(_ms|_us|_s|_ns|latency|_err|kl_|ppl|bytes)(_p\d+|_mean|_max)?$|^(kl|ppl)")
HIGHER_IS_BETTER = re.compile(r"(gbps|throughput|per_s|goodput|speedup|efficiency|_rate|_bw|hit_rate|rps)$")


def direction(metric: str) -> int:
    """-1: lower is better, +1: higher is better, 0: unknown."""
    if HIGHER_IS_BETTER.search(metric):
        return 1
    if LOWER_IS_BETTER.search(metric):
        return -1
    return 0


def sweep_samples(sweep_dir: str | Path) -> pd.DataFrame:
    """Every ok point's samples, with ``experiment``, ``point`` (JSON of its identifying
    values) and the point's parameters as columns."""
    sweep_dir = resolve_sweep_dir(sweep_dir)
    if not (sweep_dir / "manifest.jsonl").is_file():
        raise ConfigError([f"{sweep_dir} holds no manifest.jsonl (not a sweep directory written by `ryzlab sweep`)"])
    frames = []
    for run_id, row in manifest_status(sweep_dir).items():
        run_dir = safe_run_dir(sweep_dir, run_id)
        if row.get("status") != "ok" or run_dir is None or not (run_dir / "metrics.parquet").is_file():
            continue
        params = {k: v for k, v in (row.get("params") or {}).items() if k != "repeat"}
        s = tuples_from_lists(load_samples(run_dir, list(params)))
        if s.empty:
            continue
        # sorted: the key must not depend on the order a version of the experiment wrote its columns in
        labels = sorted(c for c in s.columns if c not in NOT_KEYS and c not in params and c != "experiment")
        ident = [json.dumps(list(map(str, vals))) for vals in s[labels].itertuples(index=False)] if labels \
            else [""] * len(s)
        base = json.dumps(params, sort_keys=True, default=str)
        frames.append(pd.DataFrame({
            "experiment": str(row.get("experiment")),
            "point": [f"{base}|{i}" for i in ident],
            "label": [_label(params, dict(zip(labels, vals))) for vals in s[labels].itertuples(index=False)]
            if labels else _label(params, {}),
            "metric": s["metric"].astype(str), "value": s["value"].astype(float), "run_id": str(run_id),
        }))
    cols = ["experiment", "point", "label", "metric", "value", "run_id"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _label(params: dict, labels: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in {**params, **labels}.items())


def _boot_medians(runs: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution of the median: steps resampled with replacement; with several runs
    of the point (``repeat: N``), the runs are resampled first, so drift between processes
    widens the interval as it should (a two-level bootstrap)."""
    if len(runs) == 1:
        a = runs[0]
        return np.median(a[rng.integers(0, len(a), (n_boot, len(a)))], axis=1)
    out = np.empty(n_boot)
    for i in range(n_boot):
        picked = [runs[j] for j in rng.integers(0, len(runs), len(runs))]
        out[i] = np.median(np.concatenate([r[rng.integers(0, len(r), len(r))] for r in picked]))
    return out


def bootstrap_ratio(a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray], *, n_boot: int = 2000,
                    confidence: float = 0.99, seed: int = 0) -> tuple[float, float, float]:
    """median(b)/median(a) and its percentile-bootstrap interval; ``a``/``b`` are the steps of
    one run, or a list with the steps of each run (repeat) of the point."""
    ra = a if isinstance(a, list) else [np.asarray(a)]
    rb = b if isinstance(b, list) else [np.asarray(b)]
    rng = np.random.default_rng(seed)
    ma, mb = _boot_medians(ra, n_boot, rng), _boot_medians(rb, n_boot, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = mb / ma
        ratio = float(np.median(np.concatenate(rb)) / np.median(np.concatenate(ra)))
    lo, hi = np.nanpercentile(boots, [50 * (1 - confidence), 100 - 50 * (1 - confidence)])
    return ratio, float(lo), float(hi)


@dataclass
class Comparison:
    a: Path
    b: Path
    table: pd.DataFrame
    """One row per (experiment, point, metric) in both sweeps: medians, ratio, interval, verdict."""
    only_a: list[str]
    only_b: list[str]
    env_a: dict[str, str] = field(default_factory=dict)
    """Provenance item -> every distinct value the ok runs of A recorded (:func:`sweep_env_values`)."""
    env_b: dict[str, str] = field(default_factory=dict)

    @property
    def env_diff(self) -> pd.DataFrame:
        """One row per provenance item: A's value(s), B's, and whether they differ (differing first)."""
        return env_diff(self.env_a, self.env_b)

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["verdict"] == "regression"]

    @property
    def flagged(self) -> pd.DataFrame:
        return self.table[self.table["verdict"] != "within noise"]


def compare(a: str | Path, b: str | Path, *, min_change: float = 0.05, confidence: float = 0.99,
            n_boot: int = 2000) -> Comparison:
    """Match the points of sweeps ``a`` and ``b`` and judge every sampled metric (see module doc)."""
    if not 0 < confidence < 1:
        raise ConfigError([f"confidence must be between 0 and 1, got {confidence}"])
    if min_change < 0:
        raise ConfigError([f"min_change must be >= 0, got {min_change}"])
    sa, sb = sweep_samples(a), sweep_samples(b)
    key = ["experiment", "point", "metric"]
    ga = {k: g for k, g in sa.groupby(key, sort=True)}
    gb = {k: g for k, g in sb.groupby(key, sort=True)}
    rows = []
    for k in sorted(set(ga) & set(gb)):
        va, vb = ga[k]["value"].to_numpy(), gb[k]["value"].to_numpy()
        runs_a = [g["value"].to_numpy() for _, g in ga[k].groupby("run_id", sort=True)]
        runs_b = [g["value"].to_numpy() for _, g in gb[k].groupby("run_id", sort=True)]
        ratio, lo, hi = bootstrap_ratio(runs_a, runs_b, n_boot=n_boot, confidence=confidence)
        d = direction(k[2])
        # confident that the change is at least min_change: the whole interval lies beyond it
        beyond = lo > 1 + min_change or hi < 1 / (1 + min_change)
        if not beyond:
            verdict = "within noise"
        elif d == 0:
            verdict = "regression"  # unknown direction: a flagged change is never waved through
        else:
            verdict = "improvement" if (ratio > 1) == (d > 0) else "regression"
        rows.append({"experiment": k[0], "point": ga[k]["label"].iloc[0], "metric": k[2],
                     "a_median": float(np.median(va)), "b_median": float(np.median(vb)), "b_over_a": ratio,
                     "ci_low": lo, "ci_high": hi, "n_a": len(va), "n_b": len(vb), "runs_a": len(runs_a),
                     "runs_b": len(runs_b),
                     "better": {-1: "lower", 1: "higher", 0: "unknown"}[d], "verdict": verdict})
    only = lambda x, y: sorted({f"{e}: {ga_lab}" for (e, p, m), ga_lab in
                                ((k, g["label"].iloc[0]) for k, g in x.items()) if (e, p, m) not in y})
    cols = ["experiment", "point", "metric", "a_median", "b_median", "b_over_a", "ci_low", "ci_high", "n_a", "n_b",
            "runs_a", "runs_b", "better", "verdict"]
    table = pd.DataFrame(rows, columns=cols)
    for exp, idx in table.groupby("experiment").groups.items():  # show only what tells points apart
        parts = [lab.split(", ") for lab in table.loc[idx, "point"]]
        common = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
        table.loc[idx, "point"] = [", ".join(p for p in ps if p not in common) or "(one point)" for ps in parts]
    return Comparison(a=Path(a), b=Path(b), table=table, only_a=only(ga, gb), only_b=only(gb, ga),
                      env_a=sweep_env_values(a), env_b=sweep_env_values(b))


ENV_ITEMS = ("device", "device_names", "gpu_count", "gpu_driver", "cuda", "cpu_model", "cpu_count", "cores", "threads",
             "torch_threads", "jobs", "executor", "load_avg_1m", "python", "torch", "platform", "host", "git_sha",
             "git_dirty")
"""Provenance that can change a timing, in the order the page lists them; packages follow."""


def sweep_env_values(sweep_dir: str | Path) -> dict[str, str]:
    """Provenance item -> every distinct value recorded in the env.json of the sweep's ok runs
    (joined with "; "); ``package NAME`` for each package version. Empty when none was recorded."""
    sweep_dir = resolve_sweep_dir(sweep_dir)
    seen: dict[str, dict[str, None]] = {}
    for run_id, row in manifest_status(sweep_dir).items():
        run_dir = safe_run_dir(sweep_dir, run_id)
        if row.get("status") != "ok" or run_dir is None or not (run_dir / "env.json").is_file():
            continue
        try:
            env = json.loads((run_dir / "env.json").read_text())
        except (ValueError, OSError):  # a torn or unreadable env.json: that run recorded nothing
            continue
        if not isinstance(env, dict):
            continue
        items: dict[str, Any] = {k: env[k] for k in ENV_ITEMS if k in env}
        items.update({f"package {k}": v for k, v in (env.get("packages") or {}).items()})
        for k, v in items.items():
            text = ", ".join(map(str, v)) if isinstance(v, list) else "none" if v is None else str(v)
            seen.setdefault(k, {})[text] = None
    return {k: "; ".join(v) for k, v in seen.items()}


def env_diff(a: dict[str, str], b: dict[str, str]) -> pd.DataFrame:
    """A's and B's provenance side by side; ``differs`` first, then the rest in :data:`ENV_ITEMS` order."""
    order = [k for k in ENV_ITEMS if k in a or k in b] + sorted((set(a) | set(b)) - set(ENV_ITEMS))
    rows = [{"item": k, "A": a.get(k, "not recorded"), "B": b.get(k, "not recorded"),
             "differs": "yes" if a.get(k) != b.get(k) else ""} for k in order]
    df = pd.DataFrame(rows, columns=["item", "A", "B", "differs"])
    return df.sort_values("differs", ascending=False, kind="stable").reset_index(drop=True)


def ratio_figure(c: Comparison, *, min_change: float, confidence: float, max_rows: int = 80) -> Any:
    """B/A per metric with its interval, one row each (flagged ones first when there are more than
    ``max_rows``), on a log axis: 1 = unchanged, the ``min_change`` band shaded."""
    from matplotlib.figure import Figure  # no pyplot: the CLI draws with no GUI backend and no global state

    t = c.table.sort_values("verdict", key=lambda s: s.map({"regression": 0, "improvement": 1}).fillna(2),
                            kind="stable").head(max_rows).iloc[::-1]
    # the whole point on the label, wrapped (a cut label hides which codec or layout a row is)
    names = [textwrap.fill(f"{r.experiment}.{r.metric} | {r.point}", 60, break_long_words=False)
             for r in t.itertuples()]
    lines = sum(n.count("\n") + 1 for n in names)
    fig = Figure(figsize=(11, 1.4 + 0.16 * lines + 0.08 * len(t)))
    ax = fig.subplots()
    colours = {"regression": "tab:red", "improvement": "tab:green", "within noise": "tab:gray"}
    ax.axvspan(1 / (1 + min_change), 1 + min_change, color="0.9", label=f"within ±{min_change:.0%}")
    ax.axvline(1.0, color="k", lw=0.8)
    for i, r in enumerate(t.itertuples()):
        lo, hi = min(r.ci_low, r.b_over_a), max(r.ci_high, r.b_over_a)
        ax.errorbar([r.b_over_a], [i], xerr=[[r.b_over_a - lo], [hi - r.b_over_a]], fmt="o", capsize=3,
                    color=colours.get(r.verdict, "tab:gray"))
    ax.set_yticks(range(len(t)), names, fontsize=7)
    ax.set_ylim(-0.6, len(t) - 0.4)
    for verdict, colour in colours.items():  # legend entries for the verdicts present
        if (t["verdict"] == verdict).any():
            ax.plot([], [], "o", color=colour, label=verdict)
    ax.set_xscale("log")
    _ratio_ticks(ax)
    ax.set(xlabel=f"B/A (median ratio, {confidence:.0%} bootstrap interval; log scale)",
           title=f"B/A per metric: {c.b.name} vs {c.a.name}" + (f" ({max_rows} of {len(c.table)} shown)"
                                                                 if len(c.table) > max_rows else ""))
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _ratio_ticks(ax: Any) -> None:
    """Plain ratio ticks (0.5, 1, 2) on a log x axis: the default 3×10⁻¹ labels are hard to read and
    collide where the axis spans less than a decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    from ryzlab.plots import sig3

    lo, hi = ax.get_xlim()
    fine = [0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0]
    coarse = [m * 10.0 ** e for e in range(-3, 4) for m in (1, 2, 5)]
    ticks = [x for x in (fine if hi / lo <= 3 else coarse) if lo <= x <= hi] or [1.0]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: sig3(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def terminal_table(c: Comparison, confidence: float = 0.99) -> str:
    """Fixed-width text for the terminal: one line per metric, flagged ones marked."""
    from ryzlab.plots import sig3

    head = ["verdict", "B/A", f"{confidence:.0%} CI", "A median", "B median", "metric", "point"]
    lines = []
    for r in c.table.itertuples():
        mark = {"regression": "REGRESSION", "improvement": "improved", "within noise": "-"}[r.verdict]
        lines.append([mark, f"{sig3(r.b_over_a)}x", f"[{sig3(r.ci_low)}, {sig3(r.ci_high)}]", sig3(r.a_median),
                      sig3(r.b_median), f"{r.experiment}.{r.metric}", r.point])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head) - 1)]
    fmt = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[-1])
    out = [fmt(head), fmt(["-" * w for w in widths] + ["-----"])] + [fmt(x) for x in lines]
    n = len(c.table)
    out.append(f"{n} metrics compared: {len(c.regressions)} regressions, "
               f"{int((c.table['verdict'] == 'improvement').sum())} improvements, "
               f"{int((c.table['verdict'] == 'within noise').sum())} within noise")
    for side, pts in (("A", c.only_a), ("B", c.only_b)):
        if pts:
            out.append(f"only in {side} ({len(pts)}): " + "; ".join(pts[:5]) + (" ..." if len(pts) > 5 else ""))
    return "\n".join(out)


def html_page(c: Comparison, *, min_change: float, confidence: float) -> str:
    """One offline page: B/A per metric drawn with its interval, the table (flagged rows coloured),
    how the environments of A and B differ, and the method stated. Every string from the results
    is escaped."""
    from ryzlab.plots import figure_html, table_html

    esc = html.escape
    flagged = c.table.sort_values("verdict", key=lambda s: s.map({"regression": 0, "improvement": 1}).fillna(2))
    # the verdict first: the table is wider than a screen and the last column is the one scrolled off
    order = ["verdict", "experiment", "metric", "point"]
    flagged = flagged[order + [x for x in flagged.columns if x not in order]]
    body = table_html(flagged, f"B/A per metric with its {confidence:.0%} bootstrap interval")
    body = body.replace("<td>regression</td>", "<td style='background:#fdd'>regression</td>") \
               .replace("<td>improvement</td>", "<td style='background:#dfd'>improvement</td>")
    extra = "".join(f"<p>Only in {s}: {esc('; '.join(p))}</p>" for s, p in (("A", c.only_a), ("B", c.only_b)) if p)
    plot = figure_html(ratio_figure(c, min_change=min_change, confidence=confidence)) if len(c.table) else ""
    diff = c.env_diff
    n_diff = int((diff["differs"] == "yes").sum())
    env = ("<h2>Environment: A vs B</h2>"
           + (f"<p><b>{n_diff} item(s) differ</b> (listed first): a change below may come from them, not from "
              "the code.</p>" if n_diff else "<p>Same recorded environment in A and B.</p>")
           + table_html(diff, left=True) if len(diff) else "<h2>Environment: A vs B</h2><p>neither sweep recorded "
           "an env.json</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ryzlab compare: {esc(c.b.name)} vs "
            f"{esc(c.a.name)}</title><style>body{{font-family:sans-serif;margin:24px}}"
            ".ryz-table{border-collapse:collapse;font-size:13px}.ryz-table td,.ryz-table th{padding:3px 8px;"
            "border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}.ryz-table td:nth-child(-n+4),"
            ".ryz-table th:nth-child(-n+4){text-align:left}</style></head><body>"
            f"<h1>ryzlab compare</h1><p>A = {esc(str(c.a))}<br>B = {esc(str(c.b))}</p>"
            f"<p>{len(c.table)} metrics with samples in both; {len(c.regressions)} regressions. A metric is "
            f"flagged when its {confidence:.0%} percentile-bootstrap interval of median(B)/median(A) lies wholly "
            f"beyond a {min_change:.0%} change.</p>{plot}{body}{extra}{env}</body></html>")
