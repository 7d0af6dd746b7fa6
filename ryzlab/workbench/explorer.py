"""An interactive explorer of sweep results: ``ryzlab.explore("results")`` in a notebook.

Pick one or more sweeps, an experiment, a metric, what goes on the x axis, what colours the
series (hue) and what splits the panels (facet), and narrow any swept parameter with a filter
(only the parameters the sweeps varied: a measured metric is not a filter); values read as
written (``0.1``, not ``0.1000000000000001``) and numbers sort as numbers. The plot and the table
below it follow every change, and the plot says which swept parameters it pools (aggregates over)
because they are on no axis, hue or facet. Several sweeps are overlaid: each sweep gets
its own line style, so "same config, two runs" reads at a glance. Built on ipywidgets 8 (works in
JupyterLab and classic Notebook); every value from the results is escaped in the table.
"""
from __future__ import annotations

import ast
import html
import textwrap
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ryzlab.config import ConfigError
from ryzlab.plots import figure_alt, plot_series, sig3, table_html, wide_range
from ryzlab.workbench.report import load_sweep
from ryzlab.workbench.sweep import REPO_ROOT, manifest_status

log = logging.getLogger(__name__)

NONE = "(none)"
AGGS = ("median", "mean", "min", "max", "count")
LINESTYLES = ("-", "--", ":", "-.")
MAX_FILTER_VALUES = 30
HEADLINE = ("attn_us", "step_ms", "tpot_ms", "e2el_ms_p99", "ttft_ms_p99")
"""Default metric, the first the rows hold: attention time, scaling decode step, KV decode step,
orchestrator p99 latency, serving p99 TTFT (what the report's first plot of each section shows)."""


def find_sweeps(results_dir: str | Path) -> dict[str, Path]:
    """name -> folder: ``results_dir`` itself when it is a sweep, else every sweep directly in it."""
    root = Path(results_dir)
    if not root.is_absolute() and not root.is_dir() and (REPO_ROOT / root).is_dir():
        root = REPO_ROOT / root  # a notebook run from notebooks/ with results_dir="results"
    if (root / "manifest.jsonl").is_file():
        return {root.resolve().name: root}
    found = {p.parent.name: p.parent for p in sorted(root.glob("*/manifest.jsonl"))}
    if not found:
        raise ConfigError([f"{root} is not a sweep folder and holds none (no */manifest.jsonl); "
                           "pass a folder written by `ryzlab sweep` or its parent (e.g. results)"])
    return found


def load_frames(sweeps: dict[str, Path]) -> dict[str, dict[str, pd.DataFrame]]:
    """experiment -> sweep -> that sweep's ok rows of the experiment, with a ``sweep`` column."""
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for name, path in sweeps.items():
        data = load_sweep(path)
        for exp, df in data.by_experiment.items():
            out.setdefault(exp, {})[name] = df.assign(sweep=name)
    return out


def swept_parameters(sweeps: dict[str, Path]) -> dict[str, list[str]]:
    """experiment -> the parameters its ok points set to more than one value (the manifest's
    ``params``, over all ``sweeps``): the only columns worth a filter."""
    seen: dict[str, dict[str, set[str]]] = {}
    for path in sweeps.values():
        for row in manifest_status(Path(path)).values():
            if row.get("status") != "ok":
                continue
            for k, v in (row.get("params") or {}).items():
                seen.setdefault(str(row.get("experiment")), {}).setdefault(k, set()).add(repr(v))
    return {e: [k for k, vals in by.items() if len(vals) > 1] for e, by in seen.items()}


def readable(value: Any) -> str:
    """A parameter value as a person writes it: ``0.1`` not ``0.1000000000000001``, ``4`` for 4.0,
    ``[int4, int2]`` for a tuple."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(readable, value)) + "]"
    if isinstance(value, str) and value[:1] in "([" and value[-1:] in ")]":
        # a list stored as its text: '(0.5,)' by one sweep, '[0.5]' by another, the same value
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # reason: not a Python literal, keep the text as it is
            return value
        return readable(parsed) if isinstance(parsed, (tuple, list)) else value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
    return str(value)


def value_order(value: Any) -> tuple:
    """Sort key: numbers by value (256 < 1024 < 4096), then everything else by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


class Explorer:
    """The widgets and the state behind them; ``.ui`` is what a notebook displays.

    Also usable headlessly (tests, scripts): set ``controls[...].value`` and read ``.data``
    (the plotted, aggregated rows), ``.table.value`` (its HTML) and ``.alt`` (the plot's text)."""

    def __init__(self, results_dir: str | Path, *, agg: str = "median") -> None:
        import ipywidgets as w

        self.sweeps = find_sweeps(results_dir)
        self.frames = load_frames(self.sweeps)
        self.swept = swept_parameters(self.sweeps)
        if not self.frames:
            raise ConfigError([f"no ok rows in any sweep of {results_dir}: nothing to explore"])
        names = list(self.sweeps)
        self.controls: dict[str, Any] = {
            "sweeps": w.SelectMultiple(options=names, value=tuple(names[:1]), description="sweeps", rows=min(6, len(names))),
            "experiment": w.Dropdown(description="experiment"),
            "metric": w.Dropdown(description="metric"),
            "x": w.Dropdown(description="x"),
            "hue": w.Dropdown(description="hue"),
            "facet": w.Dropdown(description="facet"),
            "agg": w.Dropdown(options=AGGS, value=agg, description="aggregate"),
        }
        self.filters: dict[str, Any] = {}
        self.filter_box = w.VBox()
        self.plot = w.Output()
        self.table = w.HTML()
        self.status = w.HTML()
        self.data = pd.DataFrame()
        self.pooled_now: dict[str, list[str]] = {}
        self.alt = ""
        self._busy = 0  # nesting depth of _hold(): no redraw while > 0
        c = self.controls
        self.ui = w.VBox([w.HBox([c["sweeps"], w.VBox([c["experiment"], c["metric"], c["agg"]]),
                                  w.VBox([c["x"], c["hue"], c["facet"]])]),
                          w.HTML("<b>filters</b>"), self.filter_box, self.status, self.plot, self.table])
        self.ui.explorer = self  # reachable from the displayed widget
        c["sweeps"].observe(self._on_sweeps, names="value")
        c["experiment"].observe(self._on_experiment, names="value")
        for k in ("metric", "x", "hue", "facet", "agg"):
            c[k].observe(lambda _change: self.refresh(), names="value")
        self._on_sweeps()

    # ------------------------------------------------------------------ state
    def frame(self) -> pd.DataFrame:
        """Rows of the chosen experiment in the chosen sweeps, filters applied."""
        exp = self.controls["experiment"].value
        parts = [df for s, df in self.frames.get(exp, {}).items() if s in self.controls["sweeps"].value]
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        for col, sel in self.filters.items():
            if col in df.columns and len(sel.value) < len(sel.options):
                df = df[df[col].map(readable).isin(sel.value)]
        return df

    def _on_sweeps(self, _change: Any = None) -> None:
        chosen = self.controls["sweeps"].value
        exps = sorted(e for e, by in self.frames.items() if any(s in by for s in chosen))
        with self._hold():
            self.controls["experiment"].options = exps
            if self.controls["experiment"].value not in exps:
                self.controls["experiment"].value = exps[0] if exps else None
        self._on_experiment()

    def _on_experiment(self, _change: Any = None) -> None:
        import ipywidgets as w

        df = self.frame_unfiltered()
        numeric = [c for c in df.select_dtypes("number").columns if df[c].notna().any()]
        varying = [c for c in df.columns if c != "run_id" and df[c].astype(str).nunique() > 1]
        with self._hold():
            c = self.controls
            # measurements only: not the swept parameters (context, batch...) nor the step index
            params = set(self.swept.get(c["experiment"].value, [])) | {"sample", "step"}
            c["metric"].options = [m for m in numeric if m not in params] or numeric
            # a measurement by default: a column that varies within a point, else any varying one
            per_point = [m for m in numeric if m != "sample" and "run_id" in df and
                         (df.groupby("run_id")[m].nunique() > 1).any()]
            # the metric each report section leads with, where the rows hold it (serving: p99 TTFT, not duration_s)
            headline = [m for m in HEADLINE if m in numeric]
            c["metric"].value = (headline or per_point or [m for m in numeric if m in varying and m != "sample"]
                                 or numeric or [None])[0]
            c["x"].options = varying or [NONE]
            # a swept parameter before "sample" (a step index: tpot against it pools every codec into noise)
            swept = [v for v in self.swept.get(c["experiment"].value, []) if v in varying]
            prefer = ([v for v in ("context", "rate", "load", "workers", "world_size") if v in varying] + swept
                      + [v for v in ("sample",) if v in varying])
            c["x"].value = (prefer or varying or [NONE])[0]
            # cases, not measurements: colouring by a measured float would draw one series per value
            hues = [NONE, "sweep"] + [v for v in self.dimensions(df) if v != "sweep" and v in varying]
            c["hue"].options, c["facet"].options = hues, hues
            c["hue"].value = "sweep" if len(self.controls["sweeps"].value) > 1 else NONE
            # simulated and measured rows never share a line: one panel each by default
            c["facet"].value = "mode" if "mode" in varying else NONE
            self.filters = {}
            for col in self.dimensions(df):
                raw = sorted(dict.fromkeys(df[col].dropna()), key=value_order)
                if not 1 < len(raw) <= MAX_FILTER_VALUES:
                    continue
                # one option per readable value ('(0.5,)' and '[0.5]' are one): what frame() matches rows by
                opts = [(v, v) for v in dict.fromkeys(readable(v) for v in raw)]
                if len(opts) < 2:
                    continue
                sel = w.SelectMultiple(options=opts, value=tuple(o[1] for o in opts), description=col,
                                       rows=min(4, len(opts)))
                sel.observe(lambda _change: self.refresh(), names="value")
                self.filters[col] = sel
            self.filter_box.children = list(self.filters.values())
        self.refresh()

    def pooled(self, df: pd.DataFrame) -> dict[str, list[str]]:
        """Swept parameters with several values in ``df`` that are on no axis, hue or facet: the plot
        aggregates over them (``{"dtype": ["float32", "bfloat16"]}``)."""
        c = self.controls
        shown = {c["x"].value, c["hue"].value, c["facet"].value, "sweep"}
        if c["metric"].value in df.columns:  # only rows that hold the metric are pooled into it
            df = df[df[c["metric"].value].notna()]
        out = {}
        for col in self.dimensions(df):
            if col not in shown:
                vals = [v for v in dict.fromkeys(readable(v) for v in sorted(dict.fromkeys(df[col].dropna()),
                                                                          key=value_order)) if v != ""]
                if len(vals) > 1:
                    out[col] = vals
        return out

    def dimensions(self, df: pd.DataFrame) -> list[str]:
        """Columns that name a case rather than measure one: the swept parameters, then text columns
        with a few values that differ inside a point (an orchestrator point holds every policy and
        fault; a serving point holds summary and timeline rows). A plot that pools them says so; each
        gets a filter."""
        swept = [c for c in self.swept.get(self.controls["experiment"].value, []) if c in df.columns]
        text = [c for c in df.columns if c not in swept and c not in ("run_id", "sweep", "experiment")
                and not pd.api.types.is_numeric_dtype(df[c])
                and 1 < df[c].dropna().astype(str).nunique() <= MAX_FILTER_VALUES]
        if "run_id" in df.columns and len(df):
            # only those that differ inside a point: a point's endpoint or layout echoes its parameters
            as_text = pd.DataFrame({c: df[c].astype(str).where(df[c].notna() & df[c].astype(str).ne(""))
                                    for c in text})
            point = [df["sweep"], df["run_id"]] if "sweep" in df.columns else [df["run_id"]]  # ids repeat across sweeps
            within = as_text.groupby(point).nunique().gt(1).any()
            text = [c for c in text if within[c]]
        return swept + text

    def frame_unfiltered(self) -> pd.DataFrame:
        saved, self.filters = self.filters, {}
        try:
            return self.frame()
        finally:
            self.filters = saved

    class _Hold:
        def __init__(self, ex: "Explorer") -> None:
            self.ex = ex

        def __enter__(self) -> None:
            self.ex._busy += 1

        def __exit__(self, *exc: object) -> None:
            self.ex._busy -= 1

    def _hold(self) -> "Explorer._Hold":
        """Batch widget updates: observers do not redraw until the block ends."""
        return Explorer._Hold(self)

    # ------------------------------------------------------------------ output
    def aggregate(self, df: pd.DataFrame) -> pd.DataFrame:
        c = self.controls
        metric, x = c["metric"].value, c["x"].value
        keys = [k for k in dict.fromkeys([c["facet"].value, c["hue"].value, x]) if k and k not in (NONE, metric)]
        if "sweep" in df.columns and len(c["sweeps"].value) > 1 and "sweep" not in keys:
            keys.insert(0, "sweep")
        if not metric or df.empty or metric not in df.columns:
            return pd.DataFrame()
        g = df.groupby(keys, dropna=False)[metric] if keys else df[metric].to_frame().groupby(lambda _: 0)[metric]
        out = g.agg([c["agg"].value, "count"]).reset_index().rename(columns={c["agg"].value: metric, "count": "rows"})
        return out.drop(columns=["index"], errors="ignore")

    def refresh(self) -> None:
        """Recompute the rows, redraw the plot, rewrite the table (called on every change)."""
        if self._busy:
            return
        from IPython.display import clear_output

        df = self.frame()
        self.data = self.aggregate(df)
        self.pooled_now = self.pooled(df)
        c = self.controls
        self.status.value = (f"<small>{len(df)} rows from {df['run_id'].nunique() if 'run_id' in df else 0} points"
                             f" in {html.escape(', '.join(c['sweeps'].value))}</small>")
        self.table.value = table_html(self.data) if len(self.data) else "<p>no rows match</p>"
        with self.plot:
            clear_output(wait=True)
            self.alt = self._draw()

    def _draw(self) -> str:
        import matplotlib.pyplot as plt

        from ryzlab.plots import show_figure

        d, c = self.data, self.controls
        metric, x, hue, facet = c["metric"].value, c["x"].value, c["hue"].value, c["facet"].value
        if d.empty or x == NONE or x not in d.columns:
            return ""
        panels = list(d.groupby(facet, dropna=False)) if facet != NONE else [(None, d)]
        words = lambda by: "; ".join(f"{k} ({', '.join(v[:4])}{' ...' if len(v) > 4 else ''})" for k, v in by.items())
        raw = self.frame() if facet != NONE else None
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        multi = len(c["sweeps"].value) > 1
        numeric_x = pd.api.types.is_numeric_dtype(d[x])
        xs = sorted(d[x].dropna().unique()) if numeric_x else []
        for ax, (fval, part) in zip(axes[0], panels):
            # what this panel pools: a parameter constant within a facet value is not pooled there
            pooled = words(self.pooled(raw[raw[facet].map(readable) == readable(fval)]) if raw is not None
                           else self.pooled_now)
            series = [k for k in dict.fromkeys(["sweep" if multi else None, hue if hue != NONE else None]) if k]
            groups = part.groupby(series, dropna=False) if series else [((), part)]
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                names = dict(zip(series, key))
                style = LINESTYLES[list(c["sweeps"].value).index(names["sweep"]) % 4] if "sweep" in names else "-"
                label = ", ".join(f"{k} {v}" if k != "sweep" else f"sweep {v}" for k, v in names.items()) or metric
                # categories (codec names) joined by a line would read as a trend between them
                plot_series(ax, g[x], g[metric], label, ls=style if numeric_x else "none")
            ax.set(xlabel=x, ylabel=f"{metric} ({c['agg'].value})")
            # wrapped to the 5-inch panel at 9 pt (~55 characters a line): a long list ran off both sides
            ax.set_title(f"{c['experiment'].value}" + (f", {facet} {readable(fval)}" if facet != NONE else "")
                         + ("\n" + textwrap.fill(f"{c['agg'].value} pooled over {pooled}", 55,
                                                  break_long_words=False) if pooled else ""), fontsize=9)
            if pd.api.types.is_numeric_dtype(part[metric]) and wide_range(part[metric]):
                ax.set_yscale("log")
            if 0 < len(xs) <= 10:  # ticks at the swept values: no 1.2 workers, no 2500-token context
                ax.set_xticks(xs, [readable(v) for v in xs])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        alt = figure_alt(fig)
        show_figure(fig, alt)
        return alt


def explore(results_dir: str | Path = "results", *, agg: str = "median") -> Any:
    """An ipywidgets UI over the sweeps in ``results_dir`` (a sweep folder or its parent).

    Returns the top widget (display it, or leave it last in a cell); ``ui.explorer`` is the
    :class:`Explorer` behind it."""
    if agg not in AGGS:
        raise ConfigError([f"agg {agg!r} is not one of {', '.join(AGGS)}"])
    return Explorer(results_dir, agg=agg).ui


__all__ = ["Explorer", "explore", "find_sweeps", "readable", "sig3", "swept_parameters"]
