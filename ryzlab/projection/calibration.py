"""Calibrations: what fraction of a device's datasheet ryzlab's graph achieves, and the overheads.

A :class:`Calibration` is a small JSON file the user can read, edit and reuse (``--calibration
FILE``). Shipped defaults (``calibrations.yaml``) name where every number came from. On this CPU
:func:`fit` derives one from one-rank step-time measurements (the scaling experiment's rows); on
a GPU the same function takes ``benchmarks/gpu_decode.py`` / scaling rows from that device.

No torch here (the fit is a few hundred evaluations of the closed-form step cost).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ryzlab.config import ConfigError

__all__ = ["Calibration", "CALIBRATIONS_FILE", "default_calibration", "load_calibration", "save_calibration", "fit",
           "FIT_FIELDS"]

CALIBRATIONS_FILE = Path(__file__).with_name("calibrations.yaml")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Achieved fractions and overheads of one engine on one device (kind)."""

    name: str
    """Goes in every projected row (``calibration``)."""
    bw_frac: float = 0.7
    """Fraction of ``hbm_gbps`` that weight, KV and activation streams achieve."""
    flops_frac: float = 0.6
    """Fraction of the dense matmul peak that GEMMs and attention achieve when compute-bound."""
    attn_frac: float = 1.0
    """Bandwidth attention achieves over the KV pages relative to the weight streams (``bw_frac``):
    1 for a paged kernel that reads each page once (vLLM / FlashInfer / ryzlab's Triton kernel);
    below 1 for an engine that gathers pages into a copy, then multiplies and softmaxes it in
    separate passes (ryzlab's torch path on CPU). Vidur profiles attention apart from GEMMs for
    the same reason."""
    attn_lse_cost: float = 1.0
    """Cost of attention that must also return its log-sum-exp (a context-parallel rank's partial,
    for the exact merge) relative to attention without it: 1 for a kernel that keeps the running
    log-sum-exp anyway (flash-decoding, ryzlab's Triton kernel); above 1 for ryzlab's torch path,
    whose one-rank decode takes a fused softmax while a cp rank runs log-sum-exp, subtract and exp
    (:func:`ryzlab.projection.validation.profile_cp_attention` measures it on one rank, with ``cp_attn_us``)."""
    cp_attn_us: float = 0.0
    """Fixed time per layer and step that a context-parallel rank's attention adds to one rank's,
    whatever the context: the engine's path for a cp rank (the general write / attend planning and
    the log-sum-exp; packing and merging the partials are ``cp_merge_kernels`` kernel boundaries,
    the all-gather the link's). 0 for a fused kernel (flash-decoding keeps the log-sum-exp anyway);
    on CPU an operator profile on one rank measures it with ``attn_lse_cost``, the merge included
    (:func:`ryzlab.projection.validation.fit_cp_attention`)."""
    cp_merge_kernels: float = 2.0
    """Kernel boundaries a layer adds under context parallelism to pack the partial and merge the
    ranks' partials (:data:`ryzlab.projection.cost.CP_MERGE_KERNELS` for a fused engine: FlashInfer's
    ``merge_state`` is one kernel); 0 where ``cp_attn_us`` was profiled with ryzlab's own merge in it
    (the CPU calibration: its eager merge is ~24 torch ops, not 2 kernels)."""
    cp_step_us: float = 0.0
    """Fixed host time per step that planning a context-parallel rank's step adds to one rank's
    (which of the step's tokens and pages its shard holds, the general path's masks): 0 for an
    engine whose planning is off the step's critical path (assumption for GPUs); on CPU an
    operator profile of the model's own per-step planning on a cp rank's cache against one rank's
    measures it (:func:`ryzlab.projection.validation.profile_cp_planning`)."""
    prefill_layer_us: float = 0.0
    """Fixed time per layer that a step holding prefill tokens adds beyond the roofline of its GEMMs
    and attention: the engine's general write / attend path (per-call planning of the step's pages,
    masked attention with log-sum-exp, padding the ragged queries) that a decode step's short path
    skips. 0 for an engine whose prefill is one fused variable-length kernel (assumption for GPUs);
    on CPU :func:`ryzlab.projection.engine_profiles.profile_prefill` measures a prefill step against a
    decode step on one rank (:func:`ryzlab.projection.engine_profiles.fit_prefill`)."""
    corun_factor: float = 1.0
    """On a shared host (``cpu``), how much slower each rank's compute and memory streams run when
    the ranks of one replica run at once than one rank alone, beyond sharing the cores (their
    weights and KV together overflow the last-level cache): 1 for separate devices (GPUs) and one
    rank. Depends on the layout (a cp rank holds all the weights, a tp rank a share):
    :func:`ryzlab.projection.validation.probe_corun` measures it for a layout with no model step."""
    gemm_row_eff: tuple[tuple[int, float], ...] = ()
    """Measured efficiency of a GEMM by its rows, relative to the roofline of ``bw_frac`` and
    ``flops_frac``: ``(rows, roofline ms / measured ms)`` pairs, interpolated in log(rows), held
    flat past the ends. A roofline's two fractions cannot follow a CPU's small-row GEMMs (the
    reference model's layer GEMMs on one core: 1 row 0.26 ms, 4 rows 0.61, 16 rows 1.5, 64 rows
    4.4 -- the compute rate rises ~2x from 4 to 64 rows); Vidur interpolates its operator profiles
    for the same reason. Empty: the roofline alone (every GPU default: not measured, no GPU lent);
    on CPU :func:`ryzlab.projection.validation.fit_gemm_row_eff` reads it off the GEMM profile."""
    int8_weight_eff: float = 1.0
    """Bandwidth of an int8 weight-only GEMM relative to a bf16 one (dequantisation in the kernel)."""
    int4_weight_eff: float = 1.0
    """The same for int4 weight-only GEMMs."""
    kernel_us: float = 1.5
    """Cost of one kernel boundary inside a step (a captured graph still pays a gap per kernel)."""
    host_ms: float = 0.05
    """Per-step host time: scheduling + launching the step (one captured graph by default)."""
    host_seq_us: float = 0.0
    """Host time per sequence in a step that the engine spends around the forward (sampling one
    token, stop checks, building its output): a serving engine's, not a bare forward loop's.
    0 for a GPU engine that samples on the device and overlaps the rest (assumption); on CPU
    :func:`ryzlab.projection.engine_profiles.profile_engine_overhead` measures ryzlab's engine step
    against its forward at several batches (:func:`ryzlab.projection.engine_profiles.fit_host_seq`)."""
    request_ms: float = 0.0
    """Latency each request pays outside the steps: handing it to the engine and its first token
    back (API, router, IPC). Adds to TTFT and end-to-end latency, not to TPOT."""
    coll_base_us: float = 8.0
    """Fixed cost of one collective call, on top of the per-hop latency of the device's link."""
    coll_skew_frac: float = 0.0
    """Share of the work between two collectives that a collective adds by waiting for the slowest
    rank (ranks drift apart while they compute; on a shared-core VM the rank that arrives first
    idles and is descheduled, and waking it costs more the longer it slept). 0 for GPUs with NCCL
    (kernels spin; assumption); on CPU the link probe measures it at two amounts of work."""
    host_jitter_cv: float = 0.0
    """Spread of one engine's step times at a fixed shape: the standard deviation of the log of
    consecutive steps' times (a shared host's preemption, frequency and cache noise). The serving
    projection draws each step's time around its cost with this spread; 0 for a GPU (assumption:
    a captured graph's step time barely moves) and until measured on CPU
    (:func:`ryzlab.projection.engine_profiles.fit_host_jitter`, from one rank's step series)."""
    host_jitter_corr: float = 0.0
    """Lag-1 autocorrelation of those log step times, in [0, 1): slow steps come in runs on a
    shared host, so a request's mean TPOT does not average the noise away (its p99 depends on it)."""
    host_drift_cv: float = 0.0
    """Spread of the host's slow speed drift, on top of the step-to-step noise above: the standard
    deviation of the log of the mean step time over blocks of consecutive steps, beyond what the
    step-to-step noise explains. On a shared VM the host runs slow or fast for hundreds of steps at a
    time (one rank's decode steps: lag-256 autocorrelation ~0.4), so requests that overlap a slow
    spell are slow throughout -- the TPOT tail. 0 for a GPU (assumption) and until measured
    (:func:`ryzlab.projection.engine_profiles.fit_host_drift`, from one long one-rank step series)."""
    host_drift_ms: float = 0.0
    """Correlation time of that drift in milliseconds of wall time (idle time included): its
    autocorrelation after ``t`` ms is ``exp(-t / host_drift_ms)``."""
    host_wake_ms: float = 0.0
    """Extra time the first step after an idle spell costs on a host whose cores idle between
    requests: the host's wake-up (a shared VM's idle vCPU descheduled, its clocks and caches cold),
    paid in full by a step that starts cold and decaying over the busy time that follows
    (``host_warm_ms``); it comes back over idle time (``host_cool_ms``). On a 2-core VM one rank's
    decode step costs ~1.2 ms back to back and ~2.5-3 ms right after 10+ ms idle, and recovers over
    ~8 steps. The serving projection adds ``host_wake_ms x coldness`` to each step; a loaded engine
    runs warm, a trickle of requests cold. 0 for a GPU (assumption: a captured graph on a busy host
    thread) and until measured (:func:`ryzlab.projection.engine_profiles.profile_host_wake` /
    :func:`ryzlab.projection.engine_profiles.fit_host_wake`, one rank, no serving run)."""
    host_warm_ms: float = 0.0
    """Busy time (ms) over which the coldness decays: ``exp(-busy / host_warm_ms)``."""
    host_cool_ms: float = 0.0
    """Idle time (ms) over which the coldness returns: ``1 - exp(-idle / host_cool_ms)`` of the way
    back to fully cold (0: any idle makes it fully cold)."""
    link_frac: float = 0.8
    """Fraction of the link bandwidth a collective achieves (bus bandwidth)."""
    mem_util: float = 0.9
    """Fraction of device memory the engine may use (vLLM's ``gpu_memory_utilization`` default)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each number came from (a measurement, a published table, an assumption)."""
    fitted_from: str = ""
    """The measurements a fitted calibration came from; empty for a default."""

    def __post_init__(self) -> None:
        # JSON / YAML give lists; the frozen dataclass keeps a hashable tuple of (int rows, float eff)
        try:
            table = tuple((int(r), float(e)) for r, e in self.gemm_row_eff)
        except (TypeError, ValueError):
            raise ValueError(f"calibration {self.name}: gemm_row_eff must be (rows, efficiency) pairs, got "
                             f"{self.gemm_row_eff!r}") from None
        if len(table) > 64 or any(not (r >= 1 and 0 < e <= 100 and math.isfinite(e)) for r, e in table) or \
                len({r for r, _ in table}) != len(table):
            raise ValueError(f"calibration {self.name}: gemm_row_eff needs at most 64 pairs of distinct rows >= 1 and "
                             f"a finite efficiency in (0, 100], got {self.gemm_row_eff!r}")
        object.__setattr__(self, "gemm_row_eff", tuple(sorted(table)))
        for f in ("bw_frac", "flops_frac", "attn_frac", "int8_weight_eff", "int4_weight_eff", "link_frac", "mem_util"):
            v = getattr(self, f)
            if not 0 < v <= 1.0:
                raise ValueError(f"calibration {self.name}: {f} must be in (0, 1], got {v}")
        if not 1.0 <= self.corun_factor < math.inf:
            raise ValueError(f"calibration {self.name}: corun_factor must be a finite number >= 1, got {self.corun_factor}")
        if not 0.0 <= self.host_jitter_cv < math.inf:
            raise ValueError(f"calibration {self.name}: host_jitter_cv must be a finite number >= 0, got "
                             f"{self.host_jitter_cv}")
        if not 0.0 <= self.host_jitter_corr < 1.0:
            raise ValueError(f"calibration {self.name}: host_jitter_corr must be in [0, 1), got {self.host_jitter_corr}")
        if self.attn_lse_cost < 1.0:
            raise ValueError(f"calibration {self.name}: attn_lse_cost must be >= 1, got {self.attn_lse_cost}")
        for f in ("kernel_us", "host_ms", "request_ms", "coll_base_us", "coll_skew_frac", "cp_attn_us",
                  "cp_merge_kernels", "cp_step_us", "prefill_layer_us", "host_seq_us", "host_drift_cv",
                  "host_drift_ms", "host_wake_ms", "host_warm_ms", "host_cool_ms"):
            if not 0 <= getattr(self, f) < math.inf:   # NaN and inf too: a hostile calibration file
                raise ValueError(f"calibration {self.name}: {f} must be a finite number >= 0, got {getattr(self, f)}")

        if self.host_drift_cv > 0 and self.host_drift_ms <= 0:
            raise ValueError(f"calibration {self.name}: host_drift_cv > 0 needs host_drift_ms > 0 (its correlation "
                             f"time), got {self.host_drift_ms}")
        if self.host_wake_ms > 0 and self.host_warm_ms <= 0:
            raise ValueError(f"calibration {self.name}: host_wake_ms > 0 needs host_warm_ms > 0 (the busy time it "
                             f"decays over), got {self.host_warm_ms}")

    def replace(self, **kw: Any) -> "Calibration":
        return dataclasses.replace(self, **kw)


def _defaults() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(CALIBRATIONS_FILE.read_text())


def default_calibration(device_key: str) -> Calibration:
    """The shipped calibration for ``device_key`` (``cpu`` has its own; every GPU shares the
    ``gpu-default`` one, whose numbers and sources are in ``calibrations.yaml``)."""
    d = _defaults()
    key = device_key if device_key in d else "gpu-default"
    return Calibration(**{"name": key, **d[key]})


def load_calibration(path: str | os.PathLike) -> Calibration:
    """A calibration JSON written by :func:`save_calibration` (unknown keys are an error)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"calibration file {p} does not exist")
    data = json.loads(p.read_text())
    valid = {f.name for f in dataclasses.fields(Calibration)}
    bad = sorted(set(data) - valid)
    if bad:
        raise ConfigError([f"unknown keys {bad}; valid: {sorted(valid)}"], where=str(p))
    return Calibration(**data)


def save_calibration(cal: Calibration, path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(dataclasses.asdict(cal), indent=2, sort_keys=True) + "\n")
    return p


FIT_FIELDS = ("bw_frac", "flops_frac", "attn_frac", "kernel_us", "host_ms")
"""What :func:`fit` adjusts by default; the rest stay at the starting calibration's values."""


def fit(start: Calibration, predict: Callable[[Calibration, Any], float], rows: list[tuple[Any, float]], *,
        fields: tuple[str, ...] = FIT_FIELDS, name: str, fitted_from: str, rounds: int = 600) -> Calibration:
    """Fit ``fields`` of ``start`` so ``predict(cal, x)`` matches measured ``y`` (ms) over ``rows``.

    Minimises the sum of squared log ratios (relative error, symmetric in over/under) by
    Nelder-Mead in log space (no scipy in the core dependencies; a few parameters and a handful
    of rows need nothing better). Fractions are capped at 1.
    """
    if not rows:
        raise ValueError("fit needs at least one (shape, measured ms) row")

    def make(x: list[float]) -> Calibration:
        vals = {f: math.exp(v) for f, v in zip(fields, x)}
        return start.replace(**{f: min(v, 1.0) if f.endswith(("_frac", "_eff")) else v for f, v in vals.items()})

    def loss(x: list[float]) -> float:
        c = make(x)
        return sum(math.log(max(predict(c, r), 1e-9) / y) ** 2 for r, y in rows)

    x0 = [math.log(max(getattr(start, f), 1e-4)) for f in fields]
    simplex = [x0] + [[v + (0.7 if i == j else 0.0) for j, v in enumerate(x0)] for i in range(len(x0))]
    scores = [loss(x) for x in simplex]
    for _ in range(rounds):
        order = sorted(range(len(simplex)), key=scores.__getitem__)
        simplex, scores = [simplex[i] for i in order], [scores[i] for i in order]
        if scores[-1] - scores[0] < 1e-12:
            break
        centroid = [sum(p[j] for p in simplex[:-1]) / (len(simplex) - 1) for j in range(len(x0))]
        worst = simplex[-1]
        refl = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = loss(refl)
        if fr < scores[0]:
            exp_ = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = loss(exp_)
            simplex[-1], scores[-1] = (exp_, fe) if fe < fr else (refl, fr)
        elif fr < scores[-2]:
            simplex[-1], scores[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = loss(con)
            if fc < scores[-1]:
                simplex[-1], scores[-1] = con, fc
            else:   # shrink towards the best
                simplex = [simplex[0]] + [[b + 0.5 * (v - b) for b, v in zip(simplex[0], p)] for p in simplex[1:]]
                scores = [scores[0]] + [loss(p) for p in simplex[1:]]
    i = min(range(len(simplex)), key=scores.__getitem__)
    cal, best = make(simplex[i]), scores[i]
    rms = math.sqrt(best / len(rows))
    srcs = {**start.sources, **{f: f"fitted: {fitted_from}" for f in fields}}
    return cal.replace(name=name, fitted_from=f"{fitted_from} ({len(rows)} rows, rms log error {rms:.3f})",
                       sources=srcs)
