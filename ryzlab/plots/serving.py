"""Report section for serving: tail latency vs rate, throughput vs workers, fault timeline, SLO table,
and -- when the rows hold more than one ``engine`` (ryzlab and the transformers peer, or an
endpoint) -- the engines side by side: p99 TPOT/TTFT and throughput vs rate, and the highest rate
under the SLO with the throughput there, as ratios to ryzlab.

One SLO per section: the rows' own ``slo`` (the spec's; the serving config's default when the rows
have none), drawn on the latency plots and used by every "within the SLO" judgement here. The SLO
table judges that SLO and the seed's throughput targets on the rows as measured, on the device
they ran on: 1000+ requests/s and ~4x throughput on 4 devices (scaling = request throughput at N
workers / at 1 worker, same policy, codec and offered rate, fault-free points only; "n/a" when the
sweep has no fault-free 1-worker baseline or no 4-worker point). A point with a worker killed
(``fault`` other than ``none``) is never compared with a fault-free one: it is drawn and listed on
its own.
"""
from __future__ import annotations

import logging
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ryzlab.plots import from_zero, plot_series, show_figure, show_table, show_text, sig3, wide_range

log = logging.getLogger(__name__)

CONFIG = ["device", "engine", "via", "workers", "policy", "codec", "fault", "rate"]
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


def fault_free(s: pd.DataFrame) -> pd.Series:
    """True for rows measured without an injected fault (no ``fault`` column: all of them)."""
    return s["fault"].fillna("none").astype(str).eq("none") if "fault" in s.columns else pd.Series(True, index=s.index)


def default_slo() -> str:
    """The serving experiment's own default SLO (its config), for rows that carry none."""
    from ryzlab.experiments.serving import Config

    return Config.__dataclass_fields__["slo"].default


def section_slo(df: pd.DataFrame) -> dict[str, float]:
    """The one SLO of a serving section: p99 limits in ms (``{"ttft": 2000, "tpot": 250}``) from the
    rows' ``slo`` (the spec's). Rows with several SLOs: the most common one, with a warning (each
    point's own SLO still judges it in :func:`max_rate_under_slo`)."""
    vals = df["slo"].dropna().astype(str) if "slo" in df.columns else pd.Series(dtype=str)
    if vals.nunique() > 1:
        log.warning("serving rows hold %d SLOs (%s); the section draws the most common one",
                    vals.nunique(), ", ".join(sorted(vals.unique())))
    return slo_limits(vals.mode().iloc[0] if len(vals) else None)


def slo_words(limits: dict[str, float]) -> str:
    return " and ".join(f"p99 {k.upper()} ≤ {ms:g} ms" for k, ms in limits.items())


def slo_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config: the section's SLO and the seed's throughput targets, met or not, on which
    device. Scaling compares fault-free points only (a point with a killed worker gets n/a)."""
    s = _summary(df)
    limits = section_slo(df)
    # via too: a 2-worker in-process point scales against the 1-worker in-process point, not the HTTP one
    idx = [k for k in ("device", "engine", "via", "policy", "codec", "rate") if k in s.columns]
    clean = fault_free(s)
    base = s[(s["workers"] == 1) & clean].set_index(idx)["request_throughput"]
    rows = []
    for i, r in s.iterrows():
        key = tuple(r[k] for k in idx)
        scale = r["request_throughput"] / base[key] if clean[i] and key in base.index and base[key] > 0 else np.nan
        p99 = r.get("tpot_ms_p99", np.nan)
        met = all(r.get(f"{k}_ms_p99", np.nan) <= ms for k, ms in limits.items())
        rows.append({
            "device": r["device"], **({"engine": r["engine"]} if "engine" in s.columns else {}),
            **({"via": r["via"]} if "via" in s.columns else {}),
            "workers": int(r["workers"]), "policy": r["policy"], "codec": r["codec"],
            **({"fault": r["fault"]} if "fault" in s.columns else {}),
            "rate": r["rate"], "tpot_ms_p99": p99,
            f"SLO: {slo_words(limits)}": "yes" if met else "no",
            "request_throughput": r["request_throughput"],
            "1000+ req/s": "yes" if r["request_throughput"] >= RPS_TARGET else "no",
            "scaling_vs_1_worker": scale,
            "~4x on 4": ("n/a" if r["workers"] != 4 or np.isnan(scale) else
                         "yes" if scale >= 0.9 * SCALING_TARGET else "no"),
            "requests_lost": r.get("requests_lost", np.nan),
        })
    return pd.DataFrame(rows)


def slo_limits(slo: str | None) -> dict[str, float]:
    """p99 limits in ms from a run's ``slo`` string ("ttft:2000,tpot:250"); the serving config's
    default SLO when the run set none."""
    from ryzlab.loadgen.metrics import parse_slo

    def limits(text: str | None) -> dict[str, float]:
        parsed = parse_slo(text)
        return {k: v for k, v in (("ttft", parsed.ttft), ("tpot", parsed.tpot)) if v is not None}

    return limits(slo if isinstance(slo, str) else None) or limits(default_slo())


def max_rate_under_slo(df: pd.DataFrame) -> pd.DataFrame:
    """Per config: the highest offered rate whose p99 TTFT *and* p99 TPOT are within the run's SLO
    (both, as the serving benchmark requires; NaN when no rate tried meets it). ``rates_tried``,
    ``min_rate_tried`` and ``next_rate_missed`` (the lowest rate tried above it, which missed; NaN
    when none was tried: then the rate found is only a floor of the true highest rate)."""
    s = df[df["kind"] == "summary"] if "kind" in df.columns else df
    keys = [k for k in ("device", "engine", "via", "workers", "policy", "codec", "fault", "slo") if k in s.columns]
    cols = [c for c in ("ttft_ms_p99", "tpot_ms_p99") if c in s.columns]
    s = s.groupby(keys + ["rate"], dropna=False)[cols].mean().reset_index()
    rows = []
    for key, g in s.groupby(keys, dropna=False):
        r = dict(zip(keys, key))
        limits = slo_limits(r.get("slo"))
        ok = pd.Series(True, index=g.index)
        for k, ms in limits.items():
            ok &= g[f"{k}_ms_p99"] <= ms
        best = g.loc[ok, "rate"].max() if ok.any() else np.nan
        above = g.loc[g["rate"] > best, "rate"] if ok.any() else g["rate"]
        r.update(slo=slo_words(limits), rates_tried=int(g["rate"].nunique()), min_rate_tried=g["rate"].min(),
                 max_rate_tried=g["rate"].max(), max_rate_under_slo=best,
                 next_rate_missed=above.min() if len(above) and ok.any() else np.nan)
        rows.append(r)
    return pd.DataFrame(rows)


def _config_words(cfg: dict) -> str:
    """{'workers': 2, 'policy': 'least_outstanding', 'codec': 'none', 'rate': 6.0} ->
    '2 workers, least outstanding, codec none, 6 req/s'."""
    out = []
    for k, v in cfg.items():
        if k == "workers":
            out.append(f"{v} worker{'s' if v != 1 else ''}")
        elif k == "policy":
            out.append(str(v).replace("_", " "))
        elif k == "rate":
            out.append(f"{sig3(float(v))} req/s")
        else:
            out.append(f"{k} {v}")
    return ", ".join(out)


def engines_side_by_side(df: pd.DataFrame) -> pd.DataFrame:
    """Per (device, engine): the highest offered rate within the section's SLO (:func:`section_slo`)
    with no failed request, the output throughput at that rate, and both as ratios to ryzlab's
    (same device). Fault-free points measured over HTTP only (each engine a server process driven
    by the same client): ryzlab driven in-process is never set against the peer. Empty unless
    such points hold more than one engine."""
    s = _summary(df)
    s = s[fault_free(s)]
    if "via" in s.columns:  # like for like: engines are compared only as they were measured alike (over HTTP)
        s = s[s["via"] == "http"]
    if "engine" not in s.columns or s["engine"].nunique() < 2:
        return pd.DataFrame()
    held = pd.Series(True, index=s.index)
    for k, ms in section_slo(df).items():
        held &= s[f"{k}_ms_p99"] <= ms
    if "requests_failed" in s.columns:
        held &= s["requests_failed"] == 0
    rows = []
    for (dev, eng), g in s.groupby(["device", "engine"]):
        ok = g[held.loc[g.index]]
        best = ok.loc[ok["rate"].idxmax()] if len(ok) else None
        rows.append({"device": dev, "engine": eng, "via": "http", "rates_tried": len(g),
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


def _plot_engines(s: pd.DataFrame, dev: str, limits: dict[str, float]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if s["rate"].nunique() == 1:  # one offered rate: a bar per engine, on axes from zero
        rate = f"{sig3(float(s['rate'].iloc[0]))} req/s"
        e = s.groupby("engine")[["tpot_ms_p99", "ttft_ms_p99", "output_token_throughput"]].mean().reset_index()
        for ax, col, k, unit in ((axes[0], "tpot_ms_p99", "tpot", "p99 TPOT (ms)"),
                                 (axes[1], "ttft_ms_p99", "ttft", "p99 TTFT (ms)"),
                                 (axes[2], "output_token_throughput", None, "output tokens/s")):
            config_bars(ax, e, ["engine"], col, limits.get(k) if k else None, unit)
            ax.set(title=f"{unit.split(' (')[0]} per engine\nat {rate}, the only rate swept ({dev})")
    else:
        for eng, g in s.groupby("engine"):
            g = g.groupby("rate")[["tpot_ms_p99", "ttft_ms_p99", "output_token_throughput"]].mean().reset_index()
            axes[0].plot(g["rate"], g["tpot_ms_p99"], marker="o", label=eng)
            axes[1].plot(g["rate"], g["ttft_ms_p99"], marker="o", label=eng)
            axes[2].plot(g["rate"], g["output_token_throughput"], marker="o", label=eng)
        for ax, k in ((axes[0], "tpot"), (axes[1], "ttft")):
            if k in limits:
                ax.axhline(limits[k], color="red", ls="--", lw=1, label=f"SLO p99 {k.upper()} {limits[k]:g} ms")
        axes[0].set(xlabel="offered rate (req/s)", ylabel="p99 TPOT (ms)", title=f"p99 TPOT per engine ({dev})")
        axes[1].set(xlabel="offered rate (req/s)", ylabel="p99 TTFT (ms)", yscale="log",
                    title=f"p99 TTFT per engine ({dev})")
        axes[2].set(xlabel="offered rate (req/s)", ylabel="output tokens/s", title=f"Throughput per engine ({dev})")
        from_zero(axes[2])  # a 0.4% difference drawn on a zoomed axis looks like a factor
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    show_figure(fig)


def report(df: pd.DataFrame) -> None:
    s = _summary(df)
    limits = section_slo(df)
    dev = ", ".join(sorted(map(str, s["device"].unique())))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    group = [k for k in ("engine", "via", "workers", "policy", "codec", "fault") if k in s.columns]
    if s["rate"].nunique() == 1:  # one offered rate: a bar per config (a "vs rate" axis of one value reads as nothing)
        rate = f"{sig3(float(s['rate'].iloc[0]))} req/s"
        for ax, col, k in ((axes[0], "tpot_ms_p99", "TPOT"), (axes[1], "ttft_ms_p99", "TTFT")):
            config_bars(ax, s, group, col, limits.get(k.lower()), f"p99 {k} (ms)")
            ax.set(title=f"p99 {k} per config at {rate}, the only rate swept\n(measured, device={dev})")
    else:
        for key, g in s.groupby(group):
            g = g.sort_values("rate")
            label = _config_words(dict(zip(group, key)))
            plot_series(axes[0], g["rate"], g["tpot_ms_p99"], label)
            plot_series(axes[1], g["rate"], g["ttft_ms_p99"], label)
        # one SLO per section: the spec's, on both latency plots
        for ax, k in ((axes[0], "tpot"), (axes[1], "ttft")):
            if k in limits:
                ax.axhline(limits[k], color="red", ls=":", lw=1.5, label=f"SLO p99 {k.upper()} {limits[k]:g} ms")
        axes[0].set(xlabel="offered rate (req/s)", ylabel="p99 TPOT (ms)",
                    title=f"p99 TPOT vs rate (measured, device={dev})")
        axes[1].set(xlabel="offered rate (req/s)", ylabel="p99 TTFT (ms)",
                    title=f"p99 TTFT vs rate (measured, device={dev})")
        for ax, col in ((axes[0], "tpot_ms_p99"), (axes[1], "ttft_ms_p99")):
            if wide_range(s[col]):
                ax.set_yscale("log")
            else:
                from_zero(ax)
    throughput_vs_workers(axes[2], s, dev)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    show_figure(fig)

    tl = df[df["kind"] == "timeline"] if "kind" in df.columns else df.iloc[0:0]
    if len(tl) and tl["fault_at_s"].notna().any():
        fig, ax = plt.subplots(figsize=(8, 3.5))
        faulted = tl[tl["fault_at_s"].notna()]
        for key, g in faulted.groupby([c for c in ("workers", "policy", "codec", "rate") if c in faulted.columns]):
            keys = [c for c in ("workers", "policy", "codec", "rate") if c in faulted.columns]
            ax.step(g["t_s"], g["goodput"], where="post", label=_config_words(dict(zip(keys, key))))
            ax.axvline(g["fault_at_s"].iloc[0], color="red", ls="--", lw=1)
        ax.set(xlabel="time since load start (s)", ylabel="goodput (req/s within SLO)",
               title=f"Goodput around a killed worker (red: kill) ({dev})")
        ax.grid(alpha=0.3)
        from_zero(ax)
        ax.legend(fontsize=7)
        fig.tight_layout()
        show_figure(fig)

    side = engines_side_by_side(df)
    if len(side):
        _plot_engines(s[fault_free(s)], dev, limits)
        show_table(side, f"Engines side by side (fault-free points): highest offered rate with {slo_words(limits)} "
                         f"(within the rates swept; the highest rate tried is only a floor), throughput there, "
                         f"ratios to ryzlab (device={dev})")
    show_table(s, f"Serving metrics per config (means over runs; latencies in ms; device={dev})")
    show_table(max_rate_under_slo(df), "Highest offered rate meeting the SLO: p99 TTFT and p99 TPOT both within "
               "their limits (within the rates swept: when the highest rate tried met it, the true highest rate "
               "is at least that)")
    show_table(slo_table(df), "The section's SLO and the seed's throughput targets per config, as measured "
               "(not projected); scaling against 1 worker compares fault-free points only")
    show_text(f"SLO of this section (the spec's): {slo_words(limits)}. Seed throughput targets: 1000+ req/s, "
              "~4x throughput on 4 devices. A CPU run with 2 shared cores cannot show GPU scaling; the table says "
              "what this device did.")


def config_bars(ax: Any, s: pd.DataFrame, group: list[str], col: str, slo_ms: float | None, ylabel: str) -> None:
    """One bar per config, named by the keys that differ between configs (the others are the same for
    every bar and said once, under the axis); a killed-worker point is hatched and says 'fault'; the
    SLO, when given, is a red dotted line."""
    varying = [k for k in group if s[k].nunique() > 1] or group[:1]
    same = {k: s[k].iloc[0] for k in group if k not in varying}
    # bare values for engine and via under a narrow bar ("ryzlab", "in-process"): the key words overlapped
    names = [_config_words({k: r[k] for k in varying}).replace("engine ", "").replace("via ", "").replace(", ", "\n")
             for _, r in s.iterrows()]
    clean = fault_free(s)
    bars = ax.bar(range(len(s)), s[col], color=["tab:blue" if c else "none" for c in clean],
                  edgecolor=["tab:blue" if c else "tab:red" for c in clean],
                  hatch=None, label=None)
    for b, c in zip(bars, clean):
        if not c:
            b.set_hatch("//")
    ax.bar_label(bars, labels=[sig3(v) for v in s[col]], fontsize=7)
    if slo_ms is not None:
        ax.axhline(slo_ms, color="red", ls=":", lw=1.5, label=f"SLO {ylabel.split(' (')[0]} {slo_ms:g} ms")
    ax.set_xticks(range(len(s)), names, fontsize=7)
    ax.set(ylabel=ylabel, xlabel=_config_words(same) + " (all bars)" if same else "")
    if slo_ms is not None and s[col].max() < slo_ms / 20:  # the SLO line far above the bars squashes them
        ax.set_yscale("log")
    else:
        from_zero(ax)


def throughput_vs_workers(ax: Any, s: pd.DataFrame, dev: str) -> None:
    """Output tokens/s at the highest offered rate against workers: one line per config through the
    fault-free points only; a point with a killed worker is a separate hollow marker, labelled, never
    on a line with fault-free points (1 worker against 2 with one killed compares nothing)."""
    group = [k for k in ("engine", "via", "workers", "policy", "codec", "fault") if k in s.columns]
    top = s.sort_values("rate").groupby(group).tail(1)
    clean = fault_free(top)
    series = [k for k in group if k not in ("workers", "fault")]
    for i, (key, g) in enumerate(top[clean].groupby(series)):
        g = g.sort_values("workers")
        plot_series(ax, g["workers"], g["output_token_throughput"],
                    _config_words(dict(zip(series, key if isinstance(key, tuple) else (key,)))),
                    note_dy=5 - 12 * i)  # single points at one worker count: their value labels stacked, not overlaid
    for _, r in top[~clean].iterrows():
        ax.plot([r["workers"]], [r["output_token_throughput"]], ls="none", marker="X", ms=10, mfc="none",
                color="tab:red", label=f"{_config_words({k: r[k] for k in series + ['workers']})}: "
                                       f"fault {r['fault']} (not comparable)")
    ax.set(xlabel="workers", ylabel="output tokens/s (highest offered rate)",
           title=f"Throughput vs workers, fault-free points\n(measured, device={dev})")
    ax.set_xticks(sorted(s["workers"].unique()))
    from_zero(ax)
