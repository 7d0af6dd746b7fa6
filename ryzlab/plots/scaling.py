"""Report section for the scaling experiment: KV sharding across ranks (device named on every point)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..experiments.scaling import scaling_efficiency
from . import show_table, show_text


def report(df: pd.DataFrame) -> None:
    """Decode step time and capacity vs world_size, measured vs formula communication, and a table."""
    s = scaling_efficiency(df)
    devices = ", ".join(sorted(map(str, df["device"].unique()))) if "device" in df.columns else "unknown"
    show_text(f"Every point measured on device={devices} (ranks are processes; on CPU they share the "
              f"machine's cores, so speedups here are not GPU projections).")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (strategy, codec, context), g in s.groupby(["strategy", "codec", "context"]):
        g = g.sort_values("world_size")
        label = f"{strategy} {codec} ctx={context}"
        axes[0].plot(g["world_size"], g["step_ms"], marker="o", label=label)
        axes[1].plot(g["world_size"], g["largest_context"], marker="o", label=label)
    sharded = s[s["comm_bytes_formula_per_layer"] > 0]
    for strategy, g in sharded.groupby("strategy"):
        g = g.sort_values("context")
        axes[2].plot(g["context"], g["comm_bytes_per_layer"], marker="o", label=f"{strategy} measured")
        axes[2].plot(g["context"], g["comm_bytes_formula_per_layer"], ls="--", label=f"{strategy} formula")
    axes[0].set(xlabel="world_size", ylabel="decode step p50 (ms)", title=f"Decode step latency ({devices})")
    axes[1].set(xlabel="world_size", ylabel="tokens", title="Largest context under the per-rank budget")
    axes[2].set(xscale="log", xlabel="context (tokens)", ylabel="bytes / layer / step / rank",
                title="Communication: measured vs formula")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    plt.show()
    cols = [c for c in ("device", "strategy", "codec", "context", "batch", "world_size", "step_ms", "tokens_per_s",
                        "speedup", "scaling_efficiency", "largest_context", "kv_bytes_per_rank",
                        "comm_bytes_per_layer", "comm_bytes_formula_per_layer") if c in s.columns]
    show_table(s[cols].sort_values(["strategy", "codec", "context", "world_size"]),
               "Scaling per point (medians over timed decode steps; efficiency = speedup / world_size vs "
               "the world_size 1 point of the same sweep)")
