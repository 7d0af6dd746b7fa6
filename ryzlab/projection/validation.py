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
