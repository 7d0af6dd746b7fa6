"""Report section for weight_compression: weight bytes vs accuracy per KV codec, and decode step time."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ryzlab.plots import from_zero, plot_series, show_figure, show_table, show_text, sig3

KEYS = ["weights", "codec", "model_name", "text", "device_name"]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (weight format, KV codec, model): medians of the timed steps, the rest as measured."""
    keys = [k for k in KEYS if k in df.columns]
    first = {c: (c, "first") for c in ("weight_bytes", "weight_ratio_vs_float32", "kv_bytes_per_token",
                                       "kv_ratio_vs_bf16", "kl_per_token", "ppl", "ppl_ref", "ppl_delta",
                                       "top1_agree", "prefill_ms", "kernel", "device") if c in df.columns}
    g = df.groupby(keys, dropna=False).agg(tpot_ms_p50=("tpot_ms", "median"),
                                           tpot_ms_p90=("tpot_ms", lambda s: s.quantile(0.9)), **first)
    return g.reset_index().sort_values(["weight_bytes"] + [k for k in ("codec",) if k in keys], ascending=[False, True])


def report(df: pd.DataFrame) -> None:
    s = summarize(df)
    dev = ", ".join(sorted(map(str, s["device_name"].unique()))) if "device_name" in s else "unknown"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for codec, g in s.groupby("codec"):
        g = g.sort_values("weight_bytes")
        if "kl_per_token" in g:
            plot_series(axes[0], g["weight_bytes"] / 2**20, g["kl_per_token"], f"KV {codec}")
            for r in g.itertuples():
                axes[0].annotate(r.weights, (r.weight_bytes / 2**20, r.kl_per_token), fontsize=7,
                                 xytext=(3, 3), textcoords="offset points")
        plot_series(axes[1], g["weight_bytes"] / 2**20, g["tpot_ms_p50"], f"KV {codec}")
    axes[0].set(xlabel="weight bytes (MiB, ledger)", ylabel="KL vs float32 weights + uncompressed KV (nats/token)",
                title=f"Accuracy vs weight bytes (measured, {dev})")
    if (s.get("kl_per_token", pd.Series(dtype=float)) > 0).all() and len(s) > 1:
        axes[0].set_yscale("log")
    axes[1].set(xlabel="weight bytes (MiB, ledger)", ylabel="decode step, batch 1, median (ms)",
                title=f"Decode step time (measured, {dev})")
    from_zero(axes[1])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    show_figure(fig)
    show_table(s, "Weight format x KV codec: bytes from the ledgers, accuracy and time measured")
    show_text("Weight bytes include scales, zero points and int4 row padding; norms and biases stay in float32. "
              "Ternary packs the layers' projections at 2 bits and keeps embeddings / output head in bf16. "
              "The reference for accuracy is the same model with float32 weights and an uncompressed cache.")


def key_result(df: pd.DataFrame, budget: float) -> tuple[pd.Series | None, pd.Series]:
    """(the point with the fewest weight + KV bytes whose perplexity is within ``budget`` of the reference,
    or None; every point) — the rule :func:`ryzlab.plots.summary.weight_compression` words."""
    s = summarize(df).assign(rel_ppl=lambda d: d["ppl_delta"] / d["ppl_ref"])
    ok = s[s["rel_ppl"] <= budget]
    return (None if ok.empty else ok.sort_values("weight_bytes").iloc[0]), s


def describe(r: pd.Series) -> str:
    return (f"weights {r['weights']} + KV {r['codec']}: {sig3(r['weight_ratio_vs_float32'])}× float32 weight bytes, "
            f"perplexity {100 * r['rel_ppl']:+.3g}%, decode {sig3(r['tpot_ms_p50'])} ms ({r['kernel']})")
