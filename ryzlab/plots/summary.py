"""Key results of each experiment, one short row each, for the table on top of the report.

Every row says what was judged, the value, and its basis (measured on which device, simulated,
or computed from bookkeeping), so a reader can quote it without reading the sections.
"""
from __future__ import annotations

import logging
from typing import Callable

import pandas as pd

from ryzlab.plots import human_bytes, sig3

log = logging.getLogger(__name__)

PPL_BUDGET = 0.01
"""Accuracy budget for "best codec": perplexity at most 1% above the uncompressed cache's."""


def _devices(df: pd.DataFrame) -> str:
    return ", ".join(sorted(map(str, df["device"].dropna().unique()))) if "device" in df.columns else "unknown"


def _row(result: str, value: str, basis: str) -> dict:
    return {"result": result, "value": value, "basis": basis}


def attention_bench(df: pd.DataFrame) -> list[dict]:
    from ryzlab.plots.attention_bench import summarize

    s = summarize(df)
    rows = []
    for dtype, g in s.groupby("dtype"):
        top = g.sort_values("context").iloc[-1]
        rows.append(_row(f"decode attention at the largest context ({int(top['context'])} tokens, {dtype}, "
                         f"batch {int(top['batch'])})",
                         f"{sig3(top['attn_us_p50'])} µs median; {sig3(top['achieved_gbps'])} GB/s of KV read "
                         f"({sig3(top['frac_of_copy_bw'])}× the measured copy bandwidth)",
                         f"measured, device={top['device']}"))
    return rows


def kv_compression(df: pd.DataFrame) -> list[dict]:
    from ryzlab.plots.kv_compression import summarize

    s = summarize(df)
    dev = _devices(df)
    if not {"ppl_delta", "ppl_ref", "ratio_vs_bf16"} <= set(s.columns):
        return [_row("KV bytes per token vs bf16", ", ".join(f"{r.layout}: {sig3(r.ratio_vs_bf16)}×"
                                                             for r in s.drop_duplicates("layout").itertuples()),
                     "computed from the cache's byte ledger")]
    pts = s.drop_duplicates("layout").assign(rel_ppl=lambda d: d["ppl_delta"] / d["ppl_ref"])
    ok = pts[pts["rel_ppl"] <= PPL_BUDGET]
    budget = f"perplexity at most +{PPL_BUDGET:.0%}"
    if ok.empty:
        best = pts.sort_values("rel_ppl").iloc[0]
        return [_row(f"smallest KV cache within {budget}", f"none; closest: {best['layout']} "
                     f"(+{sig3(100 * best['rel_ppl'])}% perplexity, {sig3(best['ratio_vs_bf16'])}× bf16 bytes)",
                     f"measured, device={dev}")]
    best = ok.sort_values("ratio_vs_bf16").iloc[0]
    return [_row(f"smallest KV cache within {budget}",
                 f"{best['layout']}: {sig3(best['ratio_vs_bf16'])}× the bf16 bytes "
                 f"({human_bytes(best['kv_bytes_per_token'])}/token), perplexity {100 * best['rel_ppl']:+.3g}%"
                 + (f", KL {sig3(best['kl_per_token'])} nats/token" if "kl_per_token" in best else ""),
                 f"bytes computed from the ledger; accuracy measured, device={dev}")]


def serving(df: pd.DataFrame) -> list[dict]:
    from ryzlab.plots.serving import max_rate_under_slo

    t = max_rate_under_slo(df)
    rows = []
    for r in t.to_dict("records"):
        n = int(r["workers"])
        who = (f"engine {r['engine']}, " if "engine" in r else "") + \
            f"{n} worker{'s' if n != 1 else ''}, policy {str(r['policy']).replace('_', ' ')}, " \
            f"codec {r['codec']}" + (f", fault {r['fault']}" if "fault" in r else "")
        best = r["max_rate_under_slo"]
        value = (f"{sig3(best)} req/s" if not pd.isna(best) else "none of the rates tried") + \
                f" (highest tried {sig3(r['max_rate_tried'])} req/s)"
        rows.append(_row(f"highest offered rate meeting the SLO ({r['slo']}), {who}", value,
                         f"measured, device={r['device']}"))
    return rows


def scaling(df: pd.DataFrame) -> list[dict]:
    from ryzlab.experiments.scaling import scaling_efficiency

    s = scaling_efficiency(df)
    top = s[s["world_size"] == s["world_size"].max()]
    rows = []
    for r in top.to_dict("records"):
        eff = r["scaling_efficiency"]
        value = ("no world size 1 point to compare with" if pd.isna(eff) else
                 f"efficiency {sig3(eff)} (speedup {sig3(r['speedup'])}× on {int(r['world_size'])} ranks); "
                 f"{sig3(r['tokens_per_s'])} tokens/s")
        rows.append(_row(f"scaling at the largest world size: layout {r['layout']}, context {int(r['context'])}, "
                         f"batch {int(r['batch'])}", value, f"measured, device={r.get('device', 'unknown')}"))
    return rows


def orchestrator(df: pd.DataFrame) -> list[dict]:
    rows = []
    keys = [k for k in ("mode", "device", "workers", "fault") if k in df.columns]
    mean = df.groupby(keys + ["policy", "load"], dropna=False)["e2el_ms_p99"].mean().reset_index()
    for key, g in mean.groupby(keys, dropna=False):
        ctx = dict(zip(keys, key))
        g = g[g["load"] == g["load"].max()]
        best = g.sort_values("e2el_ms_p99").iloc[0]
        rr = g.loc[g["policy"] == "round_robin", "e2el_ms_p99"]
        vs = f" ({sig3(best['e2el_ms_p99'] / rr.iloc[0])}× round robin)" if len(rr) and rr.iloc[0] > 0 else ""
        mode = str(ctx.get("mode", "live"))
        rows.append(_row(f"lowest p99 latency at load {sig3(best['load'])}: {int(ctx.get('workers', 0))} workers, "
                         f"fault {ctx.get('fault', 'none')} ({mode})",
                         f"{str(best['policy']).replace('_', ' ')}: {sig3(best['e2el_ms_p99'])} ms{vs}",
                         "simulated (a model of workers, not a measurement)" if mode == "simulated"
                         else f"measured, device={ctx.get('device', 'unknown')}"))
    return rows


KEY_RESULTS: dict[str, Callable[[pd.DataFrame], list[dict]]] = {
    "attention_bench": attention_bench, "kv_compression": kv_compression, "serving": serving,
    "scaling": scaling, "orchestrator": orchestrator,
}


def key_results(experiment: str, df: pd.DataFrame) -> list[dict]:
    """Rows of ``{result, value, basis}`` for one experiment; a row count for unknown ones, and a
    row saying so when the experiment's rows lack what its summary needs."""
    fn = KEY_RESULTS.get(experiment)
    if fn is None:
        n = df["run_id"].nunique() if "run_id" in df else 0
        return [_row("rows", f"{len(df)} rows from {n} point{'s' if n != 1 else ''}",
                     "as written by the notebook")]
    try:
        return fn(df)
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError) as e:  # partial or old rows
        log.warning("no key results for %s: %s", experiment, e)
        return [_row("key results", f"not computed: {type(e).__name__}: {e}", "n/a")]

