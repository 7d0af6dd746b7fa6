"""Operator profiles of ryzlab's serving engine on one rank, for the serving projection's calibration:
a prefill step against a decode step (``prefill_layer_us``), the engine's step against the forward
inside it (``host_seq_us``), the spread of consecutive steps' times (``host_jitter_cv`` /
``host_jitter_corr``) and the host's slow drift over a long series (``host_drift_cv`` /
``host_drift_ms``) and the host's wake-up after idle (``host_wake_ms`` / ``host_warm_ms`` /
``host_cool_ms``). No serving run is used: ``benchmarks/projection_validate.py`` checks the
serving curve they feed against one.
"""
from __future__ import annotations

import itertools
import math
import statistics

from ryzlab.projection.calibration import Calibration, fit
from ryzlab.projection.cost import Deployment, StepShape, step_cost
from ryzlab.projection.validation import _weight_stream

__all__ = ["fit_host_jitter", "fit_host_drift", "profile_prefill", "fit_prefill", "profile_engine_overhead",
           "fit_host_seq", "profile_host_wake", "fit_host_wake"]


def fit_host_jitter(series: list[list[float]]) -> tuple[float, float]:
    """``(host_jitter_cv, host_jitter_corr)`` from step-time series of one engine at fixed shapes
    (one list of consecutive step times per run, any unit): per series the standard deviation of
    the log step times and their lag-1 autocorrelation (clipped to [0, 0.99]); the median of each
    over the series. Series shorter than 3 steps or constant are skipped."""
    cvs, corrs = [], []
    for s in series:
        if len(s) < 3 or any(not (v > 0 and math.isfinite(v)) for v in s):
            continue
        logs = [math.log(v) for v in s]
        mu = statistics.fmean(logs)
        d = [v - mu for v in logs]
        var = sum(x * x for x in d)
        if var <= 0:
            continue
        cvs.append(math.sqrt(var / (len(d) - 1)))
        corrs.append(min(0.99, max(0.0, sum(a * b for a, b in zip(d, d[1:])) / var)))
    if not cvs:
        raise ValueError("fit_host_jitter needs at least one series of 3+ positive, finite, not all equal step times")
    return statistics.median(cvs), statistics.median(corrs)


def fit_host_drift(series: list[float], block: int = 16) -> tuple[float, float]:
    """``(host_drift_cv, host_drift_ms)`` from one LONG series of one engine's consecutive step times
    at a fixed shape (ms; hundreds of steps or more): the log step times averaged over blocks of
    ``block`` steps; the drift's variance is the variance of those block means less what the
    step-to-step noise leaves in a mean of ``block`` steps (the median within-block variance /
    ``block``, at least 0); its correlation time is one block's duration (``block`` x the median
    step) over -ln of the block means' lag-1 autocorrelation (clipped to [0.01, 0.999]).
    Needs at least 8 blocks of positive, finite times."""
    if block < 2:
        raise ValueError(f"fit_host_drift: block must be >= 2 steps, got {block}")
    if any(not (v > 0 and math.isfinite(v)) for v in series):
        raise ValueError("fit_host_drift: step times must be positive and finite")
    n = len(series) // block
    if n < 8:
        raise ValueError(f"fit_host_drift needs at least 8 blocks of {block} steps ({8 * block} steps), "
                         f"got {len(series)}")
    logs = [math.log(v) for v in series[:n * block]]
    blocks = [logs[i * block:(i + 1) * block] for i in range(n)]
    means = [statistics.fmean(b) for b in blocks]
    within = statistics.median(statistics.variance(b) for b in blocks)
    var = max(0.0, statistics.variance(means) - within / block)
    mu = statistics.fmean(means)
    d = [m - mu for m in means]
    ss = sum(x * x for x in d)
    rho = sum(a * b for a, b in zip(d, d[1:])) / ss if ss > 0 else 0.0
    rho = min(0.999, max(0.01, rho))
    return math.sqrt(var), -block * statistics.median(series) / math.log(rho)


def profile_prefill(model, points: tuple[tuple[int, int], ...] = ((1, 32), (2, 32), (1, 64), (4, 16)),
                    iters: int = 15, repeats: int = 3) -> list[dict[str, float]]:
    """Operator profile, on ONE process, of a prefill step against a decode step as the engine runs
    them (:meth:`PagedKVCache.allocate_slots`, then :func:`ryzlab.serve.engine.ragged_forward` of
    ``model`` with random weights, float32, under ``torch.inference_mode``): ``batch`` new prompts
    of ``prompt`` tokens in one step, then the same sequences' next token (the short decode path).
    Each call after an untimed pass through the layer matrices (cold caches, as after another
    step); prefill and decode alternate, so drift hits both. -> rows with ``ms`` (prefill) and
    ``ms_decode``."""
    import time

    import torch

    from ryzlab.config import CacheConfig
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.models.transformer import Transformer
    from ryzlab.serve.engine import ragged_forward

    torch.manual_seed(0)
    net = Transformer(model).eval()
    ids = itertools.count()
    out = []
    for b, n in points:
        cache = PagedKVCache(model, CacheConfig(num_blocks=2 * b * (n // 16 + 2)))
        stream = _weight_stream(model, b)
        gen = torch.Generator().manual_seed(b * 100003 + n)
        res: dict[str, list[float]] = {"ms": [], "ms_decode": []}
        with torch.inference_mode():
            for _ in range(repeats):
                pre, dec = [], []
                for i in range(iters + 1):
                    seqs = [next(ids) for _ in range(b)]
                    prompts = [torch.randint(0, model.vocab_size, (n,), generator=gen).tolist() for _ in seqs]
                    stream()
                    t0 = time.perf_counter()
                    for s_, p in zip(seqs, prompts):
                        cache.allocate_slots(s_, p)
                    ragged_forward(net, cache, seqs, prompts)
                    t1 = time.perf_counter()
                    stream()
                    t2 = time.perf_counter()
                    for s_ in seqs:
                        cache.allocate_slots(s_, [1])
                    ragged_forward(net, cache, seqs, [[1]] * b)
                    t3 = time.perf_counter()
                    for s_ in seqs:
                        cache.free(s_)
                    if i:   # the first pair warms the allocator and the shapes
                        pre.append(t1 - t0)
                        dec.append(t3 - t2)
                res["ms"].append(statistics.median(pre) * 1e3)
                res["ms_decode"].append(statistics.median(dec) * 1e3)
        out.append({"batch": b, "prompt": n, **{k: statistics.median(v) for k, v in res.items()}})
    return out


def fit_prefill(rows: list[dict[str, float]], model, dev, cal: Calibration, dep: Deployment | None = None) -> float:
    """``prefill_layer_us`` from :func:`profile_prefill` rows under ``cal``: per row, how much more
    the measured prefill step cost than the decode step, less what the cost model already prices
    between the two (the prompt's GEMMs and attention); the median over rows, per layer, at least 0.
    The host time and everything a step pays either way cancel in the difference."""
    if not rows:
        raise ValueError("fit_prefill needs at least one profile row")
    dep = dep or Deployment(weights="fp32")
    extra = []
    for r in rows:
        b, n = int(r["batch"]), int(r["prompt"])
        pre = step_cost(model, dev, cal.replace(prefill_layer_us=0.0), dep, StepShape.prefill(n, 0, seqs=b)).total_ms
        dec = step_cost(model, dev, cal, dep, StepShape.decode(b, n + 1)).total_ms
        extra.append((r["ms"] - r["ms_decode"]) - (pre - dec))
    return max(0.0, statistics.median(extra)) / model.n_layers * 1e3


def profile_engine_overhead(model, batches: tuple[int, ...] = (1, 4, 16), prompt: int = 32, steps: int = 30,
                            repeats: int = 3) -> list[dict[str, float]]:
    """Operator profile of ryzlab's serving engine around its forward, on ONE process: an
    :class:`~ryzlab.serve.engine.Engine` of ``model``'s shape (random weights, float32, the torch
    path) decodes ``batch`` sequences of a ``prompt``-token prompt; per decode step the engine's
    whole step and the forward inside it (:meth:`Engine.execute`) are timed. -> rows with
    ``batch``, ``step_ms``, ``forward_ms`` and ``overhead_ms`` (medians; the step less the forward:
    scheduling, sampling, stop checks, outputs)."""
    import time

    import torch

    from ryzlab.config import CacheConfig
    from ryzlab.serve.replica import build_engine
    from ryzlab.serve.sampling import SamplingParams
    from ryzlab.serve.scheduler import EngineConfig
    from ryzlab.serve.spec import ReplicaSpec

    if steps < 2 or not batches or min(batches) < 1:
        raise ValueError(f"profile_engine_overhead needs steps >= 2 (a full decode step before the last) and batches "
                         f">= 1; got steps={steps}, batches={batches}")
    out = []
    for b in batches:
        spec = ReplicaSpec(model="random", model_config=model,
                           cache=CacheConfig(num_blocks=b * ((prompt + steps + 8) // 16 + 2) + 8),
                           engine=EngineConfig(max_num_seqs=b, max_model_len=prompt + steps + 8,
                                               max_num_batched_tokens=max(256, b * prompt)))
        eng = build_engine(spec, threads=torch.get_num_threads())
        fwd: list[float] = []
        real = eng.execute

        def timed(seq_ids, inputs, _real=real):
            t0 = time.perf_counter()
            r = _real(seq_ids, inputs)
            fwd.append(time.perf_counter() - t0)
            return r
        eng.execute = timed
        gen = torch.Generator().manual_seed(b)
        res: dict[str, list[float]] = {"step_ms": [], "forward_ms": [], "overhead_ms": []}
        try:
            for r in range(repeats):
                for i in range(b):
                    eng.add_request(f"{r}-{i}", torch.randint(0, model.vocab_size, (prompt,), generator=gen).tolist(),
                                    SamplingParams(max_tokens=steps + 1))
                while any(s.num_computed < len(s.prompt) for s in eng.running) or eng.waiting:
                    eng.step()   # the prompts (not timed)
                step, f = [], []
                while eng.has_work():
                    fwd.clear()
                    t0 = time.perf_counter()
                    eng.step()
                    dt = time.perf_counter() - t0
                    if len(fwd) == 1 and len(eng.running) == b:   # a full decode step (not the last one)
                        step.append(dt)
                        f.append(fwd[0])
                if step:
                    res["step_ms"].append(statistics.median(step) * 1e3)
                    res["forward_ms"].append(statistics.median(f) * 1e3)
                    res["overhead_ms"].append(statistics.median(s_ - f_ for s_, f_ in zip(step, f)) * 1e3)
        finally:
            eng.close()
        out.append({"batch": b, **{k: statistics.median(v) for k, v in res.items()}})
    return out


def fit_host_seq(rows: list[dict[str, float]]) -> float:
    """``host_seq_us`` from :func:`profile_engine_overhead` rows: the least-squares slope of the
    engine's time around the forward over the batch (us per sequence), at least 0; the intercept
    (per step, whatever the batch) is the host time the serving fit prices."""
    pts = [(r["batch"], r["overhead_ms"]) for r in rows]
    if len({b for b, _ in pts}) < 2:
        raise ValueError("fit_host_seq needs profile rows at two or more batch sizes")
    mx, my = statistics.fmean(b for b, _ in pts), statistics.fmean(y for _, y in pts)
    slope = sum((b - mx) * (y - my) for b, y in pts) / sum((b - mx) ** 2 for b, _ in pts)
    return max(0.0, slope) * 1e3


WAKE_GAPS_MS = (0.0, 2.0, 5.0, 10.0, 30.0, 100.0, 300.0)
"""Idle spells (ms) :func:`profile_host_wake` leaves before a request's steps."""


def profile_host_wake(model, gaps_ms: tuple[float, ...] = WAKE_GAPS_MS, repeats: int = 20, decode_steps: int = 12,
                      prompt: int = 32, seed: int = 0) -> list[dict[str, float]]:
    """Operator profile, on ONE process, of the host waking up from idle, as a lone request meets an
    idle engine: the thread idles for ``gap_ms`` (``time.sleep``: the core halts, as the engine
    does blocked on its queue), then one sequence's prefill of ``prompt`` tokens and
    ``decode_steps`` decode steps run back to back (:func:`ryzlab.serve.engine.ragged_forward` of
    ``model`` with random weights, float32, under ``torch.inference_mode``), each step timed. The
    gaps are shuffled (seeded) so drift hits them alike; gap 0 is the warm reference (the previous
    request's steps just ran). -> one row per gap and step (``step`` 0 = the prefill) with the
    median ``ms`` over ``repeats``."""
    import random
    import time

    import torch

    from ryzlab.config import CacheConfig
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.models.transformer import Transformer
    from ryzlab.serve.engine import ragged_forward

    if repeats < 1 or decode_steps < 1 or prompt < 1 or not gaps_ms or min(gaps_ms) < 0 or 0 not in gaps_ms:
        raise ValueError(f"profile_host_wake needs repeats, decode_steps and prompt >= 1 and gaps_ms >= 0 including 0 "
                         f"(the warm reference); got repeats={repeats}, decode_steps={decode_steps}, prompt={prompt}, "
                         f"gaps_ms={gaps_ms}")
    torch.manual_seed(seed)
    net = Transformer(model).eval()
    cache = PagedKVCache(model, CacheConfig(num_blocks=2 * ((prompt + decode_steps) // 16 + 2)))
    gen = torch.Generator().manual_seed(seed)
    order = [g for g in gaps_ms for _ in range(repeats)]
    random.Random(seed).shuffle(order)
    times: dict[float, list[list[float]]] = {g: [[] for _ in range(decode_steps + 1)] for g in gaps_ms}
    ids = itertools.count()
    with torch.inference_mode():
        for warm in (True,) * 3 + (False,) * len(order):   # three untimed requests warm the shapes
            g = 0.0 if warm else order.pop()
            s_ = next(ids)
            p = torch.randint(0, model.vocab_size, (prompt,), generator=gen).tolist()
            if g > 0:
                time.sleep(g / 1e3)
            for k in range(decode_steps + 1):
                toks = p if k == 0 else [1]
                t0 = time.perf_counter()
                cache.allocate_slots(s_, toks)
                ragged_forward(net, cache, [s_], [toks])
                if not warm:
                    times[g][k].append((time.perf_counter() - t0) * 1e3)
            cache.free(s_)
    return [{"gap_ms": g, "step": k, "ms": statistics.median(v)} for g in gaps_ms for k, v in enumerate(times[g])]


def _wake_extra(wake_ms: float, warm_ms: float, cool_ms: float, gap_ms: float, busy_ms: float) -> float:
    """The wake-up extra of a step that starts ``busy_ms`` into a run of steps after ``gap_ms`` idle
    from warm (the serving clock's :class:`ryzlab.projection.serving._HostWake`, closed form)."""
    cold = 1.0 - math.exp(-gap_ms / cool_ms) if cool_ms > 0 else float(gap_ms > 0)
    return wake_ms * cold * math.exp(-busy_ms / warm_ms)


def fit_host_wake(rows: list[dict[str, float]]) -> tuple[float, float, float]:
    """``(host_wake_ms, host_warm_ms, host_cool_ms)`` from :func:`profile_host_wake` rows: each
    step after an idle gap costs the same step at gap 0 plus ``host_wake_ms x (1 - exp(-gap /
    host_cool_ms)) x exp(-busy / host_warm_ms)``, ``busy`` the measured time of the steps before it
    in that run; the three numbers fitted by relative least squares over every step after a gap.
    Needs gap-0 rows and at least two positive gaps with the same steps."""
    base = {int(r["step"]): r["ms"] for r in rows if r["gap_ms"] == 0}
    gaps = sorted({r["gap_ms"] for r in rows if r["gap_ms"] > 0})
    if not base or len(gaps) < 2:
        raise ValueError("fit_host_wake needs the gap-0 (warm) rows and rows at two or more positive gaps")
    if any(not (r["ms"] > 0 and math.isfinite(r["ms"]) and math.isfinite(r["gap_ms"])) for r in rows):
        raise ValueError("fit_host_wake: step times must be positive and finite")
    pts = []
    for g in gaps:
        steps = sorted((int(r["step"]), r["ms"]) for r in rows if r["gap_ms"] == g)
        if [k for k, _ in steps] != sorted(base):
            raise ValueError(f"fit_host_wake: the rows at gap {g} ms have steps {[k for k, _ in steps]}, the gap-0 "
                             f"rows {sorted(base)}")
        busy = 0.0
        for k, ms in steps:
            pts.append(((g, k, busy), ms))
            busy += ms
    start = Calibration(name="host-wake", host_wake_ms=max(0.1, statistics.median(base.values())), host_warm_ms=5.0,
                        host_cool_ms=5.0)
    c = fit(start, lambda c, x: base[x[1]] + _wake_extra(c.host_wake_ms, c.host_warm_ms, c.host_cool_ms, x[0], x[2]),
            pts, fields=("host_wake_ms", "host_warm_ms", "host_cool_ms"), name="host-wake", fitted_from="wake profile")
    return c.host_wake_ms, c.host_warm_ms, c.host_cool_ms
