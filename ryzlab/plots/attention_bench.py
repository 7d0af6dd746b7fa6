"""Report section for attention_bench: decode attention time and achieved KV bandwidth."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator
import pandas as pd

from ryzlab.plots import from_zero, plot_series, show_figure, show_table, show_text, wide_range


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
    dev = ", ".join(sorted(map(str, s["device"].unique())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (device, dtype, batch), g in s.groupby(["device", "dtype", "batch"]):
        label = f"{dtype}, batch {batch}" + (f" ({device})" if s["device"].nunique() > 1 else "")
        plot_series(axes[0], g["context"], g["attn_us_p50"], label)
        plot_series(axes[1], g["context"], g["frac_of_copy_bw"], label)
    axes[0].set(xlabel="context (tokens)", ylabel="decode attention, median (µs)",
                title=f"Decode attention time (measured, device={dev})")
    axes[1].set(xlabel="context (tokens)", ylabel="KV read bandwidth / copy bandwidth",
                title=f"Achieved fraction of copy bandwidth (measured, device={dev})")
    if wide_range(s["attn_us_p50"]):
        axes[0].set_yscale("log")
    else:
        from_zero(axes[0])
    from_zero(axes[1])
    contexts = sorted(s["context"].unique())
    for ax in axes:
        if wide_range(contexts, 8):
            ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="dtype, batch", title_fontsize=8)
    fig.tight_layout()
    show_figure(fig)
    show_table(s, "Decode attention (sdpa) per point: medians over timed steps")
    show_text(copy_note(df))


def copy_note(df: pd.DataFrame) -> str:
    """How the copy bandwidth was measured, with the buffer size the runs recorded (not the parameter's name)."""
    sizes = sorted({int(v) for v in df["copy_mib"].dropna()}) if "copy_mib" in df.columns else []
    size = " / ".join(map(str, sizes)) + " MiB" if sizes else "a main-memory-sized"
    return (f"Copy bandwidth is measured by copying a {size} buffer (larger than the CPU caches: main memory); "
            "KV that fits in the caches can be read faster than that, so a fraction above 1 means cache-resident KV.")
