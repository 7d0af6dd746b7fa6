"""Report section for the orchestrator: p99 vs load per policy, the fault table, the sim/live split.

Rows with ``mode="simulated"`` and ``mode="live"`` are never drawn on the same axes: each mode
gets its own figure, titled with the mode and device.
"""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import pandas as pd

from ryzlab.plots import from_zero, plot_series, show_figure, show_table, show_text, sig3, wide_range

KEYS = ["mode", "device", "workers", "fault", "policy", "load"]
FAULT_COLS = ["time_to_detect_s", "time_to_recover_s", "rerouted", "work_lost", "error_rate"]


def _mean(df: pd.DataFrame) -> pd.DataFrame:
    keys = [k for k in KEYS if k in df.columns]
    return df.groupby(keys, dropna=False).mean(numeric_only=True).reset_index()


def p99_vs_load(df: pd.DataFrame) -> None:
    """One figure per (mode, device): a panel per (workers, fault), a line per policy (bars with
    their values when the sweep tried one load). Simulated figures are dashed/hatched and say so."""
    s = _mean(df)
    for (mode, device), part in s.groupby(["mode", "device"]):
        sim = mode == "simulated"
        panels = list(part.groupby(["workers", "fault"]))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, ((workers, fault), g) in zip(axes[0], panels):
            if g["load"].nunique() == 1:
                g = g.sort_values("policy")
                # wrapped at 11 characters: three names side by side fit a 4-inch panel
                names = [textwrap.fill(str(p).replace("_", " "), 11) for p in g["policy"]]
                bars = ax.bar(names, g["e2el_ms_p99"], color="none" if sim else "C0", edgecolor="C0",
                              hatch="//" if sim else None, label="simulated" if sim else "measured")
                ax.bar_label(bars, labels=[sig3(v) for v in g["e2el_ms_p99"]], fontsize=8)
                ax.set_xlabel(f"policy (offered load {sig3(g['load'].iloc[0])} of capacity)")
                from_zero(ax)
            else:
                for policy, line in g.groupby("policy"):
                    line = line.sort_values("load")
                    plot_series(ax, line["load"], line["e2el_ms_p99"], str(policy).replace("_", " "), simulated=sim)
                ax.set_xlabel("offered load (fraction of capacity)")
                if wide_range(g["e2el_ms_p99"]):
                    ax.set_yscale("log")
                else:
                    from_zero(ax)
                ax.legend(fontsize=8, title="policy", title_fontsize=8)
            ax.set_title(f"{workers} workers, fault: {fault}")
            ax.set_ylabel("p99 end-to-end latency (ms)")
            ax.grid(alpha=0.3, axis="y")
        what = "SIMULATED (a model of the workers, not a measurement)" if sim else f"measured, device={device}"
        fig.suptitle(f"p99 latency per balancing policy — {what}")
        fig.tight_layout()
        show_figure(fig)


def policy_ratio(df: pd.DataFrame) -> pd.DataFrame:
    """p99 of each policy divided by round-robin's at the same (mode, device, workers, fault, load)."""
    s = _mean(df)
    base = s[s["policy"] == "round_robin"].set_index(["mode", "device", "workers", "fault", "load"])["e2el_ms_p99"]
    out = s.join(base.rename("e2el_ms_p99_round_robin"), on=["mode", "device", "workers", "fault", "load"])
    out["p99_vs_round_robin"] = out["e2el_ms_p99"] / out["e2el_ms_p99_round_robin"]
    return out[["mode", "device", "workers", "fault", "load", "policy", "e2el_ms_p50", "e2el_ms_p99",
                "p99_vs_round_robin", "throughput_rps"]]


def report(df: pd.DataFrame) -> None:
    if df.empty:
        show_text("no orchestrator rows")
        return
    show_text("Tail latency per balancing policy. Simulated and live rows are shown apart; "
              "'device' is where the run executed.")
    p99_vs_load(df)
    show_table(policy_ratio(df), "p99 relative to round-robin (same mode, workers, fault, load)")
    faulty = _mean(df[df["fault"] != "none"])
    if not faulty.empty:
        cols = [c for c in KEYS + ["e2el_ms_p99"] + FAULT_COLS if c in faulty.columns]
        show_table(faulty[cols], "Faults: detection, recovery (replacement serving and re-routed work "
                                 "finished), work lost (must be 0)")
        lost = int(faulty["work_lost"].sum())
        show_text(f"work lost across all fault runs: {lost}" + ("" if lost == 0 else "  <-- NOT ZERO"))
