"""Projections of a model to a named device: step time, memory, a serving curve and sensitivities.

Nothing here is measured: every row has ``basis="projected"``, the device spec and the
calibration's name, and the validation error of that calibration on held-out published results
for the device (``validation_median_abs_error``, ``validation_worst_abs_error``; NaN for a device
with no published table, with ``validation_note`` saying so). Three kinds of rows (``series``):

* ``static``: one decode step of ``batch`` sequences and the unloaded TTFT (:func:`project_row`);
* ``serving``: one row per rate of ``rates``, the real scheduler on a virtual clock
  (TTFT / TPOT / E2EL percentiles, throughput);
* ``sensitivity``: the elasticity of the decode step to each device and calibration parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from ryzlab.config import Codec
from ryzlab.projection.formats import WeightFormat

__all__ = ["Config", "run"]


@dataclass(frozen=True, kw_only=True)
class Config:
    model: str = "llama-3-8b"
    """A shipped config name, a folder holding a config.json (weights optional), 'reference' or a .gguf."""
    device: str = "h100-sxm"
    """A catalog device (ryzlab/projection/devices.yaml)."""
    tp: int = 1
    cp: int = 1
    batch: int = 8
    weights: WeightFormat = "bf16"
    codec: Codec = "none"
    prompt_tokens: int = 512
    output_tokens: int = 128
    rates: tuple[float, ...] = ()
    """Poisson rates (req/s) of the serving curve; empty: no serving rows."""
    num_requests: int = 100
    calibration: str = ""
    """A calibration JSON; empty: the device's shipped one."""
    host_overhead_ms: float = -1.0
    """Per-step host time of the modelled engine; negative: the calibration's (a captured graph)."""
    validate: Literal["published", "none"] = "published"
    """Attach the calibration's held-out error on published tables for this device."""

    def __post_init__(self) -> None:
        for f in ("tp", "cp", "batch", "prompt_tokens", "output_tokens", "num_requests"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if any(not r > 0 for r in self.rates):
            raise ValueError(f"rates must be > 0 requests/s, got {self.rates}")
        if self.weights == "fp8":   # the catalog's raw fields: no device probe before the run
            from ryzlab.projection.cost import weights_problem
            from ryzlab.projection.hardware import load_catalog

            cat = load_catalog()
            if self.device in cat and (why := weights_problem(self.device, "fp8", cat[self.device].get("fp8_tflops"))):
                raise ValueError(f"{why}; devices with them: "
                                 + ", ".join(k for k, v in cat.items() if v.get("fp8_tflops")))


def run(cfg: Config) -> pd.DataFrame:
    from ryzlab.projection.calibration import default_calibration, load_calibration
    from ryzlab.projection.cost import Deployment, StepShape
    from ryzlab.projection.hardware import get_device
    from ryzlab.projection.project import Workload, check_layouts, project_row
    from ryzlab.projection.sensitivity import sensitivity
    from ryzlab.projection.shapes import load_shape
    from ryzlab.projection.validation import error_summary, validate_published

    dev = get_device(cfg.device)
    model, label = load_shape(cfg.model)
    check_layouts(model, [cfg.tp], [cfg.cp])
    cal = load_calibration(cfg.calibration) if cfg.calibration else default_calibration(dev.key)
    dep = Deployment(tp=cfg.tp, cp=cfg.cp, weights=cfg.weights, codec=cfg.codec)
    host = None if cfg.host_overhead_ms < 0 else cfg.host_overhead_ms
    base = project_row(model, label, dev, cal, dep, Workload(batch=cfg.batch, prompt_tokens=cfg.prompt_tokens,
                                                             output_tokens=cfg.output_tokens), host_overhead_ms=host)
    rows = [{**base, "series": "static"}]
    for rate in cfg.rates if base["fits"] else ():
        r = project_row(model, label, dev, cal, dep, Workload(prompt_tokens=cfg.prompt_tokens,
                                                              output_tokens=cfg.output_tokens, rate=rate,
                                                              num_requests=cfg.num_requests), host_overhead_ms=host)
        rows.append({**r, "series": "serving", "rate": rate})
    shape = StepShape.decode(cfg.batch, cfg.prompt_tokens + cfg.output_tokens // 2)
    for name, e in sensitivity(model, dev, cal, dep, shape).items():
        rows.append({**{k: base[k] for k in ("device", "tp", "cp", "batch", "weights", "codec", "basis",
                                                "calibration", "model", "device_spec")},
                     "series": "sensitivity", "param": name, "elasticity": e})
    df = pd.DataFrame(rows)
    note, med, worst, n = "", math.nan, math.nan, 0.0
    if cfg.validate == "published":
        rows_all = [] if dev.shared_host else validate_published({d: cal for d in ("a100-80gb", dev.key)})
        held = [r for r in rows_all if r["device"] == dev.key]
        if dev.shared_host:
            note = "cpu: validated by benchmarks/projection_validate.py --cpu (multi-rank steps measured in that run)"
        elif not held:   # the same calibration, validated on another device's tables: say so
            held = rows_all
            note = (f"no published table for {dev.key}: the error shown is calibration {cal.name}'s on "
                    f"{', '.join(sorted({r['device'] for r in held})) or 'no'} tables (benchmarks/projection_validate.py)")
        else:   # which tables (and so which weight formats) the figure is over
            note = (f"held-out rows of {', '.join(sorted({r['table'] for r in held}))} "
                    f"(weights {', '.join(sorted({r['weights'] for r in held}))}; benchmarks/projection_validate.py)")
        s = error_summary(held)
        med, worst, n = s["median_abs_error"], s["worst_abs_error"], s["rows"]
    df["validation_median_abs_error"] = med
    df["validation_worst_abs_error"] = worst
    df["validation_rows"] = n
    df["validation_note"] = note
    return df
