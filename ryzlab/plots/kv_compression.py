"""Report section for kv_compression: memory vs accuracy (Pareto, ryzlab layouts and peer caches on the
same axes, model and text named) and decode time vs context; the kv-plan figure."""
from __future__ import annotations

import ast
from typing import Any, Mapping

import matplotlib.pyplot as plt
import pandas as pd

from ryzlab.config import CacheConfig
from ryzlab.evaluation.accuracy import layout_label
from ryzlab.evaluation.plan import pareto_front
from ryzlab.plots import from_zero, plot_series, show_figure, show_table, sig3, wide_range

LAYOUT = ["codec", "key_granularity", "value_granularity", "group_size", "symmetric", "residual", "block_size",
          "rotation", "layer_codecs", "peer", "model_name", "text"]


def layer_codecs_of(value: Any) -> tuple[str, ...]:
    """A row's ``layer_codecs`` as the tuple the config held, whatever form it was stored in: a tuple
    or list (this version), a parquet list (numpy array), ``"int4/int2"`` (:func:`summarize`,
    ``layout_columns``), or the ``"()"`` / ``"('int4', 'int2')"`` text that older runs wrote."""
    if value is None or (isinstance(value, float) and value != value):
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("(", "["):
            parsed = ast.literal_eval(text)  # literals only: never code
            return tuple(map(str, parsed))
        return tuple(c for c in text.split("/") if c)
    return tuple(map(str, value))


def cache_config_of(r: Mapping[str, Any]) -> CacheConfig:
    """The cache layout a kv_compression row was measured with (its swept CacheConfig fields)."""
    fields = {k: r[k] for k in ("codec", "key_granularity", "value_granularity", "group_size", "residual",
                                "block_size", "rotation") if k in r and not _missing(r[k])}
    for k in ("group_size", "residual", "block_size"):
        if k in fields:
            fields[k] = int(fields[k])
    sym = r.get("symmetric", True)
    fields["symmetric"] = sym if isinstance(sym, bool) else str(sym) != "False"
    return CacheConfig(**fields, layer_codecs=layer_codecs_of(r.get("layer_codecs")))


def layout_name(r: Mapping[str, Any]) -> str:
    """THE label of a kv_compression layout in plots, tables and key results: a peer cache by its
    name, else :func:`ryzlab.evaluation.accuracy.layout_label` of the row's cache config (the same
    names ``ryzlab kv-plan`` prints: ``int4 k=channel``, ``int2 r64 asym rot``, ``mixed 2xint4+2xint2``)."""
    peer = r.get("peer")
    if isinstance(peer, str) and peer:
        return f"HF {peer.replace('_', ' ')} (peer)"
    return layout_label(cache_config_of(r))


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per point: medians over the timed decode steps, the point's memory/accuracy."""
    df = df.copy()
    for c in ("layer_codecs", "peer"):  # tuples are not groupable keys; "" = not set
        if c in df.columns:
            df[c] = df[c].map(lambda x: "/".join(layer_codecs_of(x)) if c == "layer_codecs" else
                              ("" if _missing(x) else str(x)))
    keys = [c for c in ("device", *LAYOUT, "context", "batch") if c in df.columns]
    firsts = [c for c in ("prefill_ms", "kv_bytes_per_token", "ratio_vs_bf16", "cache_bytes",
                          "max_tokens_in_budget", "kl_per_token", "ppl", "ppl_ref", "ppl_delta", "rel_logit_err",
                          "k_rel_err", "v_rel_err", "attn_rel_err") if c in df.columns]
    g = df.groupby(keys, dropna=False)
    out = g.agg(tpot_ms_p50=("tpot_ms", "median"), tpot_ms_p90=("tpot_ms", lambda s: s.quantile(0.9)),
                **{c: (c, "first") for c in firsts}).reset_index()
    out.insert(0, "layout", [layout_name(r) for r in out.to_dict("records")])
    return out.sort_values(["context", "batch", "kv_bytes_per_token"] if "batch" in out else keys)


def pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated in (lower x, lower y), sorted by x."""
    return points[pareto_front(points, x, y)].sort_values(x)


def _where(s: pd.DataFrame) -> str:
    """Which model(s) and text the points come from, for titles."""
    parts = []
    for col, name in (("model_name", "model"), ("text", "text")):
        if col in s.columns:
            parts.append(f"{name}={', '.join(sorted(map(str, s[col].dropna().unique())))}")
    return "; ".join(parts)


def report(df: pd.DataFrame) -> None:
    s = summarize(df)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    acc = "kl_per_token" if "kl_per_token" in s else None
    if acc is not None:
        # accuracy does not depend on the timing context/batch: one point per layout
        pts = s.groupby("layout", as_index=False).agg(ratio_vs_bf16=("ratio_vs_bf16", "median"),
                                                      kl_per_token=("kl_per_token", "first"),
                                                      ppl_delta=("ppl_delta", "first"))
        pts["is_peer"] = pts.layout.str.endswith("(peer)")
        ax = axes[0]
        # codec none differs from the dense reference by float rounding only (~1e-9): draw it
        # (and any exact zero) one decade under the best compressed layout instead
        comp = pts.loc[(pts.layout != "none") & (pts.kl_per_token > 0), "kl_per_token"]
        floor = comp.min() / 10 if len(comp) else 1e-9
        yv = pts.kl_per_token.where(pts.layout != "none", 0.0).clip(lower=floor)
        own, peers = ~pts.is_peer, pts.is_peer
        ax.scatter(pts.ratio_vs_bf16[own], yv[own], label="ryzlab layouts")
        if peers.any():
            ax.scatter(pts.ratio_vs_bf16[peers], yv[peers], marker="s", color="tab:orange", label="peer caches")
        for _, r in pts.assign(y=yv).iterrows():
            ax.annotate(r["layout"], (r["ratio_vs_bf16"], r["y"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto(pts.assign(kl_per_token=yv)[own], "ratio_vs_bf16", "kl_per_token")
        ax.plot(front.ratio_vs_bf16, front.kl_per_token, "r--", lw=1, label="ryzlab Pareto front")
        ax.set(yscale="log", xlabel="KV bytes per token / bf16 (scales, residual, padding included)",
               ylabel="KL per token vs uncompressed (teacher forcing)",
               title=f"Memory vs accuracy (device={', '.join(sorted(s.device.unique()))}, measured)\n{_where(s)}")
        ax.set_xlim(left=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    dev = ", ".join(sorted(map(str, s.device.unique())))
    if s["context"].nunique() > 1:
        for (layout, batch), g in s.groupby(["layout", "batch"]):
            g = g.sort_values("context")
            plot_series(axes[1], g["context"], g["tpot_ms_p50"], f"{layout}, batch {batch}")
        if wide_range(s["context"], 8):
            axes[1].set_xscale("log", base=2)
        axes[1].set(xlabel="context (tokens)", title=f"Decode step vs context (measured, device={dev})")
        axes[1].legend(fontsize=7, title="layout, batch", title_fontsize=7)
    else:  # one context: one bar per layout with its value, not lines through single points
        g = s.groupby("layout", sort=False)["tpot_ms_p50"].median()
        bars = axes[1].barh(list(g.index), g.values)
        axes[1].bar_label(bars, labels=[sig3(v) for v in g.values], fontsize=8)
        axes[1].set_ylabel("layout")
        axes[1].margins(x=0.15)  # room for the value labels
        axes[1].set(title=f"Decode step at context {int(s['context'].iloc[0])}, batch "
                          f"{', '.join(map(str, sorted(s['batch'].unique())))} (measured, device={dev})")
    axes[1].set(**{("ylabel" if s["context"].nunique() > 1 else "xlabel"): "decode step, median (ms)"})
    if s["context"].nunique() > 1:
        from_zero(axes[1])
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    show_figure(fig)
    show_table(s, "KV compression per point (device=" + ", ".join(sorted(s.device.unique())) + "; medians over "
               f"timed decode steps; accuracy under teacher forcing; {_where(s) or 'held-out stdlib text'})")


def plan_figure(result: Any) -> Any:
    """The kv-plan Pareto plot: bytes/token vs KL of every measured layout, the front, the budget, the pick."""
    t = result.table
    fig, ax = plt.subplots(figsize=(8, 5))
    floor = t.kl_per_token[t.kl_per_token > 0].min() / 10 if (t.kl_per_token > 0).any() else 1e-9
    y = t.kl_per_token.clip(lower=floor)
    ax.scatter(t.bytes_vs_fp32, y, c=["tab:green" if w else "tab:gray" for w in t.within_budget])
    for x_, y_, name in zip(t.bytes_vs_fp32, y, t.layout):
        ax.annotate(name, (x_, y_), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = t.assign(y=y)[t.pareto].sort_values("bytes_vs_fp32")
    ax.plot(front.bytes_vs_fp32, front.y, "r--", lw=1, label="Pareto front")
    ax.axhline(result.max_kl, color="k", lw=0.8, ls=":", label=f"budget KL {result.max_kl:g}")
    if result.best is not None:
        ax.scatter([result.best.bytes_vs_fp32], [max(result.best.kl_per_token, floor)], s=160, facecolors="none",
                   edgecolors="r", label=f"pick: {result.best.layout}")
    ax.set(yscale="log", xlabel="KV bytes per token / fp32 (ledger: scales, residual, padding included)",
           ylabel="KL per token vs uncompressed (teacher forcing)",
           title=f"kv-plan ({t.device.iloc[0]}, measured)\nmodel={result.model}; text={result.text}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
