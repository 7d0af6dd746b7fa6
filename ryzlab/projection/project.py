"""One projected row per configuration: what ``ryzlab project`` prints and the experiment stores.

Every row carries ``basis="projected"``, the device spec and the calibration's name: a projected
figure never travels without them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ryzlab.config import ModelConfig, ParallelConfig
from ryzlab.parallel.layout import validate_parallel
from ryzlab.projection.calibration import Calibration
from ryzlab.projection.cost import (Deployment, StepShape, kv_capacity_tokens, memory_bytes_per_device, step_cost,
                                    weight_bytes)
from ryzlab.projection.hardware import Device

__all__ = ["Workload", "project_row", "check_layouts", "ROW_FIELDS"]

ROW_FIELDS = ("device", "tp", "cp", "batch", "weights", "codec", "step_ms", "decode_tokens_per_s",
              "throughput_tokens_per_s", "ttft_ms", "tpot_ms", "memory_gb_per_device", "kv_capacity_tokens",
              "max_batch", "basis", "calibration")
"""The fields every projected row has (the issue's list); more follow them."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What is asked of the replica."""

    batch: int = 1
    """Sequences decoded together (static batch) when no rate or concurrency is given."""
    prompt_tokens: int = 512
    output_tokens: int = 128
    rate: float | None = None
    """Poisson requests/s: run the serving projection (the real scheduler on a virtual clock)."""
    concurrency: int | None = None
    """Requests kept in flight: the serving projection, closed loop."""
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    num_requests: int = 200
    prefill_chunk: int = 2048
    """Prompt tokens per prefill step (chunked prefill, vLLM's default budget)."""

    def __post_init__(self) -> None:
        problems = [f"{f} must be >= 1, got {getattr(self, f)}" for f in
                    ("batch", "prompt_tokens", "output_tokens", "num_requests", "prefill_chunk")
                    if getattr(self, f) < 1]
        if self.rate is not None and self.concurrency is not None:
            problems.append("give --rate or --concurrency, not both")
        if self.rate is not None and not self.rate > 0:
            problems.append(f"rate must be > 0 requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        for f in ("slo_ttft_ms", "slo_tpot_ms"):
            if getattr(self, f) is not None and not getattr(self, f) > 0:
                problems.append(f"{f} must be > 0 ms, got {getattr(self, f)}")
        if problems:
            raise ValueError("; ".join(problems))


def check_layouts(model: ModelConfig, tps: list[int], cps: list[int]) -> None:
    """Refuse, before any work, every tp x cp that does not fit the model (ConfigError with the
    valid tp sizes, from the same check the engine runs)."""
    for tp in tps:
        for cp in cps:
            validate_parallel(model, ParallelConfig(tp=tp, cp=cp))


def _prefill_ms(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment, prompt: int, chunk: int,
                seqs: int = 1, host_overhead_ms: float | None = None) -> float:
    """Time to prefill ``seqs`` prompts of ``prompt`` tokens, ``chunk`` tokens per step."""
    t, past = 0.0, 0
    while past < prompt:
        n = min(chunk, prompt - past)
        t += step_cost(model, dev, cal, dep, StepShape.prefill(n, past, seqs), host_overhead_ms=host_overhead_ms).total_ms
        past += n
    return t


def project_row(model: ModelConfig, model_label: str, dev: Device, cal: Calibration, dep: Deployment,
                wl: Workload, *, host_overhead_ms: float | None = None) -> dict[str, Any]:
    """Project one configuration: decode step, prefill, memory and capacity; with a rate or a
    concurrency, the serving projection's percentiles too (and, with an SLO, the highest rate
    meeting it). Keys: :data:`ROW_FIELDS` first."""
    from ryzlab.projection.serving import ServingLoad, max_rate_under_slo, simulate

    need = wl.prompt_tokens + wl.output_tokens
    mid_context = wl.prompt_tokens + wl.output_tokens // 2          # the average decode step's context
    dec = step_cost(model, dev, cal, dep, StepShape.decode(wl.batch, mid_context), host_overhead_ms=host_overhead_ms)
    ttft = _prefill_ms(model, dev, cal, dep, wl.prompt_tokens, wl.prefill_chunk, host_overhead_ms=host_overhead_ms)
    cap = kv_capacity_tokens(model, dev, cal, dep)
    mem = memory_bytes_per_device(model, dep, wl.batch * need)
    row: dict[str, Any] = {
        "device": dev.key, "tp": dep.tp, "cp": dep.cp, "batch": wl.batch, "weights": dep.weights, "codec": dep.codec,
        "step_ms": dec.total_ms, "decode_tokens_per_s": 1e3 / dec.total_ms,
        "throughput_tokens_per_s": wl.batch * 1e3 / dec.total_ms, "ttft_ms": ttft, "tpot_ms": dec.total_ms,
        "memory_gb_per_device": mem / 1e9, "kv_capacity_tokens": cap, "max_batch": cap // need,
        "basis": "projected", "calibration": cal.name,
        "model": model_label, "device_spec": dev.spec(), "devices": dep.tp * dep.cp,
        "prompt_tokens": wl.prompt_tokens, "output_tokens": wl.output_tokens,
        "fits": bool(mem <= dev.memory_gb * 1e9 * cal.mem_util and cap >= need),
        "weight_gb_per_device": weight_bytes(model, dep)["total"] / 1e9,
        "gemm_ms": dec.gemm_ms, "attention_ms": dec.attention_ms, "comm_ms": dec.comm_ms,
        "other_ms": dec.other_ms, "overhead_ms": dec.overhead_ms,
        "host_overhead_ms": cal.host_ms if host_overhead_ms is None else host_overhead_ms,
        "calibration_fitted_from": cal.fitted_from,
    }
    if not row["fits"]:
        return row
    if wl.rate is not None or wl.concurrency is not None:
        load = ServingLoad(rate=wl.rate, concurrency=wl.concurrency, num_requests=wl.num_requests,
                           prompt_tokens=wl.prompt_tokens, output_tokens=wl.output_tokens)
        sim = simulate(model, dev, cal, dep, load, host_overhead_ms=host_overhead_ms)
        row.update({k: v for k, v in sim.items() if k != "kv_capacity_tokens"})
        row.update(ttft_ms=sim["ttft_ms_p50"], tpot_ms=sim["tpot_ms_p50"], rate=wl.rate,
                   concurrency=wl.concurrency)
        if wl.slo_ttft_ms is not None or wl.slo_tpot_ms is not None:
            slo_t = wl.slo_ttft_ms if wl.slo_ttft_ms is not None else math.inf
            slo_p = wl.slo_tpot_ms if wl.slo_tpot_ms is not None else math.inf
            row["slo_met"] = bool(sim["ttft_ms_p99"] <= slo_t and sim["tpot_ms_p99"] <= slo_p)
            best, _ = max_rate_under_slo(model, dev, cal, dep, slo_ttft_ms=slo_t, slo_tpot_ms=slo_p,
                                         prompt_tokens=wl.prompt_tokens, output_tokens=wl.output_tokens,
                                         num_requests=min(wl.num_requests, 100), host_overhead_ms=host_overhead_ms)
            row["max_rate_under_slo_rps"] = best
    elif wl.slo_ttft_ms is not None or wl.slo_tpot_ms is not None:
        row["slo_met"] = bool((wl.slo_ttft_ms is None or ttft <= wl.slo_ttft_ms)
                              and (wl.slo_tpot_ms is None or dec.total_ms <= wl.slo_tpot_ms))
    return row


def deployment(**kw: Any) -> Deployment:
    """A :class:`Deployment` from keyword values (the CLI's and the experiment's one constructor)."""
    return Deployment(**{k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(Deployment)}})
