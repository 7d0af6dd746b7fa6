"""Aggregate a sweep's ok runs and export ``report.html``: no code, images embedded, offline.

    ryzlab report results/demo
      -> results/demo/aggregate.parquet      every ok run's rows, params as columns
      -> notebooks/report.ipynb (papermill)  -> results/demo/report.ipynb
      -> nbconvert HTML, inputs hidden, external <script>/<link> removed -> results/demo/report.html

A results folder is data, never code: the report kernel runs in an empty temporary directory
(so a ``pandas/`` or ``ryzlab/`` folder dropped into the results cannot shadow the installed
package), run ids from the manifest are used as paths only when they are plain folder names of
that sweep, and every string from the results is escaped.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ryzlab.config import ConfigError
from ryzlab.io import read_parquet, write_bytes, write_parquet
from ryzlab.workbench.sweep import KERNEL_NAME, NOTEBOOK_DIR, REPO_ROOT, read_manifest

log = logging.getLogger(__name__)

# Anything that would make the browser reach the network when the report is opened.
_EXTERNAL = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*['\"]?(?:https?:)?//[^>]*>\s*</script>", re.I | re.S),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*['\"]?(?:https?:)?//[^>]*>", re.I),
    # inline scripts that import from a CDN (nbconvert's mermaid loader): reports need no JS
    re.compile(r"<script\b[^>]*>(?:(?!</script>).)*?https?://(?:(?!</script>).)*</script>", re.I | re.S),
]
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
"""What a run id written by ``ryzlab sweep`` looks like (``<notebook>-<hash>``): a plain folder name."""


def safe_run_dir(sweep_dir: Path, run_id: object) -> Path | None:
    """``sweep_dir/run_id`` when ``run_id`` is a plain folder name of this sweep, else None
    (``../x``, ``javascript:...``, absolute paths and hidden names are never followed)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        return None
    return sweep_dir / run_id


def missing(value: object) -> bool:
    """None, NaN and pandas' NA (a missing string is NaN under pandas 3)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


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
    envs: list[dict] | None = None
    """env.json of every run that has one (threads and jobs may differ between points)."""
    unreadable: list[str] = field(default_factory=list)
    """What of the folder could not be read (a corrupted metrics.parquet, a manifest field that
    should be a number and is not, junk manifest lines): listed on the page, never raised."""

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "ok"] if len(self.runs) else self.runs

    @property
    def spec_text(self) -> str | None:
        p = self.sweep_dir / "spec.yaml"
        return p.read_text(errors="replace") if p.is_file() else None


def resolve_sweep_dir(sweep_dir: str | Path) -> Path:
    """``sweep_dir`` as given, else relative to the repository (a notebook run from notebooks/)."""
    p = Path(sweep_dir)
    if not p.is_absolute() and not (p / "manifest.jsonl").is_file() and (REPO_ROOT / p / "manifest.jsonl").is_file():
        return REPO_ROOT / p
    return p


def load_sweep(sweep_dir: str | Path, *, progress: bool = False) -> SweepData:
    """Read the manifest and every ok run of a sweep directory (a tqdm bar over the runs if ``progress``).

    Parameters keep their types: a sequence parameter comes back as a tuple (:func:`ryzlab.io.read_parquet`)."""
    sweep_dir = resolve_sweep_dir(sweep_dir)
    if not (sweep_dir / "manifest.jsonl").is_file():
        have = sorted(p.parent.name for p in sweep_dir.parent.glob("*/manifest.jsonl"))
        raise ConfigError([f"{sweep_dir} holds no manifest.jsonl (not a sweep directory); "
                           f"sweeps in {sweep_dir.parent}: {', '.join(have) or 'none'}"])
    latest, bad_lines = read_manifest(sweep_dir)
    frames, runs, env, envs = [], [], {}, []
    unreadable = [f"{bad_lines} manifest line(s) that are not a JSON object with a run_id"] if bad_lines else []
    items = latest.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=len(latest), desc=f"{sweep_dir.name}: reading runs", unit="run", dynamic_ncols=True)
    for run_id, row in items:
        run_dir = safe_run_dir(sweep_dir, run_id)
        status = row.get("status")
        if run_dir is None:
            status, row = "failed", {**row, "error": "BadRunId",
                                     "message": "the manifest names a run folder that is not a plain folder name "
                                                f"(its status: {row.get('status')}; its message: {row.get('message')})"}
        elif status == "ok" and not (run_dir / "metrics.parquet").is_file():
            status, row = "failed", {**row, "error": "MissingMetrics", "message": "metrics.parquet is missing"}
        df = None
        if status == "ok":
            try:
                df = read_parquet(run_dir / "metrics.parquet")
            except Exception as e:  # noqa: BLE001 - a corrupted file (arrow, OS or decode error): listed, not raised
                status, row = "failed", {**row, "error": "UnreadableMetrics",
                                         "message": f"metrics.parquet could not be read: {type(e).__name__}: {e}"}
                unreadable.append(f"{run_id}: metrics.parquet ({type(e).__name__}: {str(e)[:200]})")
        notebook = f"{run_id}/run.ipynb" if run_dir is not None and (run_dir / "run.ipynb").is_file() else None
        nums = {}
        for name in ("cell", "wall_s", "overhead_s"):
            nums[name] = _number(row.get(name))
            if nums[name] is None and row.get(name) is not None:
                unreadable.append(f"{run_id}: manifest field {name} = {str(row.get(name))[:80]!r} is not a number")
        runs.append({"run_id": str(run_id), "experiment": row.get("experiment"), "status": status,
                     "error": row.get("error"), "message": row.get("message"), **nums,
                     "params": json.dumps(row.get("params", {}), sort_keys=True, default=str),
                     "notebook": notebook})
        if run_dir is not None and (run_dir / "env.json").is_file():
            try:
                e = json.loads((run_dir / "env.json").read_text())
            except (ValueError, OSError):
                e = None
            if isinstance(e, dict):
                envs.append(e)
                if status == "ok" and str(e.get("end", "")) >= str(env.get("end", "")):
                    env = e
        if df is None:
            continue
        df.insert(0, "run_id", run_id)
        if "experiment" not in df.columns:  # a notebook that is not a registered experiment
            df.insert(1, "experiment", row.get("experiment"))
        frames.append(df)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    groups: dict[str, list[pd.DataFrame]] = {}
    for df in frames:
        groups.setdefault(str(df["experiment"].iloc[0]), []).append(df)
    by_experiment = {k: pd.concat(v, ignore_index=True) for k, v in groups.items()}
    cols = ["run_id", "experiment", "status", "error", "message", "cell", "wall_s", "overhead_s", "params", "notebook"]
    return SweepData(sweep_dir=sweep_dir, metrics=metrics, runs=pd.DataFrame(runs, columns=cols), env=env,
                     by_experiment=by_experiment, envs=envs, unreadable=unreadable)


def _number(value: object) -> float | int | None:
    """A manifest number as written (int or finite float), else None (a string, a bool, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _text(value: object, limit: int | None = None) -> str:
    s = "" if missing(value) else str(value)
    return html.escape(s[:limit] if limit else s)


def failures_html(data: SweepData) -> str:
    """Escaped HTML table of failed and timed-out points, each linked to its (partial) notebook.

    Links only ever point at ``<run folder>/run.ipynb`` inside this sweep; a point without a
    notebook (killed before one was saved) says so instead."""
    if data.failed.empty:
        return "<p>No failed or timed-out points.</p>"
    rows = []
    for r in data.failed.itertuples():
        nb = None if missing(r.notebook) else str(r.notebook)
        run_dir = safe_run_dir(data.sweep_dir, r.run_id)
        if nb and run_dir is not None and nb == f"{r.run_id}/run.ipynb":
            link = (f'<a href="{html.escape(nb, quote=True)}">{_text(r.run_id)}</a>'
                    f'<br><small>{"partial " if r.status == "timeout" else ""}notebook</small>')
        else:
            link = f"{_text(r.run_id)}<br><small>no notebook saved</small>"
        cell = _number(r.cell)
        cell = "" if cell is None else int(cell) if float(cell).is_integer() else cell
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            link, _text(r.experiment), _text(r.status), _text(r.error), _text(r.message, 500), _text(cell),
            _text(r.params))) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("run", "experiment", "status", "error", "message", "cell", "params"))
    return (f"<div class='ryz-scroll' style='overflow-x:auto;max-width:100%'><table class='ryz-table'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def unreadable_html(data: SweepData) -> str:
    """Escaped list of what the report could not read (empty when everything was readable)."""
    if not data.unreadable:
        return ""
    items = "".join(f"<li>{_text(u, 400)}</li>" for u in data.unreadable[:200])
    more = f"<p>... and {len(data.unreadable) - 200} more</p>" if len(data.unreadable) > 200 else ""
    return (f"<h3>Could not be read</h3><p>These parts of the results folder were skipped; everything else is "
            f"shown.</p><ul>{items}</ul>{more}")


def strip_external(page: str) -> str:
    """Remove every external script/stylesheet so the page opens offline with no request."""
    for pat in _EXTERNAL:
        page = pat.sub("", page)
    return page


_IMG_NO_ALT = re.compile(r"<img\b(?![^>]*\balt=)", re.I)


def ensure_alt(page: str) -> str:
    """Safety net for images a section displayed without :func:`ryzlab.plots.show_figure`:
    give them alt text that says what they are (sections normally write their own)."""
    return _IMG_NO_ALT.sub('<img alt="figure of this section (no description given by its plot code)" ', page)


@contextmanager
def _kernel_imports_this_ryzlab():
    """The kernel imports the ryzlab this process runs (and PYTHONPATH entries as absolute
    paths): relative entries would otherwise resolve against the kernel's working directory."""
    old = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).resolve().parents[2])
    entries = [str(Path(e).resolve()) for e in (old or "").split(os.pathsep) if e]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([here, *entries]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def failed_sections(nb: Any) -> list[str]:
    """Experiments whose report section raised (report_page marks them), from an executed notebook."""
    text = "".join(str(o.get("data", {}).get("text/html", "")) for c in nb.cells for o in c.get("outputs", []))
    return re.findall(r"class='ryz-section-failed' data-section='([^']*)'", text)


def build_report(sweep_dir: str | Path, *, kernel_name: str = KERNEL_NAME,
                 notebook: str | Path = NOTEBOOK_DIR / "report.ipynb", progress: bool = False) -> Path:
    """Aggregate, execute the report notebook, export offline HTML; returns the HTML path.

    ``progress``: tqdm bars (as ``ryzlab sweep`` shows) over the runs read, then over the report
    notebook's cells as they execute."""
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    sweep_dir = resolve_sweep_dir(sweep_dir).resolve()
    data = load_sweep(sweep_dir, progress=progress)  # raises before anything is written if this is not a sweep
    write_parquet(sweep_dir / "aggregate.parquet", data.metrics)
    executed = sweep_dir / "report.ipynb"
    # the kernel's working directory is on its sys.path: an empty folder, never the results
    from jupyter_client.manager import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        """Keeps the clients it makes: nbclient stops a client's zmq channels only when it created the
        manager itself, so with ours they ran on until garbage collection printed "WARNING traitlets:
        Could not destroy zmq context" after every report."""

        def client(self, **kwargs: Any) -> Any:
            kc = super().client(**kwargs)
            clients.append(kc)
            return kc

    work = Path(tempfile.mkdtemp(prefix="ryzlab-report-"))
    km, clients = None, []
    try:
        with _kernel_imports_this_ryzlab():
            # ipc transport (unix sockets in the private folder): no TCP port, no "without encryption" warning
            km = KernelManager(kernel_name=kernel_name, transport="ipc", ip=str(work / "kernel"))
            pm.execute_notebook(str(notebook), str(executed), parameters={"sweep_dir": str(sweep_dir)},
                                kernel_name=kernel_name, cwd=str(work), km=km,
                                progress_bar={"desc": f"{sweep_dir.name}: report cells", "dynamic_ncols": True}
                                if progress else False)
    finally:
        for kc in clients:
            kc.stop_channels()  # joins the channel threads and destroys the client's zmq context
        if km is not None and km.has_kernel:  # nbclient leaves a kernel it was handed running
            from jupyter_core.utils import run_sync

            run_sync(km.shutdown_kernel)(now=True)
        shutil.rmtree(work, ignore_errors=True)
    nb = nbformat.read(executed, as_version=4)
    failed = failed_sections(nb)
    if failed:  # said where the user looks (the command's output), not only inside the page
        log.warning("report: %d section(s) could not be drawn: %s (the page says why)", len(failed), ", ".join(failed))
    title = f"ryzlab report: {sweep_dir.name}"
    nb.metadata["title"] = title
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    out = write_bytes(sweep_dir / "report.html", ensure_alt(strip_external(body)).encode())
    log.info("report written to %s", out)
    return out
