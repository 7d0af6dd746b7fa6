"""The report page, top to bottom: title, what was measured vs simulated, contents, key results
(one table, each row linked to its section), one section per experiment, failed and timed-out
points with their notebooks, and an appendix with the spec and the environment.

``notebooks/report.ipynb`` calls :func:`render` once; everything here is plain HTML built from
escaped strings, so the exported page needs no JavaScript and no network.
"""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import pandas as pd

from ryzlab.plots import report_section, section_id, show_html, table_html
from ryzlab.plots.summary import key_results
from ryzlab.workbench.report import SweepData, failures_html, load_sweep, missing, unreadable_html

log = logging.getLogger(__name__)

CSS = """<style>
.ryz-table{border-collapse:collapse;font-size:13px;margin:4px 0 12px}
.ryz-table th,.ryz-table td{vertical-align:top;border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
.ryz-table th{background:#f3f3f3}
.ryz-table td:first-child,.ryz-table th:first-child{text-align:left}
.ryz-table.ryz-left td,.ryz-table.ryz-left th{text-align:left !important}
.ryz-table.ryz-summary td,.ryz-table.ryz-summary th{white-space:normal;text-align:left !important;max-width:560px}
.ryz-banner{border-left:4px solid #2a6;background:#f4faf6;padding:6px 12px;margin:8px 0}
.ryz-banner.sim{border-color:#c80;background:#fff8ec}
.ryz-toc li{margin:2px 0}
pre.ryz-spec{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}
</style>"""

SIMULATED_EXPERIMENTS = {"orchestrator": "mode"}
"""Experiments that can hold simulated rows, and the column that says which rows are."""


def _esc(v: object) -> str:
    return html.escape("" if missing(v) else str(v))


def simulated_rows(data: SweepData) -> dict[str, int]:
    """experiment -> number of simulated rows (never to be read as measurements)."""
    out = {}
    for exp, col in SIMULATED_EXPERIMENTS.items():
        df = data.by_experiment.get(exp)
        if df is not None and col in df.columns:
            n = int((df[col] == "simulated").sum())
            if n:
                out[exp] = n
    return out


def projected_rows(data: SweepData) -> dict[str, int]:
    """experiment -> number of rows whose ``basis`` is ``projected`` (never to be read as measurements)."""
    out = {}
    for exp, df in data.by_experiment.items():
        if "basis" in df.columns:
            n = int((df["basis"] == "projected").sum())
            if n:
                out[exp] = n
    return out


def header_html(data: SweepData) -> str:
    env = data.env
    n = len(data.runs)
    n_ok = int((data.runs["status"] == "ok").sum()) if n else 0
    n_to = int((data.runs["status"] == "timeout").sum()) if n else 0
    n_fail = n - n_ok - n_to
    dev = env.get("device", "unknown")
    names = ", ".join(map(str, env.get("device_names") or [])) or "unknown"
    lines = [f"<h1>ryzlab report: {_esc(data.sweep_dir.name)}</h1>",
             f"<p>{n} points: {n_ok} ok, {n_fail} failed, {n_to} timed out. Ran on device={_esc(dev)} "
             f"({_esc(names)}); git {_esc(str(env.get('git_sha'))[:10])}{' (dirty)' if env.get('git_dirty') else ''}; "
             f"python {_esc(env.get('python'))}, torch {_esc(env.get('torch'))}; host {_esc(env.get('host'))}"
             + "".join(f"; {k} {_esc(env[k])}" for k in ("jobs", "threads") if k in env) + ".</p>"]
    sims = simulated_rows(data)
    projected = projected_rows(data)
    measured = (f"Every figure and table is measured on device={_esc(dev)}"
                + (" (no GPU on this machine: ranks and workers were CPU processes)" if dev == "cpu" else "")
                + (" apart from the projected rows above" if projected else ""))
    if projected:  # a projection on named hardware is never read as this machine's measurement
        which = "; ".join(f"{_esc(e)}: {k} rows with basis=projected" for e, k in projected.items())
        lines.append(f"<div class='ryz-banner sim'><b>Projected rows</b> ({which}) are not measurements: they come "
                     "from ryzlab's cost model of named hardware, calibrated on published or measured figures; "
                     "their section shows the calibration and its validation error beside them.</div>")
    if sims:
        which = "; ".join(f"{_esc(e)}: {k} rows with mode=simulated" for e, k in sims.items())
        lines.append(f"<div class='ryz-banner sim'>{measured}, <b>except simulated rows</b> ({which}): these "
                     "come from a model of the workers, not from a measurement; their plots are titled "
                     "'simulated' and drawn dashed with hollow markers.</div>")
    else:
        lines.append(f"<div class='ryz-banner'>{measured}. Quantities computed from bookkeeping (bytes from the "
                     "cache ledger, communication formulas) are labelled as such.</div>")
    return "\n".join(lines)


def toc_html(experiments: list[str]) -> str:
    items = ["<li><a href='#summary'>Key results</a></li>"]
    items += [f"<li><a href='#{section_id(e)}'>{_esc(e)}</a></li>" for e in experiments]
    items += ["<li><a href='#failed'>Failed and timed-out points</a></li>",
              "<li><a href='#appendix'>Appendix: spec and environment</a></li>"]
    return f"<h2>Contents</h2><ol class='ryz-toc'>{''.join(items)}</ol>"


def summary_html(data: SweepData) -> str:
    rows = []
    for exp, df in data.by_experiment.items():
        for r in key_results(exp, df):
            rows.append(f"<tr><td><a href='#{section_id(exp)}'>{_esc(exp)}</a></td><td>{_esc(r['result'])}</td>"
                        f"<td>{_esc(r['value'])}</td><td>{_esc(r['basis'])}</td></tr>")
    if not rows:
        rows.append("<tr><td colspan=4>no ok points: nothing to summarize (see the failed points)</td></tr>")
    return ("<h2 id='summary'>Key results</h2><div class='ryz-scroll' style='overflow-x:auto;max-width:100%'>"
            "<table class='ryz-table ryz-summary'><thead><tr><th>experiment</th><th>result</th><th>value</th>"
            f"<th>basis</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def environment(data: SweepData) -> pd.DataFrame:
    """One row per provenance item, every distinct value the sweep's runs recorded."""
    envs = data.envs or ([data.env] if data.env else [])
    keys = ["device", "device_names", "gpu_count", "gpu_driver", "cuda", "cpu_model", "cpu_count", "threads",
            "torch_threads", "jobs", "python", "torch", "platform", "host", "git_sha", "git_dirty"]
    rows = []
    for k in keys + sorted({k for e in envs for k in e} - set(keys) - {"packages", "start", "end", "run_id"}):
        vals = list(dict.fromkeys("none" if e[k] is None else e[k] if isinstance(e[k], str) else
                                  ", ".join(map(str, e[k])) if isinstance(e[k], list) else json.dumps(e[k], default=str)
                                  for e in envs if k in e))
        if vals:
            rows.append({"item": k, "value": "; ".join(vals)})
    thr = [df["torch_threads"] for df in data.by_experiment.values() if "torch_threads" in df.columns]
    if thr and not any(r["item"] == "torch_threads" for r in rows):
        vals = sorted({int(v) for s in thr for v in s.dropna()})
        rows.append({"item": "torch_threads (per point, from the metrics)", "value": ", ".join(map(str, vals))})
    for item, word in (("threads", "thread"), ("jobs", "job")):
        if not any(word in r["item"] for r in rows):
            rows.append({"item": item, "value": "not recorded by this sweep's version"})
    pkgs: dict[str, set] = {}
    for e in envs:
        for name, ver in (e.get("packages") or {}).items():
            pkgs.setdefault(str(name), set()).add(str(ver))
    for name in sorted(pkgs):
        rows.append({"item": f"package {name}", "value": ", ".join(sorted(pkgs[name]))})
    return pd.DataFrame(rows, columns=["item", "value"])


def appendix_html(data: SweepData) -> str:
    spec = data.spec_text
    parts = ["<h2 id='appendix'>Appendix: spec and environment</h2>", "<h3>Spec</h3>",
             f"<pre class='ryz-spec'>{html.escape(spec)}</pre>" if spec else "<p>no spec.yaml in this sweep folder</p>",
             "<h3>Environment (every distinct value recorded by the runs)</h3>", table_html(environment(data), left=True)]
    # non-numbers were set aside (and listed) by load_sweep; coerce again for a hand-made SweepData
    o = pd.to_numeric(data.runs["overhead_s"], errors="coerce").dropna() if len(data.runs) else pd.Series([])
    if len(o):
        parts.append(f"<p>Per-point sweep overhead (kernel start, parameter injection, imports, saving): mean "
                     f"{o.mean():.2f} s, max {o.max():.2f} s over {len(o)} points.</p>")
    return "\n".join(parts)


def repeat_spread(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Points run ``repeat: N`` times: per point (its parameters without ``repeat``) and timing
    metric, the median of each repeat's median, the lowest and highest of them, and
    (highest - lowest) / median."""
    from ryzlab.samples import TIMING

    if "repeat" not in df.columns or df["repeat"].nunique() < 2:
        return pd.DataFrame()
    def point(params: str) -> str:
        p = {k: v for k, v in json.loads(params).items() if k != "repeat"}
        return ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
    labels = {r.run_id: point(r.params) for r in runs.itertuples()}
    df = df.assign(point=df["run_id"].map(labels))
    timings = [c for c in df.select_dtypes("number").columns if TIMING.search(c)]
    rows = []
    for metric in timings:
        per = df.groupby(["point", "repeat"], dropna=False)[metric].median().reset_index()
        agg = per.groupby("point", dropna=False)[metric].agg(["median", "min", "max", "count"]).reset_index()
        agg.insert(1, "metric", metric)
        rows.append(agg.rename(columns={"count": "repeats"}))
    if not rows:
        return pd.DataFrame()
    out = pd.concat(rows, ignore_index=True)
    out["spread"] = (out["max"] - out["min"]) / out["median"]
    return out[out["repeats"] > 1].reset_index(drop=True)


def render(sweep_dir: str | Path) -> SweepData:
    """Display the whole report in the running notebook; returns the loaded sweep."""
    data = load_sweep(sweep_dir)
    show_html(CSS + header_html(data) + toc_html(list(data.by_experiment)) + summary_html(data))
    for experiment, df in data.by_experiment.items():
        show_html(f"<h2 id='{section_id(experiment)}'>{_esc(experiment)}</h2>")
        try:
            report_section(experiment, df)
            spread = repeat_spread(df, data.runs)
            if len(spread):
                show_html(table_html(spread, "Spread over repeats: each repeat's median, then their median, lowest, "
                                             "highest and (highest - lowest) / median"))
        except Exception as e:  # noqa: BLE001 - one section's plot bug must not cost the whole report
            log.exception("section %s failed", experiment)
            import matplotlib.pyplot as plt

            plt.close("all")  # a half-drawn figure would otherwise show, unlabelled, at the end of the cell
            show_html(f"<p class='ryz-section-failed' data-section='{_esc(experiment)}'>"
                      f"<b>This section could not be drawn</b>: {_esc(type(e).__name__)}: {_esc(e)}. "
                      "Its rows are in aggregate.parquet.</p>")
    show_html("<h2 id='failed'>Failed and timed-out points</h2>" + failures_html(data) + unreadable_html(data))
    show_html(appendix_html(data))
    return data
