"""Deployment planner: which device type, how many, and which tp x cp x replicas, weights and codec
meet a TTFT / TPOT SLO at a request rate, ranked by devices needed (then by cost).

Each candidate replica is projected by the serving projection (the real scheduler on a virtual
clock, :mod:`ryzlab.projection.serving`); its highest rate meeting the SLO at p99 sets how many
replicas the rate needs. ``max_kl`` keeps only KV codecs whose accuracy was *measured* within the
budget on that model (:func:`measured_kl` from kv_compression results, or :func:`measure_kl` on the
weights now); nothing is assumed about
a codec no one measured.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ryzlab.config import ModelConfig
from ryzlab.parallel.layout import valid_tp_sizes
from ryzlab.projection.calibration import Calibration
from ryzlab.projection.cost import Deployment, StepShape, kv_capacity_tokens, step_cost, weights_problem
from ryzlab.projection.hardware import Device
from ryzlab.projection.project import _prefill_ms
from ryzlab.projection.serving import max_rate_under_slo

__all__ = ["plan", "measured_kl", "measure_kl", "kl_model_problem"]

log = logging.getLogger(__name__)


def measured_kl(results_dir: str | Path, model_name: str | None = None) -> dict[str, float]:
    """Best measured ``kl_per_token`` per codec in a results folder's kv_compression runs.

    ``model_name``: keep rows whose ``model`` or ``model_name`` equals it (None: every row). Raises
    ``ValueError`` when the folder holds no kv_compression measurement of that model.
    """
    import pandas as pd

    root = Path(results_dir).expanduser()
    files = sorted(root.glob("kv_compression-*/metrics.parquet"))
    if not files:
        raise ValueError(f"{root} holds no kv_compression results (kv_compression-*/metrics.parquet); run a "
                         f"kv_compression sweep or `ryzlab kv-plan --model ...` on the model first")
    df = pd.concat([pd.read_parquet(f, columns=["codec", "kl_per_token", "model", "model_name"]) for f in files])
    if model_name is not None:
        df = df[(df["model"] == model_name) | (df["model_name"] == model_name)]
        if df.empty:
            raise ValueError(f"{root}: no kv_compression measurement of model {model_name!r}; measured models: "
                             f"{sorted(set(pd.concat([pd.read_parquet(f, columns=['model']) for f in files])['model']))}")
    return {"none": 0.0, **df.groupby("codec")["kl_per_token"].min().to_dict()}


def kl_model_problem(model: str) -> str | None:
    """Why the KV codecs' accuracy cannot be measured on ``model`` (None when it can): a shipped
    short name or a folder holding only ``config.json`` has no weights to run."""
    from ryzlab.models import check_model
    from ryzlab.projection.shapes import shipped_models

    if model in shipped_models():
        return (f"{model!r} ships as config.json only: there are no weights to measure KV accuracy on; give "
                f"--kl-results DIR (kv_compression runs of the model), or --kl-model PATH of the weights")
    try:
        check_model(model)
    except ValueError as e:
        return (f"cannot measure KV accuracy on {model!r} ({e}); give --kl-results DIR, or --kl-model PATH of "
                f"a model with weights")
    return None


def measure_kl(model: str, codecs: Sequence[str], *, windows: int = 4, progress: bool = True) -> dict[str, float]:
    """KL per token of each KV codec (its default layout, what the projection prices) on ``model``,
    MEASURED now: teacher-forced decode through each compressed cache against the uncompressed one
    (:func:`ryzlab.evaluation.plan.plan_kv` on the held-out text). ``none`` is 0 by definition."""
    from ryzlab.config import CacheConfig
    from ryzlab.evaluation.plan import plan_kv

    todo = [c for c in dict.fromkeys(codecs) if c != "none"]
    out = {"none": 0.0}
    if todo:
        res = plan_kv(model, None, 1.0, candidates=[CacheConfig(codec=c) for c in todo], mixed=None, windows=windows,
                      progress=progress)
        out.update(res.table.groupby("codec")["kl_per_token"].min().to_dict())
    return out


def plan(model: ModelConfig, model_label: str, devices: list[Device], cals: dict[str, Calibration], *,
         slo_ttft_ms: float, slo_tpot_ms: float, rate: float, prompt_tokens: int = 512, output_tokens: int = 128,
         max_devices: int | None = None, weights: tuple[str, ...] = ("bf16", "int8", "int4"),
         codecs: tuple[str, ...] = ("none",), cps: tuple[int, ...] = (1,), prices: dict[str, float] | None = None,
         num_requests: int = 100, host_overhead_ms: float | None = None, slack: int = 4,
         progress: bool = False) -> list[dict[str, Any]]:
    """Configurations that meet the SLO at ``rate``, fewest devices first (then cost, then the most
    headroom). Each row is projected (``basis``, ``device_spec``, ``calibration``).

    A replica of more than ``slack`` times the devices of the best plan found so far is not
    simulated (it cannot rank near the top; ``slack=0`` simulates everything).
    """
    need = prompt_tokens + output_tokens
    rows: list[dict[str, Any]] = []
    cases = [(dev, w, codec, cp, tp) for dev in devices for w in weights for codec in codecs for cp in cps
             for tp in valid_tp_sizes(model, dev.devices_per_node)]
    from tqdm.auto import tqdm

    # each case runs the real scheduler on a virtual clock (seconds each): say how far it is
    for dev, w, codec, cp, tp in tqdm(cases, desc="plan: configurations", unit="cfg", disable=not progress,
                                      dynamic_ncols=True):
        cal = cals[dev.key]
        if tp * cp > dev.devices_per_node or (max_devices is not None and tp * cp > max_devices):
            continue
        if weights_problem(dev, w):   # fp8 weights on a device without fp8 tensor cores
            continue
        best = min((r["devices"] for r in rows), default=None)
        if slack and best is not None and tp * cp > slack * best:
            continue
        dep = Deployment(tp=tp, cp=cp, weights=w, codec=codec)   # type: ignore[arg-type]
        if kv_capacity_tokens(model, dev, cal, dep) < need:
            continue
        # cheap necessary conditions first: one request alone must meet the SLO
        tpot1 = step_cost(model, dev, cal, dep, StepShape.decode(1, need),
                          host_overhead_ms=host_overhead_ms).total_ms
        ttft1 = _prefill_ms(model, dev, cal, dep, prompt_tokens, 2048, host_overhead_ms=host_overhead_ms)
        if tpot1 > slo_tpot_ms or ttft1 > slo_ttft_ms:
            continue
        per, sim = max_rate_under_slo(model, dev, cal, dep, slo_ttft_ms=slo_ttft_ms,
                                      slo_tpot_ms=slo_tpot_ms, prompt_tokens=prompt_tokens,
                                      output_tokens=output_tokens, num_requests=num_requests,
                                      iters=6, host_overhead_ms=host_overhead_ms)
        if per <= 0 or sim is None:
            continue
        replicas = math.ceil(rate / per)
        n = replicas * tp * cp
        if max_devices is not None and n > max_devices:
            continue
        price = (prices or {}).get(dev.key)
        rows.append({
            "device": dev.key, "devices": n, "replicas": replicas, "tp": tp, "cp": cp, "weights": w,
            "codec": codec, "max_rate_per_replica_rps": per, "rate": rate,
            "headroom_frac": replicas * per / rate - 1,
            "ttft_ms_p99": sim["ttft_ms_p99"], "tpot_ms_p99": sim["tpot_ms_p99"],
            "cost_per_hour": n * price if price is not None else math.nan,
            "basis": "projected", "calibration": cal.name, "device_spec": dev.spec(),
            "model": model_label})
    rows.sort(key=lambda r: (r["devices"], r["cost_per_hour"] if r["cost_per_hour"] == r["cost_per_hour"] else 0.0,
                             -r["headroom_frac"]))
    return rows
