"""Report section for serving: tail latency vs rate, throughput vs workers, fault timeline, SLO table,
and -- when the rows hold more than one ``engine`` (ryzlab and the transformers peer, or an
endpoint) -- the engines side by side: p99 TPOT/TTFT and throughput vs rate, and the highest rate
under the SLO with the throughput there, as ratios to ryzlab.

The SLO table judges the seed's targets on the rows as measured, on the device they ran on:
P99 TPOT < 50 ms, 1000+ requests/s, and ~4x throughput on 4 devices (scaling = request
throughput at N workers / at 1 worker, same policy, codec and offered rate; "n/a" when the
sweep has no 1-worker baseline or no 4-worker point).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import show_table, show_text

CONFIG = ["device", "engine", "workers", "policy", "codec", "rate"]
TTFT_BOUND_MS = 1000.0
P99_TARGET_MS = 50.0
RPS_TARGET = 1000.0
SCALING_TARGET = 4.0


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    s = df[df["kind"] == "summary"] if "kind" in df.columns else df
    keys = [k for k in CONFIG if k in s.columns]
    cols = [c for c in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p99", "e2el_ms_p99",
                        "request_throughput", "output_token_throughput", "goodput", "achieved_rate",
                        "kv_cache_usage_perc", "preemptions", "prefix_cache_hit_rate", "requests_failed",
                        "requests_lost", "time_to_detect_s", "time_to_recover_s") if c in s.columns]
    return s.groupby(keys, dropna=False)[cols].mean(numeric_only=True).reset_index().sort_values(keys)


def slo_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config: the seed's three targets, met or not, on which device."""
    s = _summary(df)
    idx = [k for k in ("device", "engine", "policy", "codec", "rate") if k in s.columns]
    base = s[s["workers"] == 1].set_index(idx)["request_throughput"]
    rows = []
    for _, r in s.iterrows():
        key = tuple(r[k] for k in idx)
        scale = r["request_throughput"] / base[key] if key in base.index and base[key] > 0 else np.nan
        p99 = r.get("tpot_ms_p99", np.nan)
        rows.append({
            "device": r["device"], **({"engine": r["engine"]} if "engine" in s.columns else {}),
            "workers": int(r["workers"]), "policy": r["policy"], "codec": r["codec"],
            "rate": r["rate"], "tpot_ms_p99": p99,
            "p99<50ms": "yes" if p99 < P99_TARGET_MS else "no",
            "request_throughput": r["request_throughput"],
            "1000+ req/s": "yes" if r["request_throughput"] >= RPS_TARGET else "no",
            "scaling_vs_1_worker": scale,
            "~4x on 4": ("n/a" if r["workers"] != 4 or np.isnan(scale) else
                         "yes" if scale >= 0.9 * SCALING_TARGET else "no"),
            "requests_lost": r.get("requests_lost", np.nan),
        })
    return pd.DataFrame(rows)


def max_rate_under_slo(df: pd.DataFrame, p99_ms: float = P99_TARGET_MS) -> pd.DataFrame:
    """Per (device, workers, policy, codec): the highest offered rate whose p99 TPOT < ``p99_ms``."""
    s = _summary(df)
    ok = s[s["tpot_ms_p99"] < p99_ms]
    keys = [k for k in ("device", "engine", "workers", "policy", "codec") if k in s.columns]
    best = ok.groupby(keys)["rate"].max().rename("max_rate_p99_tpot_under_50ms")
    return s.groupby(keys)["rate"].max().rename("max_rate_tried").to_frame().join(best).reset_index()


def engines_side_by_side(df: pd.DataFrame, tpot_ms: float = P99_TARGET_MS,
                         ttft_ms: float = TTFT_BOUND_MS) -> pd.DataFrame:
    """Per (device, engine): the highest offered rate whose p99 TPOT < ``tpot_ms`` and p99 TTFT <
    ``ttft_ms`` with no failed request, the output throughput at that rate, and both as ratios to
    ryzlab's (same device). Empty unless the rows hold more than one engine."""
    s = _summary(df)
    if "engine" not in s.columns or s["engine"].nunique() < 2:
        return pd.DataFrame()
    held = (s["tpot_ms_p99"] < tpot_ms) & (s["ttft_ms_p99"] < ttft_ms)
    if "requests_failed" in s.columns:
        held &= s["requests_failed"] == 0
    rows = []
    for (dev, eng), g in s.groupby(["device", "engine"]):
        ok = g[held.loc[g.index]]
        best = ok.loc[ok["rate"].idxmax()] if len(ok) else None
        via = ",".join(sorted(map(str, df.loc[df.get("engine") == eng, "via"].dropna().unique()))) \
            if "via" in df.columns else ""
        rows.append({"device": dev, "engine": eng, "via": via, "rates_tried": len(g),
                     "max_rate_under_slo": best["rate"] if best is not None else np.nan,
                     "output_token_throughput_there": best["output_token_throughput"] if best is not None else np.nan,
                     "tpot_ms_p99_there": best["tpot_ms_p99"] if best is not None else np.nan,
                     "ttft_ms_p99_there": best["ttft_ms_p99"] if best is not None else np.nan})
    out = pd.DataFrame(rows)
    for col in ("max_rate_under_slo", "output_token_throughput_there"):
        ref = out[out["engine"] == "ryzlab"].set_index("device")[col]
        out[f"{col}_vs_ryzlab"] = [r[col] / ref[r["device"]] if r["device"] in ref.index and ref[r["device"]] > 0
                                   else np.nan for _, r in out.iterrows()]
    return out


def _plot_engines(s: pd.DataFrame, dev: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for eng, g in s.groupby("engine"):
        g = g.groupby("rate")[["tpot_ms_p99", "ttft_ms_p99", "output_token_throughput"]].mean().reset_index()
        axes[0].plot(g["rate"], g["tpot_ms_p99"], marker="o", label=eng)
        axes[1].plot(g["rate"], g["ttft_ms_p99"], marker="o", label=eng)
        axes[2].plot(g["rate"], g["output_token_throughput"], marker="o", label=eng)
    axes[0].axhline(P99_TARGET_MS, color="red", ls="--", lw=1, label=f"SLO {P99_TARGET_MS:g} ms")
    axes[1].axhline(TTFT_BOUND_MS, color="red", ls="--", lw=1, label=f"SLO {TTFT_BOUND_MS:g} ms")
    axes[0].set(xlabel="offered rate (req/s)", ylabel="p99 TPOT (ms)", title=f"p99 TPOT per engine ({dev})")
    axes[1].set(xlabel="offered rate (req/s)", ylabel="p99 TTFT (ms)", yscale="log",
                title=f"p99 TTFT per engine ({dev})")
    axes[2].set(xlabel="offered rate (req/s)", ylabel="output tokens/s", title=f"Throughput per engine ({dev})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plt.show()


def report(df: pd.DataFrame) -> None:
    s = _summary(df)
    dev = ", ".join(sorted(map(str, s["device"].unique())))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    by = (["engine"] if "engine" in s.columns and s["engine"].nunique() > 1 else []) + ["workers", "policy", "codec"]
    for key, g in s.groupby(by):
        g = g.sort_values("rate")
        *eng, w, pol, codec = key
        label = " ".join(map(str, eng)) + (" " if eng else "") + f"{w}w {pol} {codec}"
        axes[0].plot(g["rate"], g["tpot_ms_p99"], marker="o", label=label)
        axes[1].plot(g["rate"], g["ttft_ms_p99"], marker="o", label=label)
    axes[0].axhline(P99_TARGET_MS, color="red", ls="--", lw=1, label="seed target 50 ms")
    axes[0].set(xlabel="offered rate (req/s)", ylabel="p99 TPOT (ms)", title=f"p99 TPOT vs rate ({dev})")
    axes[1].set(xlabel="offered rate (req/s)", ylabel="p99 TTFT (ms)", yscale="log", title=f"p99 TTFT vs rate ({dev})")
    top = s.sort_values("rate").groupby(["workers", "policy", "codec"]).tail(1)
    for (pol, codec), g in top.groupby(["policy", "codec"]):
        g = g.sort_values("workers")
        axes[2].plot(g["workers"], g["output_token_throughput"], marker="o", label=f"{pol} {codec}")
    axes[2].set(xlabel="workers", ylabel="output tokens/s (highest offered rate)",
                title=f"Throughput vs workers ({dev})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plt.show()

    tl = df[df["kind"] == "timeline"] if "kind" in df.columns else df.iloc[0:0]
    if len(tl) and tl["fault_at_s"].notna().any():
        fig, ax = plt.subplots(figsize=(8, 3.5))
        faulted = tl[tl["fault_at_s"].notna()]
        for key, g in faulted.groupby([c for c in ("workers", "policy", "codec", "rate") if c in faulted.columns]):
            ax.step(g["t_s"], g["goodput"], where="post", label=" ".join(map(str, key)))
            ax.axvline(g["fault_at_s"].iloc[0], color="red", ls="--", lw=1)
        ax.set(xlabel="time since load start (s)", ylabel="goodput (req/s within SLO)",
               title=f"Goodput around a killed worker (red: kill) ({dev})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        plt.show()

    side = engines_side_by_side(df)
    if len(side):
        _plot_engines(s, dev)
        show_table(side, f"Engines side by side: highest offered rate with p99 TPOT < {P99_TARGET_MS:g} ms and "
                         f"p99 TTFT < {TTFT_BOUND_MS:g} ms (within the rates swept), throughput there, ratios to "
                         f"ryzlab (device={dev})")
    show_table(s, f"Serving metrics per config (means over runs; latencies in ms; device={dev})")
    show_table(max_rate_under_slo(df), "Highest offered rate with p99 TPOT < 50 ms (within the rates swept)")
    show_table(slo_table(df), "Seed targets per config, as measured (not projected)")
    show_text("Targets: P99 < 50 ms (TPOT), 1000+ req/s, ~4x throughput on 4 devices. A CPU run with "
              "2 shared cores cannot show GPU scaling; the table says what this device did.")
