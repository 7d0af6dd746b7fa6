"""Which parameters dominate a projection: the elasticity of a step's time to each input.

Elasticity = d ln(step_ms) / d ln(parameter), by a symmetric +-10% change of one parameter with
the others held: -1 means the step time is inversely proportional to it (a bandwidth-bound
decode against ``hbm_gbps``), 0 that it does not matter at this point.
"""
from __future__ import annotations

import dataclasses
import math

from ryzlab.config import ModelConfig
from ryzlab.projection.calibration import Calibration
from ryzlab.projection.cost import Deployment, StepShape, step_cost
from ryzlab.projection.hardware import Device

__all__ = ["DEVICE_PARAMS", "CALIBRATION_PARAMS", "sensitivity"]

DEVICE_PARAMS = ("hbm_gbps", "bf16_tflops", "fp8_tflops", "link_gbps", "link_latency_us")
CALIBRATION_PARAMS = ("bw_frac", "flops_frac", "attn_frac", "kernel_us", "host_ms", "coll_base_us")


def sensitivity(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment, shape: StepShape,
                step: float = 0.1) -> dict[str, float]:
    """Elasticity of ``step_cost(...).total_ms`` to each device and calibration parameter."""
    out = {}
    for name in DEVICE_PARAMS + CALIBRATION_PARAMS:
        times, vals = [], []
        base = getattr(dev if name in DEVICE_PARAMS else cal, name)
        if not base:
            out[name] = 0.0
            continue
        for f in (1 + step, 1 - step):
            v = base * f
            if name in DEVICE_PARAMS:
                d, c = dataclasses.replace(dev, **{name: v}), cal
            else:
                v = min(v, 1.0) if name.endswith("_frac") else v   # a fraction cannot pass 1
                d, c = dev, dataclasses.replace(cal, **{name: v})
            vals.append(v)
            times.append(step_cost(model, d, c, dep, shape).total_ms)
        out[name] = math.log(times[0] / times[1]) / math.log(vals[0] / vals[1])
    return out
