"""Key results of each experiment, one short row each, for the table on top of the report.

Every row says what was judged, the value, and its basis (measured on which device, simulated,
or computed from bookkeeping), so a reader can quote it without reading the sections. The rule
each row follows is written in its function's docstring, and ``tests/test_report.py`` checks each
rule on constructed rows. Rules shared by all rows: compare like with like (same device, equal
total threads, fault-free against fault-free) or say plainly that the two sides differ; a value
that only bounds the truth is written as a bound (``≥``).
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
    """Rule: per dtype, the point at the largest context: its median attention time, the KV bytes it
    read per second, and that as a fraction of the copy bandwidth measured in the same run."""
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
    """Rule: among the layouts whose perplexity is at most ``PPL_BUDGET`` above the uncompressed
    cache's, the one with the fewest KV bytes per token (bytes from the ledger, accuracy measured);
    when none is within the budget, the closest one, named as outside it. Without accuracy
    columns: the bytes ratio of every layout, as bookkeeping."""
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


def weight_compression(df: pd.DataFrame) -> list[dict]:
    """Rule: among the weight format x KV codec points whose perplexity is at most ``PPL_BUDGET`` above
    the float32-weights, uncompressed-cache reference, the one with the fewest weight bytes (ledger);
    none within the budget: the closest, named as outside it."""
    from ryzlab.plots.weight_compression import describe, key_result

    best, s = key_result(df, PPL_BUDGET)
    basis = f"bytes computed from the weight ledger; accuracy and time measured, device={_devices(df)}"
    if best is None:
        return [_row(f"fewest weight bytes within perplexity +{PPL_BUDGET:.0%}",
                     "none; closest: " + describe(s.sort_values("rel_ppl").iloc[0]), basis)]
    return [_row(f"fewest weight bytes within perplexity +{PPL_BUDGET:.0%}", describe(best), basis)]


def projection(df: pd.DataFrame) -> list[dict]:
    """Rule: one row per projected decode step (``series == "static"``: model, device, tp, batch) and
    one for the highest projected serving rate that was run; every row's basis says PROJECTED, names
    the calibration and carries the validation error on held-out published figures beside it. Never
    a measurement."""
    def basis(r: pd.Series) -> str:
        err = r.get("validation_median_abs_error")
        val = (f"; validation on {int(r['validation_rows'])} held-out published rows: median |error| "
               f"{err:.0%}, worst {r['validation_worst_abs_error']:.0%}") if err == err and err is not None else ""
        return f"PROJECTED (not measured), calibration {r.get('calibration')}{val}"

    rows = []
    for _, r in df[df["series"] == "static"].iterrows():
        rows.append(_row(f"decode step of {r['model']} on {r['device']}, tp {int(r['tp'])}, batch {int(r['batch'])}",
                         f"{sig3(r['step_ms'])} ms ({sig3(r['decode_tokens_per_s'])} tokens/s per sequence)", basis(r)))
    serve = df[(df["series"] == "serving")].sort_values("rate")
    if len(serve):
        r = serve.iloc[-1]
        rows.append(_row(f"serving {r['model']} on {r['device']}, tp {int(r['tp'])}, at {sig3(r['rate'])} req/s "
                         f"(the highest rate projected)",
                         f"p99 TPOT {sig3(r['tpot_ms_p99'])} ms, p99 TTFT {sig3(r['ttft_ms_p99'])} ms", basis(r)))
    return rows


def _rate_value(r: dict) -> str:
    """The highest offered rate meeting the SLO, worded as what the rates tried can show."""
    best, top, n = r["max_rate_under_slo"], r["max_rate_tried"], int(r.get("rates_tried", 2))
    if pd.isna(best):
        return (f"not met at the offered rate {sig3(top)} req/s" if n == 1 else
                f"none of the {n} offered rates tried ({sig3(r.get('min_rate_tried', top))}-{sig3(top)} req/s) met it")
    if n == 1:
        return f"met at the offered rate {sig3(best)} req/s (the only rate tried: the highest rate is ≥ {sig3(best)})"
    if best >= top:
        return f"≥ {sig3(best)} req/s (met at the highest rate tried; no higher rate was tried)"
    return f"{sig3(best)} req/s (the next rate tried, {sig3(r['next_rate_missed'])} req/s, missed it)"


def serving(df: pd.DataFrame) -> list[dict]:
    """Rules:

    * "highest offered rate meeting the SLO", one row per config (engine, workers, policy, codec,
      fault): the SLO is the points' own (the spec's), named in the row. The value is exact only when
      a higher rate was tried and missed; when the highest rate tried met it, the row says ``≥``; with
      one rate tried, "met at the offered rate". A point with a fault says so in its result.
    * "request throughput, N workers vs 1": only fault-free points, same engine, policy, codec and
      offered rate; a point with a killed worker is never the N-worker side (a row says it was
      left out when it is the only multi-worker point).
    """
    from ryzlab.plots.serving import _summary, fault_free, max_rate_under_slo

    t = max_rate_under_slo(df)
    rows = []
    for r in t.to_dict("records"):
        n = int(r["workers"])
        fault = str(r.get("fault", "none"))
        who = (f"engine {r['engine']}" + (f" ({r['via']})" if r.get("via") else "") + ", " if "engine" in r else "") + \
            f"{n} worker{'s' if n != 1 else ''}, policy {str(r['policy']).replace('_', ' ')}, codec {r['codec']}" + \
            (f"; FAULT POINT: {fault} (a worker killed under load)" if fault not in ("none", "nan") else "")
        rows.append(_row(f"highest offered rate meeting the SLO ({r['slo']}), {who}", _rate_value(r),
                         f"measured, device={r['device']}"))
    s = _summary(df)
    clean = s[fault_free(s)]
    same = [k for k in ("device", "engine", "via", "policy", "codec", "rate") if k in s.columns]
    for key, g in clean.groupby(same, dropna=False):
        base, multi = g[g["workers"] == 1], g[g["workers"] > 1]
        ctx = dict(zip(same, key if isinstance(key, tuple) else (key,)))
        for _, m in multi.iterrows():
            if len(base) and base["request_throughput"].iloc[0] > 0:
                rows.append(_row(f"request throughput, {int(m['workers'])} workers vs 1 (fault-free points, "
                                 f"{_ctx_words(ctx)})",
                                 f"{sig3(m['request_throughput'] / base['request_throughput'].iloc[0])}× "
                                 f"({sig3(m['request_throughput'])} vs {sig3(base['request_throughput'].iloc[0])} req/s)",
                                 f"measured, device={ctx.get('device', 'unknown')}"))
    faulted = s[~fault_free(s) & (s["workers"] > 1)]
    if len(faulted) and not (clean["workers"] > 1).any():
        rows.append(_row("request throughput vs workers", "not compared: the only multi-worker point(s) had a "
                         "worker killed; a fault point is not compared with a fault-free 1-worker point",
                         f"measured, device={_devices(df)}"))
    return rows


def _ctx_words(ctx: dict) -> str:
    return ", ".join(f"{k} {str(v).replace('_', ' ')}" + (" req/s" if k == "rate" else "")
                     for k, v in ctx.items() if k != "device")


def scaling(df: pd.DataFrame) -> list[dict]:
    """Rule: each point at the largest world size against a world size 1 point of the same model,
    codec, context and batch, by median tokens/s. Preferred baseline: one rank with the same total
    threads (world size x threads per rank): that speedup is the layout's own effect. Without one,
    the row says plainly that the two sides ran on different thread counts and gives the speedup
    under those words; it never calls a thread-count effect parallel efficiency."""
    keys = [c for c in ("device", "model", "codec", "key_granularity", "context", "batch", "budget_mib")
            if c in df.columns]
    thr = "threads" if "threads" in df.columns else "torch_threads" if "torch_threads" in df.columns else None
    d = df.assign(_threads=df[thr].fillna(1).astype(int) if thr else 1)
    med = d.groupby(keys + ["layout", "world_size", "_threads"], dropna=False)["tokens_per_s"].median().reset_index()
    med["_total"] = med["world_size"] * med["_threads"]
    rows = []
    for r in med[med["world_size"] == med["world_size"].max()].to_dict("records"):
        ws, t = int(r["world_size"]), int(r["_threads"])
        same = pd.Series(True, index=med.index)
        for k in keys:  # NaN matches NaN: a column a point did not record still pairs it
            same &= med[k].eq(r[k]) | (med[k].isna() & pd.isna(r[k]))
        base = med[(med["world_size"] == 1) & same]
        equal = base[base["_threads"] == r["_total"]]
        what = (f"layout {r['layout']} ({ws} ranks x {t} thread{'s' if t != 1 else ''} = {ws * t} threads)"
                + "".join(f", {k} {int(r[k]) if isinstance(r[k], float) and r[k].is_integer() else r[k]}"
                          for k in ("context", "batch") if k in r))
        if ws == 1:
            value = "no larger world size in this sweep"
        elif len(equal):
            b = equal.iloc[0]
            value = (f"{sig3(r['tokens_per_s'] / b['tokens_per_s'])}× the tokens/s of 1 rank with the same "
                     f"{int(b['_threads'])} threads ({sig3(r['tokens_per_s'])} vs {sig3(b['tokens_per_s'])} tokens/s)")
        elif len(base):
            b = base.sort_values("_threads").iloc[-1]
            bt = int(b["_threads"])
            value = (f"{sig3(r['tokens_per_s'] / b['tokens_per_s'])}× the tokens/s of 1 rank x {bt} thread"
                     f"{'s' if bt != 1 else ''} — NOT at equal cores ({ws * t} threads vs {bt}): more threads and "
                     f"the layout together, not parallel efficiency ({sig3(r['tokens_per_s'])} vs "
                     f"{sig3(b['tokens_per_s'])} tokens/s)")
        else:
            value = "no world size 1 point to compare with"
        rows.append(_row(f"scaling at the largest world size: {what}", value,
                         f"measured, device={r.get('device', 'unknown')}"))
    return rows


def orchestrator(df: pd.DataFrame) -> list[dict]:
    """Rule: per (mode, device, workers, fault), at the highest load: the policy with the lowest mean
    p99 end-to-end latency, and that as a multiple of round robin's at the same load; simulated rows
    are labelled simulated, never measured."""
    rows = []
    keys = [k for k in ("mode", "device", "workers", "fault") if k in df.columns]
    mean = df.groupby(keys + ["policy", "load"], dropna=False)["e2el_ms_p99"].mean().reset_index()
    for key, g in mean.groupby(keys, dropna=False):
        ctx = dict(zip(keys, key))
        g = g[g["load"] == g["load"].max()]
        best = g.sort_values("e2el_ms_p99").iloc[0]
        rr = g.loc[g["policy"] == "round_robin", "e2el_ms_p99"]
        vs = f" ({sig3(best['e2el_ms_p99'] / rr.iloc[0])}× round robin)" if len(rr) and rr.iloc[0] > 0 else ""
        if best["policy"] == "round_robin" and len(g) > 1:  # "1× round robin" compares it with itself
            nxt = g.sort_values("e2el_ms_p99").iloc[1]
            vs = f" (next: {str(nxt['policy']).replace('_', ' ')}, {sig3(nxt['e2el_ms_p99'])} ms)"
        mode = str(ctx.get("mode", "live"))
        rows.append(_row(f"lowest p99 latency at offered load {sig3(best['load'])} of capacity: "
                         f"{int(ctx.get('workers', 0))} workers, fault {ctx.get('fault', 'none')} ({mode})",
                         f"{str(best['policy']).replace('_', ' ')}: {sig3(best['e2el_ms_p99'])} ms{vs}",
                         "simulated (a model of workers, not a measurement)" if mode == "simulated"
                         else f"measured, device={ctx.get('device', 'unknown')}"))
    return rows


KEY_RESULTS: dict[str, Callable[[pd.DataFrame], list[dict]]] = {
    "attention_bench": attention_bench, "kv_compression": kv_compression, "serving": serving,
    "scaling": scaling, "orchestrator": orchestrator, "weight_compression": weight_compression,
    "projection": projection,
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

