"""Report section for attention_bench: decode attention time and achieved KV bandwidth."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator
import pandas as pd

from . import show_table, show_text


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("device", "device_name", "dtype", "batch", "n_heads", "n_kv_heads", "head_dim",
                        "context") if c in df.columns]
    g = df.groupby(keys, dropna=False)
    out = g.agg(attn_us_p50=("attn_us", "median"), attn_us_p90=("attn_us", lambda s: s.quantile(0.9)),
                kv_bytes=("kv_bytes", "first"), achieved_gbps=("achieved_gbps", "median"),
                copy_gbps=("copy_gbps", "median"), frac_of_copy_bw=("frac_of_copy_bw", "median"))
    return out.reset_index().sort_values(keys)


def report(df: pd.DataFrame) -> None:
    s = summarize(df)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (dev, dtype, batch), g in s.groupby(["device", "dtype", "batch"]):
        label = f"{dev} {dtype} batch={batch}"
        axes[0].plot(g["context"], g["attn_us_p50"], marker="o", label=label)
        axes[1].plot(g["context"], g["frac_of_copy_bw"], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="context (tokens)", ylabel="decode attention p50 (µs)",
                title="Decode attention time (measured)")
    axes[1].set(xscale="log", xlabel="context (tokens)", ylabel="KV read bandwidth / copy bandwidth",
                title="Achieved fraction of measured copy bandwidth")
    contexts = sorted(s["context"].unique())
    for ax in axes:
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
    show_table(s, "Decode attention (sdpa) per point: medians over timed steps")
    show_text("Copy bandwidth is measured on a buffer of copy_mib MiB (main memory); KV that fits in the "
              "CPU caches can be read faster than that, so a fraction above 1 means cache-resident KV.")
