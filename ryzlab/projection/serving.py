"""Serving projection: the engine's real :class:`~ryzlab.serve.scheduler.Scheduler` on a virtual clock.

Continuous batching, chunked prefill, the token budget, KV capacity per codec and preemption
are the scheduler's own code, over the cache's own bookkeeping
(:class:`~ryzlab.kv.manager.KVCacheManager`, the same block pool the engine's cache uses, here
without tensors, sized to the replica's projected KV capacity). Only the forward is replaced:
each planned step advances the clock by :func:`ryzlab.projection.cost.step_cost` of that step
(times a draw of the host's step-time noise when the calibration measured it: ``host_jitter_cv``,
``host_jitter_corr`` step to step, ``host_drift_cv`` / ``host_drift_ms`` over wall time; none for GPUs)
plus the host's wake-up after idle (``host_wake_ms``: a trickle of requests meets a cold host).
After the step the bookkeeping the engine does follows it (``num_computed``, a token appended
when a sequence finished its prompt or decoded, ``finish``). There is no second scheduler.

Requests come from :func:`ryzlab.loadgen.load.make_requests` (the load generator's own draws:
Poisson / gamma arrivals at ``rate``, or ``closed`` with ``concurrency`` in flight).
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

from ryzlab.analysis import summary_columns
from ryzlab.config import ModelConfig
from ryzlab.kv.manager import KVCacheManager
from ryzlab.loadgen.load import LoadSpec, make_requests
from ryzlab.projection.calibration import Calibration
from ryzlab.projection.cost import Deployment, StepShape, kv_capacity_tokens, step_cost
from ryzlab.projection.hardware import Device
from ryzlab.serve.sampling import SamplingParams
from ryzlab.serve.scheduler import EngineConfig, EngineSequence, Scheduler

__all__ = ["ServingLoad", "simulate", "max_rate_under_slo"]


@dataclass(frozen=True, kw_only=True)
class ServingLoad:
    """The offered load of a serving projection."""

    rate: float | None = None
    """Requests per second (Poisson); None with ``concurrency`` = closed loop."""
    concurrency: int | None = None
    num_requests: int = 200
    prompt_tokens: int = 512
    output_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (requests/s) or concurrency (requests in flight)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


def _plan_shape(plan: list[tuple[EngineSequence, int]]) -> StepShape:
    """The step's shape: a sequence writing one token after its prompt decodes, others prefill."""
    shape = StepShape()
    for s, n in plan:
        past = s.num_computed
        if n == 1 and past >= len(s.prompt):
            shape = shape + StepShape.decode(1, past + 1)
        else:
            shape = shape + StepShape.prefill(n, past)
    return shape


class _StepNoise:
    """Multiplicative step-time noise, mean 1: ``exp(cv * x + drift_cv * y - (cv**2 + drift_cv**2) / 2)``.
    ``x`` is a stationary AR(1) series of unit variance over steps with lag-1 correlation ``corr``
    (the log step times' spread and persistence within one-rank step series:
    :func:`ryzlab.projection.engine_profiles.fit_host_jitter`); ``y`` the host's slow drift, unit
    variance, an Ornstein-Uhlenbeck process in wall time (idle time included) with correlation time
    ``drift_ms`` (:func:`ryzlab.projection.engine_profiles.fit_host_drift`). Both 0: always 1, no
    random draws."""

    def __init__(self, cv: float, corr: float, seed: int, drift_cv: float = 0.0, drift_ms: float = 0.0) -> None:
        self.cv, self.corr, self.drift_cv, self.drift_ms = cv, corr, drift_cv, drift_ms
        self.rng = random.Random(seed)
        self.x = self.rng.gauss(0.0, 1.0) if cv > 0 else 0.0
        self.y = self.rng.gauss(0.0, 1.0) if drift_cv > 0 else 0.0
        self.t_ms: float | None = None

    def next(self, now_ms: float = 0.0) -> float:
        """The factor for a step starting at ``now_ms`` (virtual wall time; non-decreasing)."""
        if self.cv <= 0 and self.drift_cv <= 0:
            return 1.0
        if self.drift_cv > 0:
            if self.t_ms is not None and now_ms > self.t_ms:
                r = math.exp(-(now_ms - self.t_ms) / self.drift_ms)
                self.y = r * self.y + math.sqrt(1 - r * r) * self.rng.gauss(0.0, 1.0)
            self.t_ms = now_ms if self.t_ms is None else max(self.t_ms, now_ms)
        f = math.exp(self.cv * self.x + self.drift_cv * self.y - (self.cv ** 2 + self.drift_cv ** 2) / 2)
        if self.cv > 0:
            self.x = self.corr * self.x + math.sqrt(1 - self.corr * self.corr) * self.rng.gauss(0.0, 1.0)
        return f


class _HostWake:
    """The host's wake-up after idle (``Calibration.host_wake_ms``): a coldness in [0, 1], 1 at the
    start (the engine waited for its first request); a step starting at coldness ``h`` costs
    ``host_wake_ms x h`` more, then ``h`` decays by ``exp(-step / host_warm_ms)``; idle time
    brings it back towards 1 by ``1 - exp(-idle / host_cool_ms)`` of the way (all of it when
    ``host_cool_ms`` is 0). ``host_wake_ms`` 0: no change to any step."""

    def __init__(self, wake_ms: float, warm_ms: float, cool_ms: float) -> None:
        self.wake_ms, self.warm_ms, self.cool_ms = wake_ms, warm_ms, cool_ms
        self.h = 1.0
        self.end_ms: float | None = None

    def step(self, start_ms: float, dt_ms: float) -> float:
        """The time (ms) of a step that starts at ``start_ms`` (virtual wall time, after the last step
        ended) and costs ``dt_ms`` warm."""
        if self.wake_ms <= 0:
            return dt_ms
        if self.end_ms is not None and start_ms > self.end_ms:
            back = math.exp(-(start_ms - self.end_ms) / self.cool_ms) if self.cool_ms > 0 else 0.0
            self.h = 1.0 - (1.0 - self.h) * back
        dt_ms += self.wake_ms * self.h
        self.h *= math.exp(-dt_ms / self.warm_ms)
        self.end_ms = start_ms + dt_ms
        return dt_ms


def simulate(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment, load: ServingLoad,
             engine: EngineConfig | None = None, *, host_overhead_ms: float | None = None,
             num_blocks: int | None = None, jitter_seed: int | None = None) -> dict[str, float]:
    """Run ``load`` through the real scheduler on a virtual clock; per-request TTFT / TPOT / E2EL
    percentiles (ms), throughput, preemptions. Every number is a projection (``basis`` says so).

    ``engine``: the scheduler's knobs (default: vLLM-like, 256 sequences, 8192 batched tokens,
    2048-token prefill chunks, max_model_len fitted to the load); ``num_blocks``: the pool size
    (default: the projected KV capacity); ``jitter_seed``: the seed of the step-time noise
    (default ``load.seed``; only used when ``cal.host_jitter_cv`` or ``cal.host_drift_cv`` > 0).
    """
    need = load.prompt_tokens + load.output_tokens
    engine = engine or EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192, prefill_chunk=2048,
                                    max_model_len=need)
    if num_blocks is None:   # the projected capacity; a measured engine's own pool size when given
        cap = kv_capacity_tokens(model, dev, cal, dep)
        num_blocks = cap // dep.block_size // dep.cp * dep.cp
    cap = num_blocks * dep.block_size
    # blocks beyond every request resident at once are never touched: a pool of 26k blocks (an 80 GB
    # GPU) cost seconds to build per simulated rate and changed no decision
    demand = load.num_requests * -(-need // dep.block_size) + dep.cp
    num_blocks = min(num_blocks, -(-demand // dep.cp) * dep.cp)
    if cap < need:
        raise ValueError(f"one request ({need} tokens) does not fit the projected KV capacity ({cap} tokens) of "
                         f"{dev.key} at tp={dep.tp} cp={dep.cp} weights={dep.weights}")
    cache = KVCacheManager(num_blocks, dep.block_size, engine.enable_prefix_caching, shards=dep.cp)
    sched = Scheduler(cache, engine)
    closed = load.rate is None
    spec = LoadSpec(arrival="closed" if closed else "poisson", rate=load.rate or 1.0,
                    concurrency=load.concurrency or 1, num_requests=load.num_requests, prompt_len=load.prompt_tokens,
                    output_len=load.output_tokens, vocab_size=model.vocab_size, seed=load.seed)
    reqs = make_requests(spec)
    arrivals: list[tuple[float, int]] = []   # heap of (arrival s, request index)
    if closed:
        arrivals = [(0.0, i) for i in range(min(load.concurrency or 1, len(reqs)))]
        nxt = len(arrivals)
    else:
        arrivals = [(r.arrival_s or 0.0, r.index) for r in reqs]
        nxt = len(reqs)
    heapq.heapify(arrivals)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    arrived: dict[str, float] = {}
    now, steps, busy = 0.0, 0, 0.0
    noise = _StepNoise(cal.host_jitter_cv, cal.host_jitter_corr, load.seed if jitter_seed is None else jitter_seed,
                       cal.host_drift_cv, cal.host_drift_ms)
    wake = _HostWake(cal.host_wake_ms, cal.host_warm_ms, cal.host_cool_ms)
    while len(done) < len(reqs):
        while arrivals and arrivals[0][0] <= now + 1e-12:
            t, i = heapq.heappop(arrivals)
            r = reqs[i]
            rid = str(i)
            arrived[rid] = t
            sched.add(EngineSequence(rid, i, list(r.prompt), SamplingParams(max_tokens=r.max_tokens), t))
        if not sched.has_work():
            now = arrivals[0][0]
            continue
        plan = sched.schedule()
        if not plan:   # nothing fits and nothing runs: the scheduler cannot make progress
            raise RuntimeError(f"the scheduler planned an empty step with {len(sched.waiting)} waiting requests "
                               f"(KV capacity {cap} tokens)")
        dt = step_cost(model, dev, cal, dep, _plan_shape(plan), host_overhead_ms=host_overhead_ms).total_ms / 1e3
        dt = wake.step(now * 1e3, dt * noise.next(now * 1e3) * 1e3) / 1e3
        now += dt
        busy += dt
        steps += 1
        for s, n in plan:
            s.num_computed += n
            cache.commit(s.seq_id, n)
            if s.pending > 0:
                continue
            s.output.append(0)   # token id is irrelevant to time; max_tokens ends the request
            first.setdefault(s.request_id, now)
            if s.done:
                sched.finish(s)
                done[s.request_id] = now
                if closed and nxt < len(reqs):
                    heapq.heappush(arrivals, (now, nxt))
                    nxt += 1
    # the request's own latency outside the steps (API / IPC; 0 unless calibrated) delays its first
    # token and its end alike, so TPOT is the steps' alone
    ttft = [1e3 * (first[k] - arrived[k]) + cal.request_ms for k in done]
    e2el = [1e3 * (done[k] - arrived[k]) + cal.request_ms for k in done]
    outs = {str(r.index): r.max_tokens for r in reqs}
    tpot = [(e - t) / (outs[k] - 1) for k, e, t in zip(done, e2el, ttft) if outs[k] > 1]
    span = max(done.values()) - min(arrived.values())
    out = {"num_requests": float(len(done)), "duration_s": span,
           "arrival_span_s": max(arrived.values()) - min(arrived.values()),
           "throughput_tokens_per_s": sum(outs.values()) / span if span > 0 else math.nan,
           "request_throughput_rps": len(done) / span if span > 0 else math.nan,
           "preemptions": float(sched.counters["preemptions"]), "steps": float(steps),
           "kv_capacity_tokens": float(cap)}
    for name, vals in (("ttft_ms", ttft), ("tpot_ms", tpot), ("e2el_ms", e2el)):
        out.update(summary_columns(name, vals, mean=True))
    return out


def max_rate_under_slo(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment, *, slo_ttft_ms: float,
                       slo_tpot_ms: float, prompt_tokens: int, output_tokens: int, num_requests: int = 200,
                       percentile: str = "p99", iters: int = 8, host_overhead_ms: float | None = None
                       ) -> tuple[float, dict[str, float] | None]:
    """The highest Poisson rate (req/s) whose projected ``percentile`` TTFT and TPOT meet the SLO,
    by bisection between 0 and the rate the replica can sustain at all; ``(0, None)`` when even
    a trickle misses it. Returns the rate and the projection at that rate."""
    def meets(rate: float) -> tuple[bool, dict[str, float]]:
        r = simulate(model, dev, cal, dep, ServingLoad(rate=rate, num_requests=num_requests,
                                                       prompt_tokens=prompt_tokens, output_tokens=output_tokens),
                     host_overhead_ms=host_overhead_ms)
        return (r[f"ttft_ms_{percentile}"] <= slo_ttft_ms and r[f"tpot_ms_{percentile}"] <= slo_tpot_ms), r

    # The upper bound: the steady closed-loop throughput with the engine's batch full. A finite
    # open-loop run above it still ends (its backlog drains) and can pass a percentile SLO, so no
    # rate above what the replica sustains is ever tried.
    conc = min(256, 4 * num_requests)
    sat = simulate(model, dev, cal, dep, ServingLoad(concurrency=conc, num_requests=2 * conc,
                                                     prompt_tokens=prompt_tokens, output_tokens=output_tokens),
                   host_overhead_ms=host_overhead_ms)
    hi = 0.95 * sat["request_throughput_rps"]
    ok, r = meets(hi * 0.02)
    if not ok:
        return 0.0, None
    lo, best = hi * 0.02, r
    ok, r = meets(hi)
    if ok:
        return hi, r
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok, r = meets(mid)
        if ok:
            lo, best = mid, r
        else:
            hi = mid
    return lo, best
