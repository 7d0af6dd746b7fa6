"""What the demo's figures say, on constructed rows: labels whole, ticks readable, numbers filled in."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")


def _comparison(points: list[str]):
    from ryzlab.workbench.compare import Comparison

    rows = [{"experiment": "kv_compression", "point": p, "metric": "tpot_ms", "a_median": 10.0, "b_median": 16.0,
             "b_over_a": 1.6, "ci_low": 1.1, "ci_high": 3.2, "n_a": 8, "n_b": 8, "runs_a": 1, "runs_b": 1,
             "better": "lower", "verdict": "regression"} for p in points]
    return Comparison(a=Path("A"), b=Path("B"), table=pd.DataFrame(rows), only_a=[], only_b=[])


def test_compare_plot_names_the_whole_point_with_plain_ratio_ticks():
    from ryzlab.workbench.compare import ratio_figure

    long = "codec=int4, key_granularity=token_head, residual=64, rotation=hadamard, symmetric=False"
    other = long.replace("symmetric=False", "symmetric=True")
    fig = ratio_figure(_comparison([long, other]), min_change=0.05, confidence=0.99)
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]
    assert any(x.endswith("symmetric=False") for x in labels) and any(x.endswith("symmetric=True") for x in labels)
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "1" in ticks and "2" in ticks and not any("10^" in x or "times" in x for x in ticks), ticks


def test_compare_table_shows_the_verdict_first():
    from ryzlab.workbench.compare import html_page

    page = html_page(_comparison(["codec=int8"]), min_change=0.05, confidence=0.99)
    head = page[page.index("<thead"):page.index("</thead>")] if "<thead" in page else page
    assert head.index("verdict") < head.index("experiment") < head.index("b_over_a")


def test_attention_copy_note_gives_the_buffer_size_not_the_parameter_name():
    from ryzlab.plots.attention_bench import copy_note

    note = copy_note(pd.DataFrame({"copy_mib": [64, 64]}))
    assert "64 MiB buffer" in note and "copy_mib" not in note


def test_byte_ticks_are_power_of_two_steps():
    from ryzlab.plots import binary_ticks, human_bytes

    ticks = binary_ticks(0, 34 * 1024)
    assert [human_bytes(t) for t in ticks] == ["0 B", "8 KiB", "16 KiB", "24 KiB", "32 KiB"]


def test_single_rate_serving_draws_a_bar_per_config_named_by_what_differs(monkeypatch):
    from ryzlab.plots import serving as plots

    figs = []
    monkeypatch.setattr(plots, "show_figure", lambda fig, alt=None: figs.append(fig))
    monkeypatch.setattr(plots, "show_table", lambda df, caption=None: None)
    monkeypatch.setattr(plots, "show_text", lambda text: None)
    rows = [{"kind": "summary", "device": "cpu", "engine": eng, "workers": w, "policy": "least_outstanding",
             "codec": "none", "fault": fault, "rate": 6.0, "slo": "ttft:2000,tpot:250", "tpot_ms_p99": tpot,
             "ttft_ms_p99": 20.0, "output_token_throughput": tput, "request_throughput": 5.0, "requests_failed": 0}
            for eng, w, fault, tpot, tput in (("ryzlab", 1, "none", 7.7, 80.6), ("ryzlab", 2, "kill", 9.1, 80.0),
                                               ("transformers", 1, "none", 5.4, 80.9))]
    plots.report(pd.DataFrame(rows))
    ax_tpot = figs[0].axes[0]
    names = [t.get_text() for t in ax_tpot.get_xticklabels()]
    assert names == ["ryzlab\n1 worker\nfault none", "ryzlab\n2 workers\nfault kill",
                     "transformers\n1 worker\nfault none"]
    assert "least outstanding" in ax_tpot.get_xlabel() and "only rate swept" in ax_tpot.get_title()
    engines = figs[-1].axes[2]  # throughput per engine: from zero, not a zoomed 80.55..80.85 axis
    assert engines.get_ylim()[0] == 0


def test_explorer_reads_list_values_stored_as_text_alike():
    from ryzlab.workbench.explorer import readable

    assert readable("(0.5,)") == readable("[0.5]") == "[0.5]"
    assert readable("('round_robin', 'least_outstanding')") == "[round_robin, least_outstanding]"
    assert readable("(not a literal") == "(not a literal"


def test_explorer_keeps_simulated_apart_and_ticks_at_swept_values(tmp_path, monkeypatch):
    from ryzlab.io import append_jsonl, write_parquet
    from ryzlab.workbench.explorer import Explorer

    sweep = tmp_path / "results" / "S"
    for i, (mode, workers) in enumerate((("live", 1), ("live", 2), ("simulated", 1), ("simulated", 2))):
        rid = f"orchestrator-{i:02d}"
        params = {"mode": mode, "workers": workers, "num_requests": 100 if mode == "live" else 3000}
        write_parquet(sweep / rid / "metrics.parquet",
                      pd.DataFrame([{**params, "policy": pol, "e2el_ms": 10.0 * workers + k, "step": k}
                                    for k in range(3) for pol in ("round_robin", "least_outstanding")]))
        append_jsonl(sweep / "manifest.jsonl", {"run_id": rid, "experiment": "orchestrator", "status": "ok",
                                                "params": params})
    (sweep / "spec.yaml").write_text("name: S\n")
    import ryzlab.plots

    figs = []
    monkeypatch.setattr(ryzlab.plots, "show_figure", lambda fig, alt=None: figs.append(fig))
    ex = Explorer(tmp_path / "results")
    assert ex.controls["x"].value == "workers" and ex.controls["facet"].value == "mode"
    assert [t.get_text() for t in figs[-1].axes[0].get_xticklabels()] == ["1", "2"], "no 1.2 workers"
    assert "num_requests" not in ex.alt, "n_requests differs between the panels, not within one"
    assert "pooled over policy (least_outstanding, round_robin)" in ex.alt.replace(",\n", ", "), "policies named"
    ex.filters["policy"].value = ("round_robin",)
    assert "pooled" not in ex.alt and len(ex.data) == 4
    assert sorted(ex.data["mode"].unique()) == ["live", "simulated"]


def test_explorer_defaults_to_the_sections_headline_metric(tmp_path):
    from ryzlab.io import append_jsonl, write_parquet
    from ryzlab.workbench.explorer import Explorer

    sweep = tmp_path / "S"
    for i, workers in enumerate((1, 2)):
        rid = f"serving-{i:02d}"
        rows = [{"kind": "summary", "workers": workers, "duration_s": 6.0 + i, "ttft_ms_p99": 20.0 * workers}]
        rows += [{"kind": "timeline", "workers": workers, "t_s": t, "goodput": 5.0 + t} for t in range(3)]
        write_parquet(sweep / rid / "metrics.parquet", pd.DataFrame(rows))
        append_jsonl(sweep / "manifest.jsonl", {"run_id": rid, "experiment": "serving", "status": "ok",
                                                "params": {"workers": workers}})
    (sweep / "spec.yaml").write_text("name: S\n")
    ex = Explorer(sweep)
    assert ex.controls["metric"].value == "ttft_ms_p99" and ex.controls["x"].value == "workers"
    assert "pooled" not in ex.alt, "timeline rows hold no ttft_ms_p99: nothing pooled into it"


def test_key_result_never_compares_round_robin_with_itself():
    from ryzlab.plots.summary import orchestrator

    rows = pd.DataFrame([{"mode": "live", "device": "cpu", "workers": 2, "fault": "none", "policy": p, "load": 0.5,
                          "e2el_ms_p99": ms} for p, ms in (("round_robin", 119.0), ("least_outstanding", 155.0))])
    text = " ".join(str(v) for r in orchestrator(rows) for v in r.values())
    assert "1× round robin" not in text and "next: least outstanding, 155 ms" in text
    assert "offered load 0.5 of capacity" in text
