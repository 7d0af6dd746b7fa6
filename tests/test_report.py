"""Report, compare and explorer on sweep folders written here by hand (hostile ones included).

Only the tests that build the HTML start a kernel; the rest read folders directly."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ryzlab.cli import main
from ryzlab.workbench.compare import bootstrap_ratio, compare, direction
from ryzlab.io import append_jsonl, write_json, write_parquet
from ryzlab.plots import human, human_bytes, sig3
from ryzlab.workbench.report import build_report, failures_html, load_sweep
from ryzlab.samples import samples_from_metrics

SPEC = "name: hand\nnotebook: attention_bench\ngrid:\n  context: [64, 128]\n"


def attn_rows(context: int, dtype: str, times: np.ndarray) -> pd.DataFrame:
    n = len(times)
    kv = 2 * 2 * context * 64 * (4 if dtype == "float32" else 2)
    return pd.DataFrame({
        "experiment": "attention_bench", "sample": range(n), "attn_us": times, "kv_bytes": kv,
        "achieved_gbps": kv / times / 1e3, "median_attn_us": float(np.median(times)), "copy_gbps": 10.0,
        "frac_of_copy_bw": kv / times / 1e3 / 10.0, "device": "cpu", "device_name": "Test CPU", "torch_threads": 1,
        "context": context, "batch": 2, "dtype": dtype, "n_heads": 8, "n_kv_heads": 2, "head_dim": 64,
    })


def make_sweep(root: Path, points: dict[str, pd.DataFrame], extra: list[dict] = (), *,
               store_samples: bool = True) -> Path:
    """A sweep folder as `ryzlab sweep` writes it: manifest, run folders, env.json, spec.yaml."""
    root.mkdir(parents=True)
    (root / "spec.yaml").write_text(SPEC)
    for run_id, df in points.items():
        params = {"context": int(df["context"].iloc[0]), "dtype": str(df["dtype"].iloc[0])}
        if "repeat" in df.columns:
            params["repeat"] = int(df["repeat"].iloc[0])
        write_parquet(root / run_id / "metrics.parquet", df)
        if store_samples:
            write_parquet(root / run_id / "samples.parquet", samples_from_metrics(df, list(params)))
        write_json(root / run_id / "env.json", {"device": "cpu", "device_names": ["Test CPU"], "python": "3.x",
                                                "torch": "2.x", "cpu_model": "Test CPU", "end": "2026-01-01",
                                                "packages": {"pandas": pd.__version__}, "threads": 1, "jobs": 2})
        append_jsonl(root / "manifest.jsonl", {"run_id": run_id, "experiment": "attention_bench", "status": "ok",
                                               "params": params, "wall_s": 1.0, "overhead_s": 0.5})
    for row in extra:
        append_jsonl(root / "manifest.jsonl", row)
    return root


def grid(seed: int, scale: dict[str, float] | None = None, n_points: int = 10) -> dict[str, pd.DataFrame]:
    """``n_points`` x 2 dtypes; attn_us per step lognormal around a per-point level (same levels
    for every seed: a second run of the same sweep)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_points):
        for dtype in ("float32", "bfloat16"):
            run_id = f"attention_bench-{i:02d}{dtype[:2]}"
            level = 50.0 * (i + 1) * (2 if dtype == "bfloat16" else 1)
            times = level * rng.lognormal(0.0, 0.1, size=30) * (scale or {}).get(run_id, 1.0)
            out[run_id] = attn_rows(64 * (i + 1), dtype, times)
    return out


# ----------------------------------------------------------------------------- formats
def test_human_numbers():
    assert sig3(80925.3) == "80,900" and sig3(0.012345) == "0.0123" and sig3(1.5) == "1.5" and sig3(0.5) == "0.5"
    assert sig3(12.34) == "12.3" and sig3(2.5e-5) == "2.5e-05" and sig3(3.2e7) == "3.2e+07"
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 2**20) == "3 MiB"
    assert human(1536, "kv_bytes") == "1.5 KiB" and human(float("nan"), "x") == "–" and human(True) == "yes"
    assert human(123456, "tokens") == "123,456" and human(0.333333, "ratio") == "0.333"


# ----------------------------------------------------------------------------- samples
def test_samples_keep_timings_that_vary_per_step_only():
    df = attn_rows(64, "float32", np.array([10.0, 12.0, 11.0]))
    s = samples_from_metrics(df, ["context", "dtype", "batch"])
    assert set(s["metric"]) == {"attn_us"}, "derived and constant columns are not samples"
    assert list(s["value"]) == [10.0, 12.0, 11.0] and list(s["sample"]) == [0, 1, 2]
    assert {"context", "dtype", "batch", "device"} <= set(s.columns)
    assert samples_from_metrics(df.drop(columns="sample")).empty


# ----------------------------------------------------------------------------- compare
def test_compare_same_sweep_twice_flags_at_most_one_of_20(tmp_path):
    a = make_sweep(tmp_path / "A", grid(1))
    b = make_sweep(tmp_path / "B", grid(2))
    c = compare(a, b)
    assert len(c.table) == 20 and set(c.table["metric"]) == {"attn_us"}
    assert len(c.flagged) <= 1, c.table[["point", "b_over_a", "ci_low", "ci_high"]]
    assert c.only_a == [] and c.only_b == []


def test_compare_flags_one_metric_scaled_by_1_3(tmp_path):
    a = make_sweep(tmp_path / "A", grid(1))
    b = make_sweep(tmp_path / "B", grid(2, {"attention_bench-03fl": 1.3}))
    c = compare(a, b)
    flagged = c.flagged
    assert list(flagged["point"].str.contains("context=256, dtype=float32")) == [True]
    (row,) = flagged.itertuples()
    assert row.verdict == "regression" and 1.2 < row.b_over_a < 1.4 and row.ci_low > 1.0
    html_out = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--html", str(html_out)]) == 0
    assert main(["compare", str(a), str(b), "--html", str(html_out), "--fail-on-regression"]) == 1
    assert main(["compare", str(a), str(a), "--html", str(html_out), "--fail-on-regression"]) == 0
    assert "REGRESSION" not in html_out.read_text() and "regression</td>" not in html_out.read_text()  # A vs A
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    empty = make_sweep(tmp_path / "E", {}, extra=[{"run_id": "attention_bench-x", "experiment": "attention_bench",
                                                   "status": "failed", "params": {"context": 64}}])
    assert main(["compare", str(a), str(empty), "--html", str(html_out)]) == 0
    assert main(["compare", str(a), str(empty), "--html", str(html_out), "--fail-on-regression"]) == 1


def repeated_grid(seed: int, repeats: int = 3) -> dict[str, pd.DataFrame]:
    """Like :func:`grid`, each point run ``repeats`` times; every run (process) has its own
    level, drawn around the point's (between-process drift 15%, step noise 5%)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(10):
        for dtype in ("float32", "bfloat16"):
            for r in range(repeats):
                level = 50.0 * (i + 1) * (2 if dtype == "bfloat16" else 1) * rng.lognormal(0.0, 0.15)
                df = attn_rows(64 * (i + 1), dtype, level * rng.lognormal(0.0, 0.05, size=30))
                out[f"attention_bench-{i:02d}{dtype[:2]}r{r}"] = df.assign(repeat=r)
    return out


# slow (issue 24: 221 s on a loaded machine, a two-level bootstrap of 20 points x 5 runs, four times):
# `make test-slow`; one-level resampling and flagging stay in the fast compare tests
@pytest.mark.slow
def test_compare_resamples_repeats_so_drift_between_processes_is_not_flagged(tmp_path, monkeypatch):
    import ryzlab.workbench.compare as cmp

    a = make_sweep(tmp_path / "A", repeated_grid(1, repeats=5))
    b = make_sweep(tmp_path / "B", repeated_grid(2, repeats=5))
    c = compare(a, b)
    assert len(c.table) == 20 and (c.table["runs_a"] == 5).all() and (c.table["n_a"] == 150).all()
    assert len(c.flagged) <= 1, c.table[["point", "b_over_a", "ci_low", "ci_high"]]
    # the same data with all steps of a side pooled as if from one process: false alarms
    one_level = cmp.bootstrap_ratio
    monkeypatch.setattr(cmp, "bootstrap_ratio", lambda ra, rb, **kw: one_level(np.concatenate(ra), np.concatenate(rb), **kw))
    assert len(compare(a, b).flagged) >= 4
    monkeypatch.undo()
    slower = {k: df.assign(attn_us=df["attn_us"] * 1.5) if k.startswith("attention_bench-03fl") else df
              for k, df in repeated_grid(2, repeats=5).items()}
    c2 = compare(a, make_sweep(tmp_path / "B2", slower))
    assert "context=256, dtype=float32" in list(c2.flagged["point"]) and len(c2.flagged) <= 2


def test_compare_reads_old_runs_without_samples_and_matches_by_parameters(tmp_path):
    a = make_sweep(tmp_path / "A", grid(1, n_points=2), store_samples=False)
    pts = grid(2, n_points=3)
    b = make_sweep(tmp_path / "B", pts)
    c = compare(a, b)
    assert len(c.table) == 4 and len(c.only_b) == 2  # context 192 (2 dtypes) exists only in B
    assert all("context=192" in p for p in c.only_b)


def test_compare_matches_points_whose_versions_wrote_columns_in_another_order(tmp_path):
    """The kv_compression points of the demo before and after the consolidation did not match:
    the same identifying columns came in another order."""
    pts_a = grid(1, n_points=2)
    pts_b = {k: v.assign(zeta="x", alpha=1)[list(reversed(v.assign(zeta="x", alpha=1).columns))]
             for k, v in grid(2, n_points=2).items()}
    pts_a = {k: v.assign(zeta="x", alpha=1) for k, v in pts_a.items()}
    c = compare(make_sweep(tmp_path / "A", pts_a), make_sweep(tmp_path / "B", pts_b))
    assert len(c.table) == 4 and not c.only_a and not c.only_b


def test_bootstrap_interval_and_direction():
    rng = np.random.default_rng(0)
    a = rng.normal(100, 5, 50)
    r, lo, hi = bootstrap_ratio(a, a * 2)
    assert r == pytest.approx(2.0) and 1.85 < lo < 2.0 < hi < 2.15  # A and B resampled independently
    r, lo, hi = bootstrap_ratio(a, rng.normal(100, 5, 50))
    assert lo < 1 < hi
    assert direction("attn_us") == -1 and direction("tpot_ms_p99") == -1 and direction("achieved_gbps") == 1
    assert direction("request_throughput") == 1 and direction("mystery") == 0


# ----------------------------------------------------------------------------- report pieces
def hostile_sweep(tmp_path: Path) -> Path:
    root = make_sweep(tmp_path / "hostile", grid(1, n_points=2), extra=[
        {"run_id": "javascript:alert(1)", "experiment": "attention_bench", "status": "failed", "error": "X",
         "message": "<script>alert(2)</script>", "params": {"context": 1}},
        {"run_id": "attention_bench-timeout", "experiment": "attention_bench", "status": "timeout",
         "error": "Timeout", "message": "point exceeded --timeout 5 s", "cell": None, "params": {"context": 2}},
        {"run_id": "attention_bench-failed", "experiment": "attention_bench", "status": "failed",
         "error": "ValueError", "message": "boom", "cell": 3, "params": {"context": 3}},
        {"run_id": "../outside", "experiment": "attention_bench", "status": "ok", "params": {"context": 4}},
    ])
    (root / "attention_bench-failed").mkdir()
    (root / "attention_bench-failed" / "run.ipynb").write_text("{}")
    marker = tmp_path / "HOSTILE_CODE_RAN"
    for pkg in ("pandas", "ryzlab", "matplotlib", "IPython"):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({pkg!r})\nraise SystemExit(3)\n")
    return root


def test_failures_table_survives_timeouts_and_links_only_run_folders(tmp_path):
    root = hostile_sweep(tmp_path)
    data = load_sweep(root)
    assert data.runs["notebook"].isna().sum() >= 2  # NaN under pandas 3: must not reach html.escape
    page = failures_html(data)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs == ["attention_bench-failed/run.ipynb"]
    assert "javascript:alert(1)" in page and "<script>" not in page and "&lt;script&gt;" in page
    assert "attention_bench-timeout" in page and "no notebook saved" in page
    bad = data.runs.set_index("run_id").loc["../outside"]
    assert bad["status"] == "failed" and bad["error"] == "BadRunId"


@pytest.mark.timeout(300)
def test_report_of_hostile_sweep_with_failed_and_timed_out_points(tmp_path):
    root = hostile_sweep(tmp_path)
    out = build_report(root)
    page = out.read_text()
    assert not (tmp_path / "HOSTILE_CODE_RAN").exists(), "a package in the results folder was imported"
    assert "<title>ryzlab report: hostile</title>" in page
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert imgs and all(re.search(r'\balt="[^"]{10,}"', i) for i in imgs)
    assert not re.search(r"""href\s*=\s*["']?\s*javascript:""", page, re.I)
    for text in ("Key results", "Contents", "Appendix: spec and environment", "notebook: attention_bench",
                 "attention_bench-timeout", "timeout", "boom", "package pandas", "overflow-x:auto"):
        assert text in page, text
    # the key results row links to its section, and the section exists
    assert 'href="#exp-attention_bench"' in page and 'id="exp-attention_bench"' in page


# ----------------------------------------------------------------------------- explorer
def test_explorer_builds_and_follows_widget_changes(tmp_path):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    import ryzlab

    results = tmp_path / "results"
    make_sweep(results / "A", grid(1, n_points=3))
    make_sweep(results / "B", grid(2, n_points=3, scale={"attention_bench-00fl": 2.0}))
    ui = ryzlab.explore(results)
    ex = ui.explorer
    c = ex.controls
    assert c["experiment"].value == "attention_bench" and c["metric"].value == "attn_us" and c["x"].value == "context"
    assert set(ex.data["context"]) == {64, 128, 192} and "sweep" not in ex.data.columns
    c["sweeps"].value = ("A", "B")  # overlay: one series per sweep
    assert set(ex.data["sweep"]) == {"A", "B"} and "series: sweep A" in ex.alt and "sweep B" in ex.alt
    a64 = ex.data[(ex.data.sweep == "A") & (ex.data.context == 64)]["attn_us"]
    b64 = ex.data[(ex.data.sweep == "B") & (ex.data.context == 64)]["attn_us"]
    assert len(a64) == 1 and float(b64.iloc[0]) > 1.3 * float(a64.iloc[0])  # bfloat16 + float32 x2 median
    c["hue"].value = "dtype"
    assert {"dtype", "sweep"} <= set(ex.data.columns) and len(ex.data) == 12
    ex.filters["dtype"].value = ("float32",)
    assert set(ex.data["dtype"]) == {"float32"} and len(ex.data) == 6
    assert "bfloat16" not in ex.table.value
    c["facet"].value = "dtype"
    c["agg"].value = "max"
    c["metric"].value = "achieved_gbps"
    assert "achieved_gbps" in ex.data.columns and "achieved_gbps (max)" in ex.alt
    from ipywidgets.embed import embed_data  # the widget tree serializes as JupyterLab receives it

    state = embed_data(views=[ui])["manager_state"]["state"]
    assert any(w["state"].get("description") == "metric" for w in state.values())
    with pytest.raises(Exception, match="not a sweep folder"):
        ryzlab.explore(tmp_path / "empty-nothing")


# ----------------------------------------------------------------------------- a real sweep
@pytest.mark.timeout(600)
# slow (issue 24: ~100 s, a 60 s --timeout waited out): `make test-slow`; the pieces are covered fast by
# test_report_of_hostile_sweep_with_failed_and_timed_out_points and test_sweep.py's timeout test
@pytest.mark.slow
def test_real_sweep_with_failed_and_timed_out_points_reports(tmp_path):
    """ryzlab sweep with a point that raises and one killed by --timeout, then ryzlab report:
    the report is built, lists both, and links the timed-out point's partial notebook."""
    import yaml

    from ryzlab.workbench.sweep import run_sweep

    fixtures = Path(__file__).parent / "fixtures"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "rough", "experiments": [
        {"notebook": "attention_bench", "grid": {"context": [16, 32]},
         "fixed": {"iters": 3, "warmup": 0, "copy_mib": 1, "batch": 1, "threads": 1}},
        {"notebook": str(fixtures / "points.ipynb"), "zip": {"x": [1, 2, 3], "sleep_s": [0.0, 0.0, 600.0]},
         "fixed": {"fail_at": 2}}]}))
    out = tmp_path / "rough"
    summary = run_sweep(spec, jobs=2, out=out, timeout=60, progress=False)
    assert (summary.ok, summary.failed, summary.timeout) == (3, 1, 1)
    data = load_sweep(out)
    timed_out = data.runs[data.runs["status"] == "timeout"].iloc[0]
    assert timed_out["notebook"] == f"{timed_out['run_id']}/run.ipynb", "the partial notebook is kept"
    assert not (out / timed_out["run_id"] / "metrics.parquet").exists()
    assert (out / timed_out["run_id"] / "samples.parquet").exists() is False
    for run_id in data.runs.loc[data.runs["experiment"] == "attention_bench", "run_id"]:
        s = pd.read_parquet(out / run_id / "samples.parquet")
        assert set(s["metric"]) == {"attn_us"} and len(s) == 3 and {"context", "dtype"} <= set(s.columns)
    page = build_report(out).read_text()
    assert f'href="{timed_out["run_id"]}/run.ipynb"' in page and "partial" in page
    assert "boom at x=2" in page and "1 failed, 1 timed out" in page


def test_repeat_spread_per_point():
    from ryzlab.workbench.report_page import repeat_spread

    df = pd.DataFrame({"run_id": ["a"] * 3 + ["a2"] * 3 + ["b"] * 3 + ["b2"] * 3, "context": [64] * 6 + [128] * 6,
                       "repeat": [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3, "sample": [0, 1, 2] * 4,
                       "attn_us": [10, 11, 12, 20, 21, 22, 5, 5, 5, 6, 6, 6.0], "kv_bytes": 1})
    runs = pd.DataFrame({"run_id": ["a", "a2", "b", "b2"],
                         "params": [json.dumps({"context": c, "repeat": r}) for c in (64, 128) for r in (0, 1)]})
    s = repeat_spread(df, runs).set_index("point")
    assert list(s["metric"]) == ["attn_us", "attn_us"]  # kv_bytes is not a timing
    assert s.loc["context=64", ["median", "min", "max", "repeats"]].tolist() == [16.0, 11.0, 21.0, 2]
    assert s.loc["context=128", "spread"] == pytest.approx(1 / 5.5)
    assert repeat_spread(df.drop(columns="repeat"), runs).empty


@pytest.mark.timeout(300)
def test_explore_notebook_opens_the_explorer(tmp_path):
    """notebooks/explore.ipynb, run by a real kernel, outputs the widget (a widget view)."""
    import nbformat
    import papermill as pm

    make_sweep(tmp_path / "results" / "A", grid(1, n_points=2))
    nb_path = Path(__file__).resolve().parent.parent / "ryzlab" / "notebooks" / "explore.ipynb"
    out = tmp_path / "explore.ipynb"
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    # ipc transport, as the library's own kernels (workbench.point, workbench.report): over TCP the kernel's
    # five ports are picked free, released, then bound by the kernel, a race with every other process
    # opening ports (the suite's servers and gloo ranks); a lost reply makes nbclient wait forever. Seen
    # once in CI (300 s timeout, the kernel alive, no reply; not reproduced in 40 runs, so the race is
    # the likely cause, not a proven one)
    km = AsyncKernelManager(kernel_name="ryzlab", transport="ipc", ip=str(tmp_path / "kernel"))
    try:
        pm.execute_notebook(str(nb_path), str(out), parameters={"results_dir": str(tmp_path / "results")},
                            kernel_name="ryzlab", progress_bar=False, cwd=str(tmp_path), km=km)
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it was handed running
            run_sync(km.shutdown_kernel)(now=True)
    outputs = [o for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert not any(o.get("output_type") == "error" for o in outputs)


def test_page_of_a_sweep_where_every_point_failed(tmp_path, monkeypatch):
    import ryzlab.workbench.report_page as page

    root = tmp_path / "allbad"
    root.mkdir()
    append_jsonl(root / "manifest.jsonl", {"run_id": "points-1", "experiment": "points", "status": "timeout",
                                           "error": "Timeout", "message": "killed", "params": {"x": 1}})
    shown: list[str] = []
    monkeypatch.setattr(page, "show_html", shown.append)
    data = page.render(root)
    text = "".join(shown)
    assert data.metrics.empty and "no ok points" in text and "points-1" in text and "0 ok, 0 failed, 1 timed out" in text
    assert "no spec.yaml" in text and "not recorded by this sweep" in text
    write_parquet(tmp_path / "aggregate.parquet", data.metrics)  # what build_report writes first


def test_page_shows_what_is_readable_and_lists_what_is_not(tmp_path, monkeypatch):
    """Non-numeric manifest fields, a corrupted metrics.parquet and junk manifest lines: the page
    still renders the readable points and lists (escaped) what it could not read."""
    import ryzlab.workbench.report_page as page

    root = make_sweep(tmp_path / "junk", grid(1, n_points=2), extra=[
        {"run_id": "attention_bench-failed", "experiment": "attention_bench", "status": "failed",
         "error": "ValueError", "message": "boom", "cell": "<b>x</b>", "wall_s": "<i>w</i>", "params": {"context": 3}},
        {"run_id": "attention_bench-00fl", "experiment": "attention_bench", "status": "ok", "params": {"context": 64},
         "wall_s": 1.0, "overhead_s": "x"},
    ])
    (root / "attention_bench-01bf" / "metrics.parquet").write_bytes(b"PAR1 not a parquet file <script>")
    with (root / "manifest.jsonl").open("a") as f:
        f.write('7\n["a"]\n{"run_id": ["not", "a", "name"]}\n')
    shown: list[str] = []
    monkeypatch.setattr(page, "show_html", shown.append)
    data = page.render(root)
    text = "".join(shown)
    assert set(data.metrics["run_id"]) == {"attention_bench-00fl", "attention_bench-00bf", "attention_bench-01fl"}
    runs = data.runs.set_index("run_id")
    assert runs.loc["attention_bench-01bf", "error"] == "UnreadableMetrics"
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text and "<i>w</i>" not in text
    assert "<script>" not in text and "id='exp-attention_bench'" in text.replace('"', "'")
    assert "Could not be read" in text
    for needle in ("attention_bench-01bf", "metrics.parquet", "overhead_s", "&#x27;x&#x27;", "cell", "wall_s",
                   "3 manifest line"):
        assert needle in text.split("Could not be read")[1], needle
    assert "mean 0.50 s" in text  # the readable overheads still give the figure


def test_default_paths_resolve_from_the_repository_when_run_from_notebooks(tmp_path, monkeypatch):
    """report.ipynb's sweep_dir="results/demo" and explore.ipynb's "results" work from notebooks/."""
    import ryzlab.workbench.explorer as explorer
    import ryzlab.workbench.report as report

    repo = tmp_path / "repo"
    make_sweep(repo / "results" / "demo", grid(1, n_points=1))
    (repo / "notebooks").mkdir()
    monkeypatch.chdir(repo / "notebooks")
    monkeypatch.setattr(report, "REPO_ROOT", repo)
    monkeypatch.setattr(explorer, "REPO_ROOT", repo)
    assert load_sweep("results/demo").sweep_dir == repo / "results" / "demo"
    assert explorer.find_sweeps("results") == {"demo": repo / "results" / "demo"}


def test_explorer_filters_only_swept_parameters_readably_and_in_numeric_order(tmp_path):
    """Issue 23.5: no filter on measured metrics, numbers sort as numbers, the plot names what it pools."""
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    import ryzlab
    from ryzlab.workbench.explorer import readable

    results = tmp_path / "results"
    make_sweep(results / "A", grid(1, n_points=3))  # context 64, 128, 192 x dtype float32, bfloat16
    ex = ryzlab.explore(results).explorer
    assert set(ex.filters) == {"context", "dtype"}, "kv_bytes, achieved_gbps...: measured, not swept"
    metrics = set(ex.controls["metric"].options)
    assert "attn_us" in metrics and not metrics & {"context", "sample"}, "parameters and the step index are not metrics"
    assert ex.controls["hue"].options == ("(none)", "sweep", "context", "dtype"), "hue and facet: cases, not metrics"
    assert [label for label, _ in ex.filters["context"].options] == ["64", "128", "192"]
    assert ex.controls["x"].value == "context" and ex.controls["hue"].value == "(none)"
    assert ex.pooled_now == {"dtype": ["bfloat16", "float32"]}
    assert "median pooled over dtype (bfloat16, float32)" in ex.alt
    ex.controls["hue"].value = "dtype"
    assert ex.pooled_now == {} and "pooled" not in ex.alt
    assert readable(0.1 + 0.2) == "0.3" and readable(4096.0) == "4096" and readable(("int4", "int2")) == "[int4, int2]"


def test_report_shows_progress_bars(tmp_path, capsys):
    """Issue 23.3: `ryzlab report` shows tqdm bars while it reads runs (and executes the notebook)."""
    from ryzlab.workbench.report import load_sweep

    sweep = make_sweep(tmp_path / "s", grid(1, n_points=2))
    load_sweep(sweep, progress=True)
    err = capsys.readouterr().err
    assert "s: reading runs" in err and "4/4" in err
    load_sweep(sweep)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- key results: one rule per row
def _scaling_rows(points):
    return pd.DataFrame([{"device": "cpu", "model": "reference", "codec": "int8", "context": 512, "batch": 4,
                          "layout": layout, "tp": tp, "cp": cp, "world_size": tp * cp, "threads": threads,
                          "tokens_per_s": tps, "sample": i} for layout, tp, cp, threads, tps in points for i in range(3)])


def test_key_results_scaling_compares_at_equal_threads_or_says_it_does_not():
    from ryzlab.plots.summary import key_results

    unequal = key_results("scaling", _scaling_rows([("1", 1, 1, 1, 100.0), ("cp2", 1, 2, 1, 201.0)]))
    (row,) = unequal
    assert "2.01× the tokens/s of 1 rank x 1 thread" in row["value"] and "NOT at equal cores (2 threads vs 1)" in row["value"]
    assert "efficiency" not in row["value"].replace("not parallel efficiency", "")
    equal = key_results("scaling", _scaling_rows([("1", 1, 1, 1, 100.0), ("1", 1, 1, 2, 160.0),
                                                  ("cp2", 1, 2, 1, 200.0)]))
    (row,) = equal
    assert row["value"].startswith("1.25× the tokens/s of 1 rank with the same 2 threads"), row["value"]
    assert "2 ranks x 1 thread = 2 threads" in row["result"]
    (alone,) = key_results("scaling", _scaling_rows([("tp2", 2, 1, 1, 100.0)]))
    assert alone["value"] == "no world size 1 point to compare with"


def test_scaling_section_draws_one_layout_at_two_thread_counts(monkeypatch):
    """The demo runs tp1xcp1 at 1 and 2 threads: the section crashed on duplicate bar labels and
    left an empty figure that showed, unlabelled, at the end of the report."""
    import matplotlib.pyplot as plt
    import ryzlab.plots.scaling as S

    shown = []
    monkeypatch.setattr(S, "show_figure", lambda fig, alt=None: (shown.append(fig), plt.close(fig)))
    monkeypatch.setattr(S, "show_table", lambda *a, **k: None)
    monkeypatch.setattr(S, "show_text", lambda *a, **k: None)
    rows = _scaling_rows([("tp1xcp1", 1, 1, 1, 100.0), ("tp1xcp1", 1, 1, 2, 160.0), ("tp2xcp1", 2, 1, 1, 150.0),
                          ("tp1xcp2", 1, 2, 1, 170.0)])
    rows = rows.assign(step_ms=10.0, prefill_ms=50.0, largest_context=1024, kv_bytes_per_rank=1e6,
                       weight_bytes_per_rank=1e6, comm_bytes_per_step=1e3, comm_formula_per_step=1e3,
                       logits_rel_err_vs_ws1=0.0)
    before = set(plt.get_fignums())
    S.report(rows)
    (fig,) = shown
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["tp1xcp1, 1 thr", "tp1xcp1, 2 thr", "tp1xcp2", "tp2xcp1"], ticks
    assert set(plt.get_fignums()) <= before  # nothing left open to show, unlabelled, at the end of the cell


def _serving_rows(points, slo="ttft:2000,tpot:250"):
    return pd.DataFrame([{"kind": "summary", "device": "cpu", "engine": "ryzlab", "workers": w, "policy": "least_outstanding",
                          "codec": "none", "fault": fault, "rate": rate, "tpot_ms_p99": tpot, "ttft_ms_p99": 100.0,
                          "request_throughput": rps, "output_token_throughput": 16 * rps, "slo": slo}
                         for w, fault, rate, tpot, rps in points])


def test_key_results_serving_rates_are_bounds_and_faults_stand_apart():
    from ryzlab.plots.summary import key_results

    rows = key_results("serving", _serving_rows([(1, "none", 6.0, 100.0, 5.0), (2, "kill", 6.0, 120.0, 4.0)]))
    one, killed, tput = rows
    assert "SLO (p99 TTFT ≤ 2000 ms and p99 TPOT ≤ 250 ms)" in one["result"]
    assert one["value"].startswith("met at the offered rate 6 req/s") and "≥ 6" in one["value"]
    assert "FAULT POINT: kill" in killed["result"] and "FAULT" not in one["result"]
    assert tput["result"] == "request throughput vs workers" and tput["value"].startswith("not compared")
    rows = key_results("serving", _serving_rows([(1, "none", 4.0, 100.0, 4.0), (1, "none", 8.0, 300.0, 6.0),
                                                 (2, "none", 4.0, 90.0, 7.0), (2, "none", 8.0, 200.0, 11.0),
                                                 (2, "kill", 8.0, 900.0, 3.0)]))
    by = {r["result"]: r["value"] for r in rows}
    one = next(v for k, v in by.items() if k.startswith("highest") and "1 worker," in k)
    two = next(v for k, v in by.items() if k.startswith("highest") and "2 workers" in k and "FAULT" not in k)
    assert one == "4 req/s (the next rate tried, 8 req/s, missed it)"
    assert two == "≥ 8 req/s (met at the highest rate tried; no higher rate was tried)"
    ratios = {k: v for k, v in by.items() if k.startswith("request throughput, 2 workers vs 1")}
    assert sorted(ratios.values()) == ["1.75× (7 vs 4 req/s)", "1.83× (11 vs 6 req/s)"], "the killed point is no side"


def test_serving_section_draws_the_specs_slo_only(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from ryzlab.plots import serving as plots

    figs, texts = [], []
    monkeypatch.setattr(plots, "show_figure", lambda fig, alt=None: figs.append(fig))
    monkeypatch.setattr(plots, "show_table", lambda df, caption=None: None)
    monkeypatch.setattr(plots, "show_text", texts.append)
    plots.report(_serving_rows([(1, "none", 6.0, 100.0, 5.0), (2, "kill", 6.0, 120.0, 4.0)]))
    ax_tpot, ax_ttft, ax_workers = figs[0].axes
    flat = lambda ax: {float(ln.get_ydata()[0]) for ln in ax.lines if ln.get_label().startswith("SLO")}
    assert flat(ax_tpot) == {250.0} and flat(ax_ttft) == {2000.0}, "no lines at 50 / 1000 ms"
    labels = [ln.get_label() for ln in ax_workers.lines]
    assert any("fault kill (not comparable)" in x for x in labels)
    line = [ln for ln in ax_workers.lines if "fault" not in ln.get_label()]
    assert all(list(ln.get_xdata()) == [1] for ln in line), "the killed 2-worker point is on no line"
    assert "p99 TPOT ≤ 250 ms" in texts[-1] and " 50 ms" not in texts[-1]


def test_compare_page_draws_b_over_a_and_lists_the_environment_difference(tmp_path):
    """Issue 23.9: the page plots B/A with intervals per metric and says how A's and B's environments differ."""
    from ryzlab.workbench.compare import html_page

    a = make_sweep(tmp_path / "A", grid(1, n_points=2))
    b = make_sweep(tmp_path / "B", grid(2, {"attention_bench-01fl": 1.5}, n_points=2))
    for run_dir in b.iterdir():  # B ran with more threads, another torch and under load
        if (run_dir / "env.json").is_file():
            env = json.loads((run_dir / "env.json").read_text())
            write_json(run_dir / "env.json", {**env, "threads": 4, "torch": "<b>9.9</b>", "load_avg_1m": 3.5})
    c = compare(a, b)
    diff = c.env_diff.set_index("item")
    assert diff.loc["threads", ["A", "B", "differs"]].tolist() == ["1", "4", "yes"]
    assert diff.loc["load_avg_1m", ["A", "B"]].tolist() == ["not recorded", "3.5"]
    assert diff.loc["device", "differs"] == "" and list(c.env_diff["differs"][:3]) == ["yes"] * 3
    page = html_page(c, min_change=0.05, confidence=0.99)
    assert '<img src="data:image/png;base64,' in page and "B/A per metric" in page
    assert "Environment: A vs B" in page and "3 item(s) differ" in page
    assert "<b>9.9</b>" not in page and "&lt;b&gt;9.9&lt;/b&gt;" in page, "values from the results are escaped"


def test_failed_sections_are_named_from_the_executed_notebook():
    import nbformat

    from ryzlab.workbench.report import failed_sections

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": "<h2>ok</h2>"}),
                    nbformat.v4.new_output("display_data", data={"text/html": (
                        "<p class='ryz-section-failed' data-section='scaling'><b>This section could not be drawn</b>")})]
    nb.cells = [cell]
    assert failed_sections(nb) == ["scaling"]
    cell.outputs = cell.outputs[:1]
    assert failed_sections(nb) == []


def test_slo_table_scales_each_way_of_driving_against_its_own_one_worker_point():
    """The demo has a 1-worker point in-process and another over HTTP: the table raised on the
    duplicate baseline and the whole serving section was lost."""
    from ryzlab.plots.serving import slo_table

    rows = _serving_rows([(1, "none", 6.0, 50.0, 5.0), (2, "none", 6.0, 50.0, 9.0), (2, "kill", 6.0, 50.0, 8.0),
                          (1, "none", 6.0, 50.0, 4.0)])
    rows["via"] = ["in-process", "in-process", "in-process", "http"]
    t = slo_table(rows).set_index(["via", "workers", "fault"])["scaling_vs_1_worker"]
    assert len(t) == 4
    assert t["in-process", 2, "none"] == pytest.approx(9.0 / 5.0)
    assert t["http", 1, "none"] == pytest.approx(1.0)
    assert np.isnan(t["in-process", 2, "kill"])  # the kill point is not a scaling figure


def test_projected_rows_are_said_projected_in_the_banner_and_key_results():
    """The demo's projection rows showed as "rows / as written by the notebook" under a banner that
    said every figure was measured."""
    from ryzlab.plots.summary import key_results
    from ryzlab.workbench.report_page import projected_rows

    rows = pd.DataFrame([{"series": "static", "model": "llama-3-8b", "device": "h100-sxm", "tp": 1, "batch": 32,
                          "step_ms": 7.95, "decode_tokens_per_s": 125.8, "basis": "projected", "calibration": "gpu-default",
                          "validation_median_abs_error": 0.143, "validation_worst_abs_error": 0.52, "validation_rows": 21},
                         {"series": "serving", "model": "llama-3-8b", "device": "h100-sxm", "tp": 4, "batch": 1,
                          "rate": 200.0, "tpot_ms_p99": 8.4, "ttft_ms_p99": 90.0, "basis": "projected",
                          "calibration": "gpu-default", "validation_median_abs_error": 0.143,
                          "validation_worst_abs_error": 0.52, "validation_rows": 21}])
    out = key_results("projection", rows)
    assert len(out) == 2 and all(r["basis"].startswith("PROJECTED (not measured), calibration gpu-default") for r in out)
    assert "median |error| 14%" in out[0]["basis"] and "7.95 ms" in out[0]["value"]

    class Data:
        by_experiment = {"projection": rows, "scaling": pd.DataFrame({"basis": ["measured"]})}

    assert projected_rows(Data()) == {"projection": 2}
