"""Report section for projection: PROJECTED step time, serving curve and sensitivities, each with
the calibration's validation error beside it. Nothing in this section is a measurement: every
series is drawn in the simulated style and labelled "(projected)"."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from ryzlab.plots import from_zero, plot_series, show_figure, show_table, show_text


def _err(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    if not isinstance(r.get("validation_median_abs_error"), float) or math.isnan(r["validation_median_abs_error"]):
        return f"validation: none for this device ({r.get('validation_note') or 'no published table'})"
    where = r.get("validation_note") or f"tables of {r['device']}"
    return (f"{r['device']}: validation error of calibration {r['calibration']} on {int(r['validation_rows'])} "
            f"held-out published rows: median |error| {r['validation_median_abs_error']:.0%}, worst "
            f"{r['validation_worst_abs_error']:.0%} ({where}).")


def report(df: pd.DataFrame) -> None:
    show_text("Every figure below is PROJECTED by ryzlab's cost model (basis = projected), not measured; each "
              "names its device spec and calibration, with that calibration's validation error beside it.")
    static = df[df["series"] == "static"]
    serving = df[df["series"] == "serving"]
    sens = df[df["series"] == "sensitivity"]
    if len(static):
        cols = ["model", "device", "tp", "cp", "batch", "weights", "codec", "step_ms", "decode_tokens_per_s",
                "throughput_tokens_per_s", "ttft_ms", "memory_gb_per_device", "kv_capacity_tokens", "max_batch",
                "basis", "calibration", "validation_median_abs_error", "validation_worst_abs_error"]
        show_table(static[[c for c in cols if c in static.columns]].sort_values(["model", "device", "tp", "cp"]),
                   "Projected decode step and memory per configuration (basis = projected)")
        show_text(" ".join(sorted({_err(g) for _, g in static.groupby("device")})))
    panels = int(len(serving) > 0) + int(len(sens) > 0) + int(static["tp"].nunique() > 1 if len(static) else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if len(static) and static["tp"].nunique() > 1:
        ax = axes.pop(0)
        for (model, dev, w), g in static.groupby(["model", "device", "weights"]):
            g = g.sort_values("tp")
            plot_series(ax, g["tp"], g["throughput_tokens_per_s"], f"{model} {dev} {w} (projected)", simulated=True)
        ax.set(xlabel="tensor-parallel GPUs", ylabel="decode tokens/s (batch)", title="Decode throughput (projected)")
        from_zero(ax)
        ax.legend(fontsize=7)
    if len(serving):
        ax = axes.pop(0)
        for (model, dev, tp), g in serving.groupby(["model", "device", "tp"]):
            g = g.sort_values("rate")
            plot_series(ax, g["rate"], g["ttft_ms_p99"], f"TTFT p99 {model} {dev} tp{tp} (projected)", simulated=True)
            plot_series(ax, g["rate"], g["tpot_ms_p99"], f"TPOT p99 {model} {dev} tp{tp} (projected)", simulated=True)
        ax.set(xlabel="offered rate (req/s)", ylabel="ms", title="Serving curve (projected: real scheduler, virtual clock)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if len(sens):
        ax = axes.pop(0)
        first = sens[(sens["device"] == sens["device"].iloc[0]) & (sens["tp"] == sens["tp"].iloc[0])
                     & (sens["weights"] == sens["weights"].iloc[0])]
        ax.barh(first["param"], first["elasticity"], color="#999", hatch="//")
        ax.set(xlabel="elasticity of the decode step (d ln t / d ln p)",
               title=f"Sensitivity (projected, {first['device'].iloc[0]} tp{first['tp'].iloc[0]} "
                     f"{first['weights'].iloc[0]})")
        ax.axvline(0, color="k", lw=0.5)
    fig.tight_layout()
    show_figure(fig)
    if len(serving):
        cols = ["model", "device", "tp", "rate", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
                "e2el_ms_p99", "throughput_tokens_per_s", "preemptions", "basis", "calibration"]
        show_table(serving[[c for c in cols if c in serving.columns]],
                   "Serving projection per rate (basis = projected)")
