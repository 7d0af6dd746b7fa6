"""The projection against figures no one fitted it to: published GPU tables (``published.yaml``)
and, on this CPU, measurements of layouts the calibration never saw.

Every row says whether the calibration was fitted to it (``calibrate``); the summary statistics
(median and worst |error|) are over the held-out rows only.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

import yaml

from ryzlab.projection.calibration import Calibration, default_calibration, fit
from ryzlab.projection.cost import Deployment, StepShape, gemm_ms, step_cost
from ryzlab.projection.hardware import get_device
from ryzlab.projection.shapes import load_shape

__all__ = ["PUBLISHED_FILE", "published_tables", "predict_published", "validate_published", "fit_gpu_default",
           "error_summary", "static_batch_ms", "probe_gloo_link", "probe_corun", "profile_gemms", "fit_gemm_row_eff",
           "profile_cp_attention", "fit_cp_attention", "profile_cp_planning", "fit_cp_planning"]

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


def published_tables() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(PUBLISHED_FILE.read_text())


def static_batch_ms(model, dev, cal: Calibration, dep: Deployment, batch: int, prompt: int, output: int) -> float:
    """A static batch: every prompt prefilled in one step (its first token), then ``output - 1``
    decode steps of the whole batch over a growing context."""
    t = step_cost(model, dev, cal, dep, StepShape.prefill(prompt, 0, batch)).total_ms
    for i in range(1, output):
        t += step_cost(model, dev, cal, dep, StepShape.decode(batch, prompt + i)).total_ms
    return t


def predict_published(table: dict[str, Any], row: dict[str, Any], cal: Calibration) -> float:
    """The projected value of one published row, in the table's unit."""
    dev = get_device(table["device"])
    model, _ = load_shape(row["model"])
    dep = Deployment(tp=row["tp"], weights=row["weights"], int4_group=table.get("int4_group", 128),
                     codec=table.get("codec", "none"))
    kind = table["kind"]
    if kind == "decode":
        prompt, output = row.get("prompt", table["prompt"]), row.get("output", table["output"])
        return 1e3 / step_cost(model, dev, cal, dep, StepShape.decode(1, prompt + output // 2)).total_ms
    if kind == "static":
        b, p, o = row["batch"], row["prompt"], row["output"]
        total = b * o / (static_batch_ms(model, dev, cal, dep, b, p, o) / 1e3)
        return total / row["tp"] if table.get("per_gpu") else total
    if kind == "ttft":
        return step_cost(model, dev, cal, dep, StepShape.prefill(row["prompt"])).total_ms
    raise ValueError(f"published table kind {kind!r} is not one of decode, static, ttft")


def validate_published(cals: dict[str, Calibration] | None = None) -> list[dict[str, Any]]:
    """One row per published figure: table, setup, projected, published, error (projected / published - 1)."""
    out = []
    for name, table in published_tables().items():
        cal = (cals or {}).get(table["device"]) or default_calibration(table["device"])
        for row in table["rows"]:
            proj = predict_published(table, row, cal)
            out.append({"table": name, "device": table["device"], "kind": table["kind"], **{
                k: row.get(k) for k in ("model", "tp", "weights", "batch", "prompt", "output")},
                "published": float(row["value"]), "projected": proj, "error": proj / row["value"] - 1,
                "calibrate": bool(row.get("calibrate", False)), "calibration": cal.name, "basis": "projected"})
    return out


def fit_gpu_default(start: Calibration | None = None) -> Calibration:
    """Refit the shipped ``gpu-default`` to the rows marked ``calibrate`` (bandwidth fraction and
    the int8 / int4 weight efficiencies only; the rest stay at their documented values)."""
    start = start or default_calibration("a100-80gb")
    rows = []
    for _, table in published_tables().items():
        for row in table["rows"]:
            if row.get("calibrate"):
                rows.append(((table, row), 1e3 / row["value"] if table["kind"] == "decode" else row["value"]))

    def predict(cal: Calibration, x: tuple[dict, dict]) -> float:
        v = predict_published(x[0], x[1], cal)
        return 1e3 / v if x[0]["kind"] == "decode" else v

    return fit(start, predict, rows, fields=("bw_frac", "int8_weight_eff", "int4_weight_eff"), name="gpu-default",
               fitted_from="published rows marked calibrate in published.yaml")


def error_summary(rows: list[dict[str, Any]], key: Callable[[dict], bool] = lambda r: not r.get("calibrate")
                  ) -> dict[str, float]:
    """Median and worst |error| (fractions) over the rows ``key`` keeps (default: held-out rows)."""
    errs = [abs(r["error"]) for r in rows if key(r) and not math.isnan(r["error"])]
    if not errs:
        return {"rows": 0.0, "median_abs_error": math.nan, "worst_abs_error": math.nan}
    return {"rows": float(len(errs)), "median_abs_error": statistics.median(errs), "worst_abs_error": max(errs)}


def median_rel_se(runs: list[float]) -> float:
    """The relative standard error of the median of ``runs`` (1.2533 x the sd of their logs / sqrt(n),
    the large-sample figure for a median): how far the point itself would move on a rerun -- a perfect
    projection would still be off by about this much. NaN with fewer than two runs or a run <= 0."""
    if len(runs) < 2 or min(runs) <= 0:
        return math.nan
    return 1.2533 * statistics.stdev(math.log(x) for x in runs) / math.sqrt(len(runs))


def _link_rank(rank: int, world_size: int, tp: int, cp: int, numel: int, iters: int, work_rows: int,
               cpu_comm: str = "gloo") -> dict[str, float]:
    """On each rank: mean seconds of one tp all-reduce and one cp all-gather of ``numel`` floats,
    each entered after ``work_rows`` rows of one-thread matmul (as a layer's collective follows its
    GEMMs), with no barrier in between: what a rank pays per collective inside a decode step.
    ``work`` is the mean seconds of that matmul alone (the gap between two collectives)."""
    import time

    import torch

    from ryzlab.config import ParallelConfig
    from ryzlab.parallel.mesh import init_parallel

    g = init_parallel(ParallelConfig(tp=tp, cp=cp, cpu_comm=cpu_comm))
    x = torch.ones(numel)
    a, w = torch.randn(work_rows, 256), torch.randn(256, 256)
    out: dict[str, float] = {}
    for name, comm, call in (("all_reduce", g.tp, lambda c: c.all_reduce(x)),
                             ("all_gather", g.cp, lambda c: c.all_gather(x))):
        if comm.world_size == 1:
            continue
        torch.distributed.barrier()
        times, works = [], []
        for i in range(iters + 5):
            t0 = time.perf_counter()
            a @ w
            t1 = time.perf_counter()
            call(comm)
            if i >= 5:
                times.append(time.perf_counter() - t1)
                works.append(t1 - t0)
        out[name], out["work"] = statistics.fmean(times), statistics.fmean(works)
        out[f"work_{name}"] = out["work"]
    return out


LINK_WORK_ROWS = (64, 2048)
"""Matmul rows a probe rank does before each collective: ~0.1 ms and ~3 ms of one-thread work on this
CPU (a small layer's GEMMs, a large layer's attention)."""


def probe_gloo_link(numel: int = 1024, iters: int = 1000, work_rows: tuple[int, int] = LINK_WORK_ROWS,
                    cpu_comm: str = "gloo", layout: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """Measure this host's link between CPU ranks the way nccl-tests measures a GPU link: a 2-rank
    all-reduce and a 2-rank all-gather of ``numel`` floats (no model step runs), through gloo or,
    with ``cpu_comm="shm"``, ryzlab's shared-memory channel (:mod:`ryzlab.parallel.shm`; then the
    link's bandwidth is this host's one-thread copy bandwidth).

    Measured in the pattern a decode step issues them: each rank does some one-thread work
    (``work_rows`` x 256 x 256 matmul), then enters the collective, ``iters`` times, no barrier
    between; the **mean** time per call, because a step pays the sum of its collectives (a call on
    this VM either completes in ~0.4 ms or waits ~4 ms, a scheduler tick, for the peer to be woken:
    median 0.6-0.9 ms, mean 1.4-1.8 ms, p90 ~4 ms; over 1000 calls the mean moves ~10 % between
    probes, over 300 ~25 %). On a
    shared-core VM a collective mostly waits for the peer process to be woken, so a collective
    measured right after a barrier (both ranks already awake) reads low: 523 us against 0.9-1.2 ms
    per call inside tp 2 steps on this machine. It also costs more the longer the ranks worked
    since the last one (they drift apart, and the one that waits idles longer): 0.8 ms after
    ~0.1 ms of work, 1.6 ms after ~3 ms (all-gather, this VM). So the probe runs at two amounts of
    work (``work_rows``) and returns the slope, ``coll_skew_frac`` (extra collective time per unit
    of work before it, mean of the all-reduce's and the all-gather's), and the alpha terms at no work.

    ``layout=(2, 2)``: the collectives are measured with every rank of that
    layout running at once (tp groups all-reduce, cp groups all-gather, ``tp * cp`` processes), as
    nccl-tests is run at the GPU count it is for: on a host with fewer cores than ranks a collective
    also waits for its peer to get a core back from another rank. The alpha terms are then divided
    by the core share the cost model multiplies every collective by (``tp * cp / cores``), so the
    model's product gives back what was measured; the skew is per unit of work as measured (the
    work's wall time, shared cores included, as the model's share-scaled work is).

    Returns ``coll_base_us`` and ``link_latency_us`` solving the cost model's alpha terms
    (all-reduce of 2 = base + 2 hops, all-gather of 2 = base + 1 hop; bytes at the catalog's
    link bandwidth are subtracted first), ``coll_skew_frac``, and the raw means per work size.
    """
    from ryzlab.orchestrator import launch

    def one(tp: int, cp: int, rows: int) -> tuple[float, float]:
        res = launch(_link_rank, tp * cp, args=(tp, cp, numel, iters, rows, cpu_comm), backend="gloo",
                     threads_per_rank=1)
        key = "all_reduce" if tp == 2 else "all_gather"
        return max(r[key] for r in res), statistics.fmean(r["work"] for r in res)

    def both(rows: int) -> tuple[tuple[float, float], tuple[float, float]]:
        if layout == (2, 2):   # every rank of the layout at once: one launch measures both collectives
            res = launch(_link_rank, layout[0] * layout[1], args=(*layout, numel, iters, rows, cpu_comm),
                         backend="gloo", threads_per_rank=1)
            return ((max(r["all_reduce"] for r in res), statistics.fmean(r["work_all_reduce"] for r in res)),
                    (max(r["all_gather"] for r in res), statistics.fmean(r["work_all_gather"] for r in res)))
        return one(2, 1, rows), one(1, 2, rows)

    if tuple(layout) not in ((1, 1), (2, 2)):
        raise ValueError(f"layout must be (1, 1) (a 2-rank pair per collective) or (2, 2) (tp 2 x cp 2, all four "
                         f"ranks at once): the cost model's alpha terms are solved from groups of 2; got {layout}")
    (ar0, w_ar0), (ag0, w_ag0) = both(work_rows[0])
    (ar1, w_ar1), (ag1, w_ag1) = both(work_rows[1])
    slopes = [(t1 - t0) / (w1 - w0) for t0, t1, w0, w1 in ((ar0, ar1, w_ar0, w_ar1), (ag0, ag1, w_ag0, w_ag1))
              if w1 > w0]
    skew = max(0.0, statistics.fmean(slopes)) if slopes else 0.0
    ar, ag = max(ar0 - skew * w_ar0, 0.0), max(ag0 - skew * w_ag0, 0.0)   # at no work before the call
    ranks = 4 if layout == (2, 2) else 2
    share = max(1.0, ranks / get_device("cpu").devices_per_node)   # what the cost model multiplies them by
    ar, ag = ar / share, ag / share
    dev = get_device("cpu")
    gbps = dev.hbm_gbps if cpu_comm == "shm" else dev.link_gbps   # shared memory: a copy in, a copy out
    wire = numel * 4 / (gbps * 1e9)       # one chunk over the link, seconds
    ar_us, ag_us = (ar - wire) * 1e6, (ag - wire) * 1e6
    hop = max(ar_us - ag_us, 0.0)
    return {"all_reduce_us": ar0 * 1e6, "all_gather_us": ag0 * 1e6, "work_us": w_ag0 * 1e6,
            "all_reduce_busy_us": ar1 * 1e6, "all_gather_busy_us": ag1 * 1e6, "work_busy_us": w_ag1 * 1e6,
            "link_latency_us": hop, "coll_base_us": max(ag_us - hop, 0.0), "coll_skew_frac": skew,
            "link_gbps": gbps, "layout": f"tp{layout[0]}xcp{layout[1]}" if layout == (2, 2) else "pairs"}


def _corun_rank(rank: int, world_size: int, model, rows: int, iters: int, rounds: int, tp: int = 1
                ) -> dict[str, list[float]]:
    """On each rank: ``rounds`` x (each rank alone in turn while the others wait at a barrier, then
    all at once) of ``iters`` one-thread passes of ``rows`` rows through ``model``'s layer matrices.
    -> ms per pass, alone and co-running."""
    import time

    import torch
    import torch.distributed as dist

    torch.manual_seed(rank)
    stream = _weight_stream(model, rows, tp=tp)

    def work() -> float:
        t0 = time.perf_counter()
        for _ in range(iters):
            stream()
        return (time.perf_counter() - t0) / iters * 1e3

    work()   # warm: pages touched, allocator settled
    out: dict[str, list[float]] = {"alone": [], "corun": []}
    for _ in range(rounds):
        for turn in range(world_size):   # each rank alone, the others idle at the barrier
            dist.barrier()
            if turn == rank:
                out["alone"].append(work())
            dist.barrier()
        dist.barrier()
        out["corun"].append(work())
        dist.barrier()
    return out


def probe_corun(model, ranks: int = 2, rows: int = 4, iters: int = 20, rounds: int = 15, tp: int = 1
                ) -> dict[str, float]:
    """How much ranks on one host slow each other beyond sharing its cores: ``ranks`` processes run
    the same one-thread work -- one rank's layer GEMMs of ``model`` at ``tp`` over ``rows`` rows (a
    rank's weights: its working set) -- first each alone while the others wait, then all at once,
    interleaved ``rounds`` times so drift hits both. No model step runs and no collective is timed.

    Ranks that together hold more than the host's last-level cache stream their weights from memory
    instead: on this 2-vCPU VM (32 MiB L3 shared) two ranks of the reference model's full weights
    (11.8 MB each, a cp rank's) ran x1.16-1.32 slower together than alone, two of half the weights
    (a tp 2 rank's) x1.00-1.05 (in a noisy minute one probe read x1.56). ``corun_factor`` = (the
    median over rounds of together / alone, mean over ranks) / the core share (``ranks`` / cores when
    more ranks than cores: the cost model's share already prices that), at least 1: the
    calibration's ``corun_factor`` for that layout. Also returns the raw medians."""
    import os

    from ryzlab.orchestrator import launch

    if ranks < 2:
        raise ValueError(f"probe_corun needs at least 2 ranks, got {ranks}")
    res = launch(_corun_rank, ranks, args=(model, rows, iters, rounds, tp), backend="gloo", threads_per_rank=1)
    alone = [statistics.median(r["alone"]) for r in res]
    corun = [statistics.median(r["corun"]) for r in res]
    share = max(1.0, ranks / (os.cpu_count() or 1))
    # each round's together / alone (taken seconds apart, so drift cancels), median per rank, mean of ranks
    factor = statistics.fmean(statistics.median(c / a for c, a in zip(r["corun"], r["alone"])) for r in res) / share
    return {"corun_factor": max(1.0, factor), "alone_ms": statistics.fmean(alone),
            "corun_ms": statistics.fmean(corun), "ranks": float(ranks), "share": share}


def _cold_median_ms(fn: Callable[[], Any], between: Callable[[], Any], iters: int) -> float:
    """Median ms of ``fn`` over ``iters`` calls, each after an untimed ``between()`` (what runs
    before it in a real step: the layer's GEMMs stream the weights and evict the caches)."""
    import time

    fn()
    times = []
    for _ in range(iters):
        between()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _weight_stream(model, batch: int, dtype: str = "float32", tp: int = 1) -> Callable[[], None]:
    """One pass of ``batch`` one-token rows through every layer's GEMMs of ``model`` (wq, wk, wv, wo,
    w1, w3, w2 of one rank at ``tp``, random weights, torch ``F.linear``, the calling thread's torch threads)."""
    import torch
    import torch.nn.functional as F

    from ryzlab.projection.cost import _layer_matrices

    dt = getattr(torch, dtype)
    mats = [torch.randn(r, c, dtype=dt) for _ in range(model.n_layers) for r, c in _layer_matrices(model, tp)]
    xs = {c: torch.randn(batch, c, dtype=dt) for c in {m.shape[1] for m in mats}}

    def run() -> None:
        for m in mats:
            F.linear(xs[m.shape[1]], m)
    return run


def _median_ms(fn: Callable[[], Any], iters: int, repeats: int = 5) -> float:
    import time

    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(runs)


def profile_gemms(model, batches: tuple[int, ...] = (1, 4, 16, 64), dtype: str = "float32", iters: int = 50
                  ) -> list[dict[str, float]]:
    """Operator profile (as Vidur profiles GEMMs apart from the rest): milliseconds of every layer's
    GEMMs of ``model`` (wq, wk, wv, wo, w1, w3, w2 at tp 1, random weights, torch ``F.linear``, the
    calling thread's torch threads) for each batch of one-token rows. What :func:`ryzlab.projection.cost.gemm_ms`
    prices, so bandwidth and compute fractions are fitted to GEMMs alone, not to a whole step where
    a fixed cost per op looks like weight streaming (one rank's steps cannot tell them apart)."""
    # decode batches and a short prompt's prefill rows: on a CPU small-row GEMMs fall well short of
    # the roofline (16 rows: ~1/8 of the peak, 256 rows: the peak), so the fit spans the rows a step has
    return [{"batch": b, "ms": _median_ms(_weight_stream(model, b, dtype), iters)} for b in batches]


def fit_gemm_row_eff(rows: list[dict[str, float]], model, dev, cal: Calibration,
                     dep: Deployment | None = None) -> tuple[tuple[int, float], ...]:
    """``Calibration.gemm_row_eff`` from :func:`profile_gemms` rows under ``cal``'s roofline
    (``bw_frac``, ``flops_frac``): per profiled batch, the roofline's milliseconds over the measured
    ones, so :func:`ryzlab.projection.cost.gemm_ms` then gives the profile back at those rows."""
    if not rows:
        raise ValueError("fit_gemm_row_eff needs at least one GEMM profile row")
    if any(not (r["ms"] > 0 and math.isfinite(r["ms"])) or int(r["batch"]) < 1 for r in rows):
        raise ValueError("fit_gemm_row_eff: each row needs batch >= 1 and a positive, finite ms")
    dep = dep or Deployment(weights="fp32")
    roof = cal.replace(gemm_row_eff=())
    return tuple((int(r["batch"]), gemm_ms(model, dev, roof, dep, int(r["batch"])) / r["ms"]) for r in rows)


def profile_cp_attention(model, points: tuple[tuple[int, int], ...] = ((4, 256), (16, 512), (4, 1024), (16, 128)),
                         iters: int = 30, cp: int = 2) -> list[dict[str, float]]:
    """Operator profile, on ONE rank, of a layer's decode attention as the engine runs it, against
    the path a context-parallel rank runs over the same keys: over a real
    :class:`~ryzlab.kv.cache.PagedKVCache` of ``model``'s shape, ``batch`` sequences of ``context``
    tokens (random keys and values), one layer.

    * ``ms``: one rank's decode (:meth:`PagedKVCache.write_attend`: the short path over plain pages);
    * ``ms_cp``: a cp rank's (:meth:`PagedKVCache.write`, then the backend's attend with log-sum-exp:
      the general path, not the short one), then packing its partial and merging ``cp`` partials
      (:mod:`ryzlab.kv.merge`; the all-gather between them is the link's, priced apart: here the
      other ranks' partials are copies of this one's). The calibration then counts no merge kernels
      (``cp_merge_kernels = 0``): the eager merge's ~24 torch ops are in this profile.

    Each call is timed after an untimed pass through the model's layer matrices (as a layer's
    attention follows its GEMMs in a step: caches cold), under ``torch.inference_mode`` (as the
    engine runs a step).

    -> rows with ``ms``, ``ms_cp``."""
    return [_profile_cp_point(model, b, ctx, iters, cp) for b, ctx in points]


def _profile_cp_point(model, b: int, ctx: int, iters: int, cp: int) -> dict[str, float]:
    import torch

    from ryzlab.config import CacheConfig
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.kv.merge import merge_partials, pack_partial, unpack_partials

    hq, hkv, d = model.n_heads, model.n_kv_heads, model.head_dim
    with torch.inference_mode():   # as the engine runs a step
        cache = PagedKVCache(model, CacheConfig(num_blocks=b * (ctx // 16 + 2)))
        ids = list(range(b))
        for s in ids:
            cache.add_sequence(s, [])
        step = cache.extend(ids, [[1] * ctx for _ in ids])
        cache.write(0, torch.randn(b * ctx, hkv, d), torch.randn(b * ctx, hkv, d), step=step)
        step = cache.extend(ids, [[1] for _ in ids])
        q, k, v = torch.randn(b, hq, d), torch.randn(b, hkv, d), torch.randn(b, hkv, d)

        def one_rank() -> None:
            cache.write_attend(0, q, k, v, step=step)

        def cp_rank() -> None:
            cache.write(0, k, v, step=step)
            o, lse = cache.backend.attend(cache.store, 0, q, step, None, with_lse=True)
            part = pack_partial(o, lse)
            merge_partials(*unpack_partials(torch.stack([part] * cp)))

        # interleaved repeats (one, cp, one, ...): the first large gathers of a process run slower
        # while the allocator settles, and drift must hit both sides; every call after the weights
        # streamed once (cold caches, as a layer's attention follows its GEMMs in a step)
        stream = _weight_stream(model, b)
        runs: dict[str, list[float]] = {"ms": [], "ms_cp": []}
        for _ in range(5):
            for key, fn in (("ms", one_rank), ("ms_cp", cp_rank)):
                runs[key].append(_cold_median_ms(fn, stream, iters))
    return {"batch": b, "context": ctx, **{k_: statistics.median(r) for k_, r in runs.items()}}


def fit_cp_attention(rows: list[dict[str, float]]) -> tuple[float, float]:
    """``(attn_lse_cost, cp_attn_us)`` from :func:`profile_cp_attention` rows: the least-squares line
    ``ms_cp = attn_lse_cost * ms + cp_attn_us`` (a cp rank's path costs a multiple of the attention
    over its keys plus a fixed part per layer), held to ``attn_lse_cost >= 1``, ``cp_attn_us >= 0``."""
    if not rows:
        raise ValueError("fit_cp_attention needs at least one profile row")
    xs, ys = [r["ms"] for r in rows], [r["ms_cp"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 1.0
    slope = max(slope, 1.0)
    base = max(my - slope * mx, 0.0)
    return slope, base * 1e3


def _cp_rank_view(rank: int, cp: int):
    """A :class:`~ryzlab.parallel.comm.Comm` that tells a cache it is cp rank ``rank`` of ``cp`` with no
    process group behind it: a profile of one rank's own per-step work (its collectives never run)."""
    from ryzlab.parallel.comm import Comm

    c = Comm(local=True)
    c.rank, c.world_size = rank, cp
    return c


def profile_cp_planning(model, points: tuple[tuple[int, int], ...] = ((4, 512), (16, 1024), (1, 128), (16, 128)),
                        iters: int = 40, cp: int = 2) -> list[dict[str, float]]:
    """Operator profile, on ONE process, of the model's per-step planning of a decode step
    (:func:`ryzlab.models.transformer.paged_context`: extend the sequences, plan the pages, build the
    step's masks the attention reads once per step) on one rank's cache against cp rank 0's cache
    of a ``cp``-way layout (its own shard of the blocks; no process group: the profile never reaches
    a collective). ``batch`` sequences of ``context`` tokens, one new token each per step, a fresh
    step every call, as the engine plans them. -> rows with ``us`` (one rank), ``us_cp``."""
    import time

    import torch

    from ryzlab.config import CacheConfig
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.models.transformer import paged_context

    out = []
    for b, ctx in points:
        # between two plans a real step streams the model's weights and pages: the plan runs with
        # cold caches, so the profile streams the layers' matrices between its calls too (not timed)
        stream = _weight_stream(model, b)
        res: dict[str, list[float]] = {"us": [], "us_cp": []}
        caches = {key: PagedKVCache(model, CacheConfig(num_blocks=n * b * ((ctx + iters * 6) // 16 + 2)),
                                    cp=_cp_rank_view(0, n))
                  for key, n in (("us", 1), ("us_cp", cp))}
        ids = list(range(b))
        with torch.inference_mode():
            for cache in caches.values():
                paged_context(cache, torch.ones(b, ctx, dtype=torch.long), ids)
            tok = torch.ones(b, 1, dtype=torch.long)
            # interleaved (one rank, cp rank, ...) so drift hits both; every step a new token per sequence
            for _ in range(5):
                for key, cache in caches.items():
                    times = []
                    for _ in range(iters):
                        stream()
                        t0 = time.perf_counter()
                        _, pc = paged_context(cache, tok, ids)
                        if pc.visible is None:    # the general path reads these once per step
                            pc.step.blocked
                        times.append(time.perf_counter() - t0)
                    res[key].append(statistics.median(times) * 1e6)
        out.append({"batch": b, "context": ctx, **{k: statistics.median(v) for k, v in res.items()}})
    return out


def fit_cp_planning(rows: list[dict[str, float]]) -> float:
    """``cp_step_us`` from :func:`profile_cp_planning` rows: the median of (cp rank - one rank), at
    least 0 (the planning a cp rank adds per step, whatever the batch and context)."""
    if not rows:
        raise ValueError("fit_cp_planning needs at least one profile row")
    return max(0.0, statistics.median(r["us_cp"] - r["us"] for r in rows))

