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
from ryzlab.projection.cost import Deployment, StepShape, step_cost
from ryzlab.projection.hardware import get_device
from ryzlab.projection.shapes import load_shape

__all__ = ["PUBLISHED_FILE", "published_tables", "predict_published", "validate_published", "fit_gpu_default",
           "error_summary", "static_batch_ms"]

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
    dep = Deployment(tp=row["tp"], weights=row["weights"], int4_group=table.get("int4_group", 128))
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


def _link_rank(rank: int, world_size: int, tp: int, cp: int, numel: int, iters: int, work_rows: int
               ) -> dict[str, float]:
    """On each rank: mean seconds of one tp all-reduce and one cp all-gather of ``numel`` floats,
    each entered after ``work_rows`` rows of one-thread matmul (as a layer's collective follows its
    GEMMs), with no barrier in between: what a rank pays per collective inside a decode step."""
    import time

    import torch

    from ryzlab.config import ParallelConfig
    from ryzlab.parallel.mesh import init_parallel

    g = init_parallel(ParallelConfig(tp=tp, cp=cp))
    x = torch.ones(numel)
    a, w = torch.randn(work_rows, 256), torch.randn(256, 256)
    out: dict[str, float] = {}
    for name, comm, call in (("all_reduce", g.tp, lambda c: c.all_reduce(x)),
                             ("all_gather", g.cp, lambda c: c.all_gather(x))):
        if comm.world_size == 1:
            continue
        torch.distributed.barrier()
        times = []
        for i in range(iters + 5):
            a @ w
            t0 = time.perf_counter()
            call(comm)
            if i >= 5:
                times.append(time.perf_counter() - t0)
        out[name] = statistics.fmean(times)
    return out


def probe_gloo_link(numel: int = 1024, iters: int = 300, work_rows: int = 64) -> dict[str, float]:
    """Measure this host's gloo link the way nccl-tests measures a GPU link: a 2-rank all-reduce
    and a 2-rank all-gather of ``numel`` floats (no model step runs).

    Measured in the pattern a decode step issues them: each rank does a little one-thread work
    (``work_rows`` x 256 x 256 matmul), then enters the collective, ``iters`` times, no barrier
    between; the **mean** time per call, because a step pays the sum of its collectives. On a
    shared-core VM a collective mostly waits for the peer process to be woken, so a collective
    measured right after a barrier (both ranks already awake) reads low: 523 us against 0.9-1.2 ms
    per call inside tp 2 steps on this machine.

    Returns ``coll_base_us`` and ``link_latency_us`` solving the cost model's alpha terms
    (all-reduce of 2 = base + 2 hops, all-gather of 2 = base + 1 hop; bytes at the catalog's
    link bandwidth are subtracted first).
    """
    from ryzlab.orchestrator import launch

    ar = max(r["all_reduce"] for r in launch(_link_rank, 2, args=(2, 1, numel, iters, work_rows), backend="gloo",
                                              threads_per_rank=1))
    ag = max(r["all_gather"] for r in launch(_link_rank, 2, args=(1, 2, numel, iters, work_rows), backend="gloo",
                                              threads_per_rank=1))
    dev = get_device("cpu")
    wire = numel * 4 / (dev.link_gbps * 1e9)       # one chunk over the link, seconds
    ar_us, ag_us = (ar - wire) * 1e6, (ag - wire) * 1e6
    hop = max(ar_us - ag_us, 0.0)
    return {"all_reduce_us": ar * 1e6, "all_gather_us": ag * 1e6, "link_latency_us": hop,
            "coll_base_us": max(ag_us - hop, 0.0)}
