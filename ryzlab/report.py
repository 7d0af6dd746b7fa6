"""Aggregate a sweep's ok runs and export ``report.html``: no code, images embedded, offline.

    ryzlab report results/demo
      -> results/demo/aggregate.parquet      every ok run's rows, params as columns
      -> notebooks/report.ipynb (papermill)  -> results/demo/report.ipynb
      -> nbconvert HTML, inputs hidden, external <script>/<link> removed -> results/demo/report.html
"""
from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import ConfigError
from .io import write_bytes, write_parquet
from .sweep import KERNEL_NAME, NOTEBOOK_DIR, manifest_status

log = logging.getLogger(__name__)

# Anything that would make the browser reach the network when the report is opened.
_EXTERNAL = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*['\"]?(?:https?:)?//[^>]*>\s*</script>", re.I | re.S),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*['\"]?(?:https?:)?//[^>]*>", re.I),
    # inline scripts that import from a CDN (nbconvert's mermaid loader): reports need no JS
    re.compile(r"<script\b[^>]*>(?:(?!</script>).)*?https?://(?:(?!</script>).)*</script>", re.I | re.S),
]


@dataclass
class SweepData:
    sweep_dir: Path
    metrics: pd.DataFrame
    """Every row of every ok run, with ``run_id`` and the run's params as columns."""
    runs: pd.DataFrame
    """One row per point: run_id, experiment, status, error, message, cell, wall_s, overhead_s."""
    env: dict
    """env.json of the most recent run (python/torch/CUDA, devices, git sha)."""
    by_experiment: dict[str, pd.DataFrame]
    """The ok rows of each experiment on their own: columns and dtypes as the experiment wrote
    them (no NaN-filled columns of other experiments, integers stay integers)."""

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "ok"]


def load_sweep(sweep_dir: str | Path) -> SweepData:
    """Read the manifest and every ok run of a sweep directory."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "manifest.jsonl").is_file():
        have = sorted(p.parent.name for p in sweep_dir.parent.glob("*/manifest.jsonl"))
        raise ConfigError([f"{sweep_dir} holds no manifest.jsonl (not a sweep directory); "
                           f"sweeps in {sweep_dir.parent}: {', '.join(have) or 'none'}"])
    latest = manifest_status(sweep_dir)
    frames, runs, env = [], [], {}
    for run_id, row in latest.items():
        run_dir = sweep_dir / run_id
        status = row.get("status")
        if status == "ok" and not (run_dir / "metrics.parquet").is_file():
            status, row = "failed", {**row, "error": "MissingMetrics", "message": "metrics.parquet is missing"}
        runs.append({"run_id": run_id, "experiment": row.get("experiment"), "status": status,
                     "error": row.get("error"), "message": row.get("message"), "cell": row.get("cell"),
                     "wall_s": row.get("wall_s"), "overhead_s": row.get("overhead_s"),
                     "params": json.dumps(row.get("params", {}), sort_keys=True, default=str),
                     "notebook": f"{run_id}/run.ipynb" if (run_dir / "run.ipynb").is_file() else None})
        if status != "ok":
            continue
        df = pd.read_parquet(run_dir / "metrics.parquet")
        df.insert(0, "run_id", run_id)
        if "experiment" not in df.columns:  # a notebook that is not a registered experiment
            df.insert(1, "experiment", row.get("experiment"))
        frames.append(df)
        if (run_dir / "env.json").is_file():
            e = json.loads((run_dir / "env.json").read_text())
            if e.get("end", "") >= env.get("end", ""):
                env = e
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    groups: dict[str, list[pd.DataFrame]] = {}
    for df in frames:
        groups.setdefault(str(df["experiment"].iloc[0]), []).append(df)
    by_experiment = {k: pd.concat(v, ignore_index=True) for k, v in groups.items()}
    return SweepData(sweep_dir=sweep_dir, metrics=metrics, runs=pd.DataFrame(runs), env=env,
                     by_experiment=by_experiment)


def failures_html(data: SweepData) -> str:
    """Escaped HTML table of failed points, each linked to its executed notebook."""
    if data.failed.empty:
        return "<p>No failed points.</p>"
    rows = []
    for r in data.failed.itertuples():
        link = (f'<a href="{html.escape(r.notebook, quote=True)}">{html.escape(r.run_id)}</a>'
                if r.notebook else html.escape(r.run_id))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            link, html.escape(str(r.experiment)), html.escape(str(r.status)), html.escape(str(r.error)),
            html.escape(str(r.message or ""))[:500], html.escape(str(r.cell)), html.escape(r.params))) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("run", "experiment", "status", "error", "message", "cell", "params"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def strip_external(page: str) -> str:
    """Remove every external script/stylesheet so the page opens offline with no request."""
    for pat in _EXTERNAL:
        page = pat.sub("", page)
    return page


def build_report(sweep_dir: str | Path, *, kernel_name: str = KERNEL_NAME,
                 notebook: str | Path = NOTEBOOK_DIR / "report.ipynb") -> Path:
    """Aggregate, execute the report notebook, export offline HTML; returns the HTML path."""
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    sweep_dir = Path(sweep_dir).resolve()
    data = load_sweep(sweep_dir)  # raises before anything is written if this is not a sweep
    write_parquet(sweep_dir / "aggregate.parquet", data.metrics)
    executed = sweep_dir / "report.ipynb"
    pm.execute_notebook(str(notebook), str(executed), parameters={"sweep_dir": str(sweep_dir)},
                        kernel_name=kernel_name, progress_bar=False, cwd=str(sweep_dir))
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    out = write_bytes(sweep_dir / "report.html", strip_external(body).encode())
    log.info("report written to %s", out)
    return out
