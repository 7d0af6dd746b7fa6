"""ryzlab.projection: hand-computable costs, monotonicity, config-only models, the CLI's rows and refusals."""
from __future__ import annotations

import json
import math
import shutil
import statistics

import pandas as pd
import pytest
import yaml

from ryzlab.config import ConfigError, ModelConfig
from ryzlab.projection import hardware
from ryzlab.projection.calibration import Calibration, default_calibration, fit, load_calibration, save_calibration
from ryzlab.projection.cost import (Deployment, StepShape, collective_ms, kv_bytes_per_token, kv_capacity_tokens,
                                   memory_bytes_per_device, step_cost, weight_bytes)
from ryzlab.projection.formats import matrix_bytes
from ryzlab.projection.project import ROW_FIELDS, Workload, check_layouts, project_row
from ryzlab.projection.shapes import CONFIGS_DIR, load_shape, shipped_models

ZERO = Calibration(name="zero-overhead", bw_frac=1.0, flops_frac=1.0, kernel_us=0.0, host_ms=0.0, coll_base_us=0.0,
                   link_frac=1.0)


def _dev(**kw) -> hardware.Device:
    base = dict(key="toy", name="toy", memory_gb=80.0, hbm_gbps=1000.0, bf16_tflops=100.0, fp8_tflops=None,
                int8_tops=200.0, interconnect="toy", link_gbps=100.0, link_latency_us=2.0, devices_per_node=8,
                net_gbps=10.0, net_latency_us=10.0)
    return hardware.Device(**{**base, **kw})


def test_matrix_bytes_per_format_by_hand():
    assert matrix_bytes("bf16", 4, 64) == 512
    assert matrix_bytes("fp32", 4, 64) == 1024
    assert matrix_bytes("int8", 4, 64) == 256 + 4 * 2          # + one bf16 scale per row
    assert matrix_bytes("int4", 64, 64, group=32) == 2048 + 64 * 2 * 4   # + bf16 scale & zero per 32 columns
    # the same formula as the packed layers' ledger (torch's CPU int4 layout holds whole blocks of 64 rows)
    from ryzlab.models.quant import linear_weight_bytes

    for fmt, name in (("fp32", "float32"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int4-g128")):
        assert matrix_bytes(fmt, 100, 256) == linear_weight_bytes(100, 256, name)
    with pytest.raises(ValueError, match="bf16"):
        matrix_bytes("int3", 4, 64)


def test_one_gemm_compute_bound_by_hand():
    """A 1-layer model on a device with unlimited bandwidth: the GEMM part is 2 T params / peak."""
    m = ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=256)
    dev = _dev(hbm_gbps=1e12)
    T = 1000
    c = step_cost(m, dev, ZERO, Deployment(), StepShape.prefill(T))
    params = 128 * 128 * 4 + 128 * 256 * 3          # wq wk wv wo + w1 w3 w2
    assert c.gemm_ms == pytest.approx(2 * T * params / 100e12 * 1e3, rel=1e-9)


def test_bandwidth_bound_decode_is_bytes_over_bandwidth():
    """Llama-2-7B, batch 1, no overheads: a decode step is the weights read once / bandwidth."""
    m, _ = load_shape("llama-2-7b")
    dev = hardware.get_device("a100-80gb")
    c = step_cost(m, dev, ZERO, Deployment(), StepShape.decode(1, 8))
    assert c.total_ms == pytest.approx(c.weight_bytes / (dev.hbm_gbps * 1e9) * 1e3, rel=0.02)
    # 6.74 B params in bf16, less the embedding table (a lookup reads one row, not the table)
    assert c.weight_bytes == pytest.approx(2 * (6.74e9 - 32000 * 4096), rel=0.01)


def test_collective_is_alpha_plus_bytes_over_beta():
    dev, cal = _dev(link_gbps=100.0, link_latency_us=2.0), ZERO.replace(coll_base_us=5.0, link_frac=0.5)
    S = 1_000_000
    # ring all-gather of 2: base + one hop + the other rank's chunk at half the link's 100 GB/s
    assert collective_ms("all_gather", S, 2, dev, cal) == pytest.approx((5 + 2 + S / 50e9 * 1e6) / 1e3)
    ring = 2 * 3 * 2 + 2 * 3 * S / 4 / 50e9 * 1e6
    tree = 2 * 2 * 2 + 2 * S / 50e9 * 1e6
    assert collective_ms("all_reduce", S, 4, dev, cal) == pytest.approx((5 + min(ring, tree)) / 1e3)
    assert collective_ms("all_reduce", S, 1, dev, cal) == 0.0
    # past one node the network's bandwidth and latency apply
    assert collective_ms("all_gather", S, 16, dev, cal) > collective_ms("all_gather", S, 8, dev, cal) * 5


def test_more_devices_never_more_memory_per_device():
    m, _ = load_shape("llama-3-70b")
    for w in ("bf16", "int4"):
        mems = [memory_bytes_per_device(m, Deployment(tp=tp, cp=cp, weights=w), 64 * 4096)
                for tp, cp in ((1, 1), (2, 1), (4, 1), (8, 1))]
        assert mems == sorted(mems, reverse=True) and mems[-1] < mems[0] / 4
        cps = [memory_bytes_per_device(m, Deployment(tp=2, cp=cp, weights=w), 64 * 4096) for cp in (1, 2, 4)]
        assert cps == sorted(cps, reverse=True)
    fmts = [weight_bytes(m, Deployment(weights=w))["total"] for w in ("fp32", "bf16", "int8", "int4")]
    assert fmts == sorted(fmts, reverse=True)


def test_kv_bytes_follow_the_ledger_and_capacity_grows_with_compression():
    m, _ = load_shape("llama-3-8b")
    assert kv_bytes_per_token(m, Deployment()) == 2 * 8 * 128 * 2               # K+V, 8 KV heads, bf16
    assert kv_bytes_per_token(m, Deployment(tp=4)) == 2 * 2 * 128 * 2
    dev = hardware.get_device("h100-sxm")
    cal = default_calibration("h100-sxm")
    caps = [kv_capacity_tokens(m, dev, cal, Deployment(codec=c)) for c in ("none", "int8", "int4")]
    assert caps == sorted(caps) and caps[2] > 3 * caps[0]


def test_shipped_config_only_folders(tmp_path):
    assert shipped_models() == ["llama-2-70b", "llama-2-7b", "llama-3-70b", "llama-3-8b", "mistral-7b", "qwen2-7b"]
    params = {"llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "llama-3-8b": 8.03e9, "llama-3-70b": 70.55e9,
              "mistral-7b": 7.24e9, "qwen2-7b": 7.62e9}
    for name, n in params.items():
        m, _ = load_shape(name)
        assert weight_bytes(m, Deployment(weights="bf16"))["total"] / 2 == pytest.approx(n, rel=0.01), name
    # a folder holding nothing but config.json (no weights, no tokenizer)
    shutil.copy(CONFIGS_DIR / "qwen2-7b" / "config.json", tmp_path / "config.json")
    m, label = load_shape(str(tmp_path))
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.qkv_bias) == (28, 28, 4, True) and label == tmp_path.name
    with pytest.raises(ValueError, match="llama-3-8b"):
        load_shape(str(tmp_path / "nope"))


def test_catalog_sources_user_yaml_and_overrides(tmp_path):
    cat = hardware.load_catalog()
    assert {"h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l40s", "l4", "mi300x", "cpu"} <= set(cat)
    for key, d in cat.items():
        numeric = [f for f in hardware.OVERRIDABLE + ("fp8_tflops",) if f in d]
        assert set(numeric) <= set(d["sources"]), key
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"h100-sxm": {"hbm_gbps": 1675}, "b-next": {**cat["a100-80gb"], "name": "next"}}))
    assert hardware.get_device("h100-sxm", extra=f).hbm_gbps == 1675
    assert hardware.get_device("b-next", extra=f).name == "next"
    m, _ = load_shape("llama-2-7b")
    cal = ZERO
    slow = step_cost(m, hardware.get_device("h100-sxm", {"hbm_gbps": 1675}), cal, Deployment(), StepShape.decode(1, 8))
    fast = step_cost(m, hardware.get_device("h100-sxm"), cal, Deployment(), StepShape.decode(1, 8))
    assert slow.total_ms == pytest.approx(2 * fast.total_ms, rel=0.02)
    with pytest.raises(ConfigError, match="valid devices: h100-sxm"):
        hardware.get_device("h100")
    with pytest.raises(ConfigError, match="overridable fields"):
        hardware.get_device("h100-sxm", {"hbm_tbps": 3.0})
    # a user's devices file is input: every number checked, all problems named at once
    f.write_text("h100-sxm: {hbm_gbps: -1, fp8_tflops: .nan, link_gbps: '1e400', devices_per_node: 2.5, "
                 "link_latency_us: 0, name: [1]}\n")
    with pytest.raises(ConfigError) as e:
        hardware.get_device("h100-sxm", extra=f)
    for words in ("hbm_gbps=-1: expected a finite number > 0", "fp8_tflops=nan: expected a finite number > 0 or null",
                  "link_gbps='1e400'", "devices_per_node=2.5: expected a whole number >= 1", "name=[1]"):
        assert words in str(e.value)
    assert "link_latency_us" not in str(e.value)   # a zero latency is allowed
    f.write_text("h100-sxm: {fp8_tflops: null}\n")
    assert hardware.get_device("h100-sxm", extra=f).fp8_tflops is None


def test_calibration_file_round_trip_and_fit_recovers_a_known_fraction(tmp_path):
    cal = default_calibration("a100-80gb")
    assert cal.name == "gpu-default" and cal.sources["bw_frac"].startswith("fitted")
    assert load_calibration(save_calibration(cal, tmp_path / "c.json")) == cal
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "bw_fraction": 0.5}))
    with pytest.raises(ConfigError, match="bw_fraction"):
        load_calibration(tmp_path / "bad.json")
    m, _ = load_shape("llama-2-7b")
    dev = hardware.get_device("a100-80gb")
    truth = cal.replace(bw_frac=0.55, host_ms=0.4)
    pts = [StepShape.decode(b, c) for b, c in ((1, 128), (8, 1024), (32, 512), (1, 4096))]
    rows = [(s, step_cost(m, dev, truth, Deployment(), s).total_ms) for s in pts]
    got = fit(cal, lambda c, s: step_cost(m, dev, c, Deployment(), s).total_ms, rows, fields=("bw_frac", "host_ms"),
              name="t", fitted_from="synthetic")
    assert got.bw_frac == pytest.approx(0.55, rel=0.03) and got.host_ms == pytest.approx(0.4, rel=0.2)


def test_layouts_that_do_not_fit_are_refused_with_the_valid_sizes():
    m, _ = load_shape("qwen2-7b")
    with pytest.raises(ConfigError, match=r"valid tp sizes: \[1, 2, 4\]"):
        check_layouts(m, [1, 8], [1])


def test_serving_projection_drives_the_real_scheduler(monkeypatch):
    from ryzlab.projection.serving import ServingLoad, simulate
    from ryzlab.serve.scheduler import Scheduler

    calls = []
    real = Scheduler.schedule
    monkeypatch.setattr(Scheduler, "schedule", lambda self: calls.append(1) or real(self))
    m, _ = load_shape("llama-3-8b")
    dev = hardware.get_device("l4")
    cal = default_calibration("l4")
    dep = Deployment(weights="int4")
    lo = simulate(m, dev, cal, dep, ServingLoad(rate=1.0, num_requests=20, prompt_tokens=256, output_tokens=32))
    assert len(calls) == lo["steps"] > 0 and lo["num_requests"] == 20
    hi = simulate(m, dev, cal, dep, ServingLoad(rate=50.0, num_requests=20, prompt_tokens=256, output_tokens=32))
    assert hi["ttft_ms_p99"] >= lo["ttft_ms_p99"] and hi["e2el_ms_p50"] >= lo["e2el_ms_p50"]
    # a cache that holds few requests: the real scheduler preempts
    tight = simulate(m, dev.__class__(**{**dev.__dict__, "memory_gb": 7.2}), cal, dep,
                     ServingLoad(concurrency=40, num_requests=40, prompt_tokens=1024, output_tokens=256))
    assert tight["preemptions"] > 0


def test_serving_projection_builds_no_more_blocks_than_the_load_can_hold(monkeypatch):
    """An 80 GB pool (26k blocks) was built per simulated rate and changed nothing: the pool is
    capped at every request resident at once, with the same results."""
    import ryzlab.projection.serving as S
    from ryzlab.projection.serving import ServingLoad, simulate

    sizes = []
    real = S.KVCacheManager
    monkeypatch.setattr(S, "KVCacheManager", lambda n, *a, **k: sizes.append(n) or real(n, *a, **k))
    m, _ = load_shape("llama-3-8b")
    dev, cal, dep = hardware.get_device("h100-sxm"), default_calibration("h100-sxm"), Deployment(weights="int8")
    load = ServingLoad(rate=20.0, num_requests=10, prompt_tokens=256, output_tokens=32)
    capped = simulate(m, dev, cal, dep, load)
    assert sizes == [10 * (288 // 16) + 1]
    huge = simulate(m, dev, cal, dep, load, num_blocks=30000)
    same = lambda r: {k: v for k, v in r.items() if k != "kv_capacity_tokens"}  # the pool it was given, reported
    assert sizes[-1] == sizes[0] and same(capped) == same(huge)


def test_host_jitter_fit_by_hand_and_refused_out_of_range():
    """fit_host_jitter: per series the sd of log step times and their lag-1 autocorrelation, the
    median of each; the calibration refuses a negative spread or a correlation outside [0, 1)."""
    from ryzlab.projection.engine_profiles import fit_host_jitter

    e = math.e
    # logs 0, 0, 1, 1: deviations -.5 -.5 .5 .5 -> sd sqrt(1/3); lag-1 sum .25 - .25 + .25 over 1
    cv, corr = fit_host_jitter([[1.0, 1.0, e, e]])
    assert cv == pytest.approx(math.sqrt(1 / 3)) and corr == pytest.approx(0.25)
    # alternating: negative lag-1 correlation is clipped to 0; too-short, constant or bad series skipped
    cv, corr = fit_host_jitter([[1.0, e, 1.0, e], [2.0, 2.0], [3.0, 3.0, 3.0], [1.0, 0.0, 2.0]])
    assert cv == pytest.approx(math.sqrt(1 / 3)) and corr == 0.0
    with pytest.raises(ValueError, match="at least one series"):
        fit_host_jitter([[1.0, 1.0, 1.0]])
    for bad in ({"host_jitter_cv": -0.1}, {"host_jitter_cv": math.inf}, {"host_jitter_corr": 1.0},
                {"host_jitter_corr": -0.2}, {"host_jitter_corr": math.nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            default_calibration("cpu").replace(**bad)
    assert default_calibration("h100-sxm").host_jitter_cv == 0.0   # no jitter modelled for a GPU


def test_prefill_layer_us_by_hand_fit_and_profile():
    """prefill_layer_us: a step holding prompt tokens pays it once per layer (shared host: times the
    core share), a decode step never; fit_prefill recovers a known extra per layer from rows whose
    prefill-minus-decode exceeds the model's own difference by it; the profile times both steps."""
    from ryzlab.projection.engine_profiles import fit_prefill, profile_prefill

    m, _ = load_shape("reference")
    dev, dep = hardware.get_device("cpu"), Deployment(weights="fp32")
    cal = default_calibration("cpu")
    pre, dec = StepShape.prefill(32, 0, seqs=2), StepShape.decode(2, 33)
    with_us = cal.replace(prefill_layer_us=250.0)
    assert step_cost(m, dev, with_us, dep, pre).total_ms == pytest.approx(
        step_cost(m, dev, cal, dep, pre).total_ms + m.n_layers * 0.25, rel=1e-9)
    assert step_cost(m, dev, with_us, dep, dec).total_ms == step_cost(m, dev, cal, dep, dec).total_ms
    tp2 = Deployment(weights="fp32", tp=2)
    assert step_cost(m, dev, with_us, tp2, pre).attention_ms - step_cost(m, dev, cal, tp2, pre).attention_ms == \
        pytest.approx(m.n_layers * 0.25 * max(1.0, 2 / dev.devices_per_node), rel=1e-9)

    def row(b: int, n: int, extra_ms: float) -> dict:
        d = step_cost(m, dev, cal, dep, StepShape.decode(b, n + 1)).total_ms
        p = step_cost(m, dev, cal, dep, StepShape.prefill(n, 0, seqs=b)).total_ms
        return {"batch": b, "prompt": n, "ms": p + 1.0 + extra_ms, "ms_decode": d + 1.0}   # +1 ms either way cancels
    rows = [row(1, 32, 0.4), row(2, 32, 0.4), row(1, 64, 3.0)]
    assert fit_prefill(rows, m, dev, cal) == pytest.approx(400.0 / m.n_layers)
    assert fit_prefill([row(1, 32, -1.0)], m, dev, cal) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        fit_prefill([], m, dev, cal)
    with pytest.raises(ValueError, match="prefill_layer_us"):
        cal.replace(prefill_layer_us=-1.0)
    prof = profile_prefill(m, points=((2, 16), (1, 8)), iters=2, repeats=1)
    assert [(r["batch"], r["prompt"]) for r in prof] == [(2, 16), (1, 8)]
    assert all(r["ms"] > 0 and r["ms_decode"] > 0 for r in prof)


def test_host_seq_us_by_hand_fit_and_engine_profile():
    """host_seq_us: the engine's host time per sequence of a step (decode or prefill), core share
    included; fit_host_seq: the slope of (step - forward) over the batch; the profile times a real
    engine's decode steps and the forward inside them."""
    from ryzlab.projection.engine_profiles import fit_host_seq, profile_engine_overhead

    m, _ = load_shape("reference")
    dev, dep = hardware.get_device("cpu"), Deployment(weights="fp32")
    cal = default_calibration("cpu")
    per = cal.replace(host_seq_us=100.0)
    for shape, n in ((StepShape.decode(3, 40), 3), (StepShape.prefill(16, 0, seqs=2) + StepShape.decode(1, 9), 3)):
        assert step_cost(m, dev, per, dep, shape).overhead_ms == pytest.approx(
            step_cost(m, dev, cal, dep, shape).overhead_ms + n * 0.1, rel=1e-9)
    rows = [{"batch": 1, "overhead_ms": 0.10}, {"batch": 4, "overhead_ms": 0.16}, {"batch": 16, "overhead_ms": 0.40}]
    assert fit_host_seq(rows) == pytest.approx(20.0)   # 0.02 ms a sequence
    assert fit_host_seq([{"batch": 1, "overhead_ms": 0.3}, {"batch": 8, "overhead_ms": 0.1}]) == 0.0
    with pytest.raises(ValueError, match="two or more batch"):
        fit_host_seq(rows[:1])
    for bad in (-1.0, math.nan, math.inf):   # a hostile calibration file: refused, not priced
        with pytest.raises(ValueError, match="host_seq_us must be a finite number >= 0"):
            cal.replace(host_seq_us=bad)
        with pytest.raises(ValueError, match="host_ms must be a finite number >= 0"):
            cal.replace(host_ms=bad)
    small = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    prof = profile_engine_overhead(small, batches=(1, 3), prompt=8, steps=4, repeats=1)
    assert [r["batch"] for r in prof] == [1, 3]
    assert all(r["step_ms"] >= r["forward_ms"] > 0 for r in prof)
    for bad in ({"steps": 1}, {"batches": (0, 2)}):   # refused before an engine is built
        with pytest.raises(ValueError, match="steps >= 2"):
            profile_engine_overhead(small, **bad)


def test_serving_projection_step_noise():
    """host_jitter_cv = 0: the clock is the step costs alone, whatever the seed; > 0: each step's
    time drawn around its cost (mean 1, the given lag-1 correlation of its log), fixed by the seed."""
    from ryzlab.projection.serving import ServingLoad, _StepNoise, simulate

    m, _ = load_shape("reference")
    dev, dep = hardware.get_device("cpu"), Deployment(weights="fp32")
    load = ServingLoad(rate=20.0, num_requests=12, prompt_tokens=32, output_tokens=8)
    steady = default_calibration("cpu")
    assert simulate(m, dev, steady, dep, load, jitter_seed=1) == simulate(m, dev, steady, dep, load, jitter_seed=2)
    noisy = steady.replace(host_jitter_cv=0.3, host_jitter_corr=0.8)
    a, b = (simulate(m, dev, noisy, dep, load, jitter_seed=j) for j in (1, 2))
    assert a == simulate(m, dev, noisy, dep, load, jitter_seed=1) and a != b
    assert a["num_requests"] == b["num_requests"] == 12
    n = _StepNoise(0.3, 0.8, seed=0)
    f = [n.next() for _ in range(20000)]
    assert statistics.fmean(f) == pytest.approx(1.0, abs=0.03)
    logs = [math.log(v) for v in f]
    mu = statistics.fmean(logs)
    d = [v - mu for v in logs]
    assert statistics.pstdev(logs) == pytest.approx(0.3, rel=0.1)
    assert sum(x * y for x, y in zip(d, d[1:])) / sum(x * x for x in d) == pytest.approx(0.8, abs=0.03)
    assert _StepNoise(0.0, 0.5, seed=0).next() == 1.0



def test_host_drift_noise_and_fit_by_hand():
    """host_drift_cv / host_drift_ms: a slow factor in wall time (mean 1, the given spread of its log,
    autocorrelation exp(-t / host_drift_ms), idle time included); fit_host_drift reads the spread of
    block means beyond the step-to-step noise and the correlation time from the block means' lag-1
    autocorrelation; the calibration refuses a drift with no correlation time."""
    from ryzlab.projection.engine_profiles import fit_host_drift
    from ryzlab.projection.serving import ServingLoad, _StepNoise, simulate

    n = _StepNoise(0.0, 0.0, seed=0, drift_cv=0.2, drift_ms=50.0)
    f = [n.next(t * 10.0) for t in range(40000)]   # a step every 10 ms: lag-1 correlation exp(-10 / 50)
    logs = [math.log(v) for v in f]
    mu = statistics.fmean(logs)
    d = [v - mu for v in logs]
    assert statistics.fmean(f) == pytest.approx(1.0, abs=0.02)
    assert statistics.pstdev(logs) == pytest.approx(0.2, rel=0.1)
    assert sum(x * y for x, y in zip(d, d[1:])) / sum(x * x for x in d) == pytest.approx(math.exp(-0.2), abs=0.03)
    # no time passed: the drift does not move (only the step-to-step part would)
    n = _StepNoise(0.0, 0.0, seed=1, drift_cv=0.2, drift_ms=50.0)
    assert len({n.next(5.0) for _ in range(5)}) == 1
    # a long idle gap decorrelates it
    a = _StepNoise(0.0, 0.0, seed=2, drift_cv=0.2, drift_ms=50.0)
    b = _StepNoise(0.0, 0.0, seed=2, drift_cv=0.2, drift_ms=50.0)
    assert a.next(0.0) == b.next(0.0) and a.next(1.0) != b.next(1e6)

    # by hand: blocks of 2 steps, logs (0, 0), (1, 1), (0, 0), ...: no within-block noise; block means
    # alternate 0 / 1 over 8 blocks -> variance 2/7, lag-1 autocorrelation -1 (clipped to 0.01);
    # a block lasts 2 x the median step (median of 1 and e)
    e = math.e
    cv, ms = fit_host_drift([1.0, 1.0, e, e] * 4, block=2)
    assert cv == pytest.approx(math.sqrt(2 / 7))
    assert ms == pytest.approx(-2 * (1 + e) / 2 / math.log(0.01))
    # constant: no drift; slow steps in runs of blocks: positive correlation, longer time
    assert fit_host_drift([2.0] * 128)[0] == 0.0
    slow = ([1.0] * 32 + [e] * 32) * 2
    cv, ms = fit_host_drift(slow, block=8)
    assert cv > 0.4 and ms > 8 * 1.0
    with pytest.raises(ValueError, match="at least 8 blocks"):
        fit_host_drift([1.0] * 100)
    with pytest.raises(ValueError, match="positive and finite"):
        fit_host_drift([1.0] * 200 + [math.nan])
    with pytest.raises(ValueError, match="host_drift_ms"):
        default_calibration("cpu").replace(host_drift_cv=0.1)
    for bad in ({"host_drift_cv": -0.1, "host_drift_ms": 10.0}, {"host_drift_ms": math.inf}):
        with pytest.raises(ValueError, match="host_drift"):
            default_calibration("cpu").replace(**bad)
    assert default_calibration("h100-sxm").host_drift_cv == 0.0
    # in the serving clock: fixed by the seed, and a slower tail than the steady clock
    m, _ = load_shape("reference")
    dev, dep = hardware.get_device("cpu"), Deployment(weights="fp32")
    load = ServingLoad(rate=20.0, num_requests=40, prompt_tokens=32, output_tokens=8)
    steady = default_calibration("cpu")
    drift = steady.replace(host_drift_cv=0.4, host_drift_ms=200.0)
    a = simulate(m, dev, drift, dep, load, jitter_seed=3)
    assert a == simulate(m, dev, drift, dep, load, jitter_seed=3) != simulate(m, dev, drift, dep, load, jitter_seed=4)
    s = simulate(m, dev, steady, dep, load)
    assert a["tpot_ms_p99"] / a["tpot_ms_p50"] > s["tpot_ms_p99"] / s["tpot_ms_p50"]

def test_host_wake_clock_and_fit_by_hand():
    """host_wake_ms / host_warm_ms / host_cool_ms: a step starting cold costs host_wake_ms more, the
    coldness decays over busy time and comes back over idle time; fit_host_wake recovers the three
    numbers from profile rows made by that rule; the serving clock charges a trickle of requests
    more per request than a busy engine."""
    from ryzlab.projection.engine_profiles import _wake_extra, fit_host_wake, profile_host_wake
    from ryzlab.projection.serving import ServingLoad, _HostWake, simulate

    w = _HostWake(2.0, 4.0, 0.0)
    assert w.step(0.0, 1.0) == pytest.approx(3.0)   # cold at the start: the full 2 ms
    assert w.step(3.0, 1.0) == pytest.approx(1.0 + 2.0 * math.exp(-3.0 / 4.0))   # back to back: warmer
    assert w.step(100.0, 1.0) == pytest.approx(3.0)   # any idle with host_cool_ms 0: cold again
    w = _HostWake(2.0, 4.0, 10.0)
    w.step(0.0, 1.0)
    h = math.exp(-3.0 / 4.0)
    assert w.step(13.0, 1.0) == pytest.approx(1.0 + 2.0 * (1 - (1 - h) * math.exp(-1.0)))   # 10 ms idle
    assert _HostWake(0.0, 0.0, 0.0).step(5.0, 1.25) == 1.25
    assert _wake_extra(2.0, 4.0, 10.0, 10.0, 3.0) == pytest.approx(2.0 * (1 - math.exp(-1.0)) * math.exp(-0.75))
    assert _wake_extra(2.0, 4.0, 10.0, 0.0, 0.0) == 0.0

    # profile rows made by the rule (a 6 ms prefill, then 2 ms decode steps, warm) -> the rule back
    base = [6.0] + [2.0] * 12
    rows = []
    for g in (0.0, 2.0, 5.0, 10.0, 30.0, 100.0, 300.0):
        busy = 0.0
        for k, b in enumerate(base):
            ms = b + _wake_extra(1.5, 5.0, 4.0, g, busy)
            rows.append({"gap_ms": g, "step": k, "ms": ms})
            busy += ms
    wake, warm, cool = fit_host_wake(rows)
    assert (wake, warm, cool) == pytest.approx((1.5, 5.0, 4.0), rel=0.05)
    with pytest.raises(ValueError, match="gap-0"):
        fit_host_wake([r for r in rows if r["gap_ms"] > 0])
    with pytest.raises(ValueError, match="two or more positive gaps"):
        fit_host_wake([r for r in rows if r["gap_ms"] in (0.0, 10.0)])
    with pytest.raises(ValueError, match="positive and finite"):
        fit_host_wake(rows[:-1] + [{**rows[-1], "ms": math.nan}])
    with pytest.raises(ValueError, match="steps"):
        fit_host_wake(rows[:-1])
    with pytest.raises(ValueError, match="host_warm_ms"):
        default_calibration("cpu").replace(host_wake_ms=1.0)
    for bad in ({"host_wake_ms": -1.0, "host_warm_ms": 5.0}, {"host_cool_ms": math.inf}):
        with pytest.raises(ValueError, match="host_"):
            default_calibration("cpu").replace(**bad)
    assert default_calibration("h100-sxm").host_wake_ms == 0.0

    # the serving clock: the wake-up costs a request arriving at an idle engine more than one in a busy
    # engine (a closed loop keeps it warm)
    m, _ = load_shape("reference")
    dev, dep = hardware.get_device("cpu"), Deployment(weights="fp32")
    cal = default_calibration("cpu")
    waking = cal.replace(host_wake_ms=1.5, host_warm_ms=5.0, host_cool_ms=4.0)
    trickle = ServingLoad(rate=2.0, num_requests=20, prompt_tokens=32, output_tokens=8)
    busy = ServingLoad(concurrency=8, num_requests=40, prompt_tokens=32, output_tokens=8)

    def extra(load):
        a, b = simulate(m, dev, waking, dep, load), simulate(m, dev, cal, dep, load)
        return a["e2el_ms_mean"] - b["e2el_ms_mean"], a["ttft_ms_p50"] - b["ttft_ms_p50"]

    lone, crowd = extra(trickle), extra(busy)
    assert lone[1] == pytest.approx(1.5, rel=0.01)   # a lone prompt's step starts fully cold
    assert lone[0] > 1.5 and crowd[0] < 0.5 * lone[0]

    with pytest.raises(ValueError, match="gaps_ms"):
        profile_host_wake(m, gaps_ms=(1.0, 2.0))
    prof = profile_host_wake(m, gaps_ms=(0.0, 1.0), repeats=1, decode_steps=2, prompt=8)
    assert [(r["gap_ms"], r["step"]) for r in prof] == [(0.0, 0), (0.0, 1), (0.0, 2), (1.0, 0), (1.0, 1), (1.0, 2)]
    assert all(r["ms"] > 0 for r in prof)


def test_project_row_fields_and_labels():
    m, _ = load_shape("llama-3-8b")
    dev = hardware.get_device("h100-sxm")
    cal = default_calibration("h100-sxm")
    r = project_row(m, "llama-3-8b", dev, cal, Deployment(tp=2), Workload(batch=8))
    assert list(r)[:len(ROW_FIELDS)] == list(ROW_FIELDS)
    assert r["basis"] == "projected" and r["calibration"] == "gpu-default" and "h100-sxm" in r["device_spec"]
    assert r["throughput_tokens_per_s"] == pytest.approx(8 * r["decode_tokens_per_s"])
    assert r["max_batch"] == r["kv_capacity_tokens"] // 640
    with pytest.raises(ValueError, match="not both"):
        Workload(rate=1.0, concurrency=2)


def test_cli_project_json_and_table(capsys):
    from ryzlab.cli import main

    assert main(["project", "--model", "llama-3-8b", "--device", "h100-sxm", "--tp", "1,2", "--batch", "4",
                 "--weights", "int8", "--codec", "fp8_e4m3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tp"] for r in rows] == [1, 2]
    for r in rows:
        assert set(ROW_FIELDS) <= set(r) and r["basis"] == "projected" and r["weights"] == "int8"
    assert rows[1]["memory_gb_per_device"] < rows[0]["memory_gb_per_device"]
    assert main(["project", "--model", "llama-2-7b", "--device", "a100-80gb", "--hbm-gbps", "1700"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PROJECTED (not measured)") and "hbm_gbps=1700" in out


def test_cli_refuses_bad_input_with_choices(capsys):
    from ryzlab.cli import main

    assert main(["project", "--model", "llama-3-8b", "--device", "h100", "--tp", "1"]) == 2
    assert "valid devices: h100-sxm, h100-pcie, h200" in capsys.readouterr().err
    assert main(["project", "--model", "qwen2-7b", "--device", "h100-sxm", "--tp", "1,8"]) == 2
    assert "valid tp sizes: [1, 2, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["project", "--model", "llama-3-8b", "--device", "h100-sxm", "--weights", "int3"])
    assert "bf16" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3-8b", "--devices", "h100-sxm", "--rate", "10", "--slo-ttft-ms", "500",
                 "--slo-tpot-ms", "50", "--max-kl", "0.01"]) == 2
    assert "--kl-results" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3-8b", "--devices", "h100-sxm", "--rate", "10", "--slo-ttft-ms", "500",
                 "--slo-tpot-ms", "50", "--weights", "int5"]) == 2
    assert "choose from fp32, bf16, int8, int4, fp8" in capsys.readouterr().err


def test_fp8_weights_by_hand_and_refused_without_fp8_tensor_cores(capsys):
    """fp8 (projection only): 1 byte a value + one float32 scale a tensor, GEMMs at the fp8 peak,
    the head kept bf16; a device without fp8 tensor cores refuses it before any work."""
    from ryzlab.cli import main
    from ryzlab.projection.cost import weights_problem

    assert matrix_bytes("fp8", 4, 64) == 256 + 4
    m = ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=256)
    params = 128 * 128 * 4 + 128 * 256 * 3
    T = 1000
    # compute-bound: the GEMMs at the fp8 peak (twice the toy's bf16 100 TFLOPS)
    fast = _dev(hbm_gbps=1e12, fp8_tflops=200.0)
    c = step_cost(m, fast, ZERO, Deployment(weights="fp8"), StepShape.prefill(T))
    assert c.gemm_ms == pytest.approx(2 * T * params / 200e12 * 1e3, rel=1e-9)
    # bandwidth-bound: a layer's weights at 1 byte a value (+ 7 scales), half of bf16's
    dev = _dev(fp8_tflops=200.0)
    f8, b16 = (step_cost(m, dev, ZERO, Deployment(weights=w), StepShape.decode(1, 8)) for w in ("fp8", "bf16"))
    assert f8.weight_bytes - weight_bytes(m, Deployment(weights="fp8"))["head"] == params + 7 * 4
    assert weight_bytes(m, Deployment(weights="fp8"))["head"] == weight_bytes(m, Deployment())["head"]   # bf16
    act_io = 2 * (4 * (128 + 128) + 2 * (256 + 128) + (128 + 256))   # bf16 inputs and outputs, 1 token
    assert f8.gemm_ms == pytest.approx((params + 7 * 4 + act_io) / 1000e9 * 1e3, rel=1e-9)
    assert b16.gemm_ms == pytest.approx((2 * params + act_io) / 1000e9 * 1e3, rel=1e-9)
    # refused where there are no fp8 tensor cores: the cost model, project and plan (plan skips a device
    # that cannot, and refuses when none of its devices can)
    assert weights_problem(_dev(), "bf16") is None and "fp8_tflops is null" in weights_problem(_dev(), "fp8")
    with pytest.raises(ValueError, match="no.*fp8|has none"):
        step_cost(m, _dev(), ZERO, Deployment(weights="fp8"), StepShape.decode(1, 8))
    assert main(["project", "--model", "llama-2-7b", "--device", "a100-80gb", "--weights", "fp8", "--json"]) == 2
    assert "a100-80gb has none" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--devices", "a100-80gb", "--rate", "1", "--slo-ttft-ms", "500",
                 "--slo-tpot-ms", "50", "--weights", "fp8"]) == 2
    assert "a100-80gb has none" in capsys.readouterr().err
    assert main(["project", "--model", "llama-2-7b", "--device", "h100-sxm", "--weights", "fp8", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["weights"] == "fp8" and row["basis"] == "projected"


def test_planner_ranks_by_devices_and_reads_measured_kl(tmp_path):
    from ryzlab.projection.planner import measured_kl, plan

    m, _ = load_shape("llama-3-8b")
    devs = [hardware.get_device("h100-sxm"), hardware.get_device("l4")]
    cals = {d.key: default_calibration(d.key) for d in devs}
    rows = plan(m, "llama-3-8b", devs, cals, slo_ttft_ms=1000, slo_tpot_ms=60, rate=4.0, prompt_tokens=256,
                output_tokens=32, weights=("int4",), num_requests=10, max_devices=2)
    assert rows and [r["devices"] for r in rows] == sorted(r["devices"] for r in rows)
    assert all(r["basis"] == "projected" and r["devices"] <= 2 and r["tpot_ms_p99"] <= 60 for r in rows)
    assert {r["device"] for r in rows} == {"h100-sxm", "l4"}
    run = tmp_path / "kv_compression-abc"
    run.mkdir()
    pd.DataFrame({"codec": ["int8", "int8", "int4"], "kl_per_token": [0.002, 0.003, 0.05],
                  "model": ["reference"] * 3, "model_name": ["ryzlab-reference"] * 3}).to_parquet(run / "metrics.parquet")
    assert measured_kl(tmp_path, "reference") == {"none": 0.0, "int8": 0.002, "int4": 0.05}
    with pytest.raises(ValueError, match="measured models"):
        measured_kl(tmp_path, "llama-3-8b")


def test_published_tables_name_their_setup_and_hold_out_most_rows():
    from ryzlab.projection.validation import error_summary, published_tables, validate_published

    tables = published_tables()
    assert len(tables) >= 3
    for t in tables.values():
        assert t["source"] and t["setup"] and t["rows"]
    rows = validate_published()
    assert sum(r["calibrate"] for r in rows) == 3 and len(rows) >= 20
    assert all(r["basis"] == "projected" and math.isfinite(r["error"]) for r in rows)
    assert error_summary(rows)["rows"] == len(rows) - 3


def test_median_rel_se_by_hand():
    from ryzlab.projection.validation import median_rel_se

    # logs 0 and 1: sd sqrt(1/2), over sqrt(2) runs -> 1/2, times the median's 1.2533
    assert median_rel_se([1.0, math.e]) == pytest.approx(0.62665)
    assert median_rel_se([3.0, 3.0, 3.0]) == 0.0
    # the standard error falls with more runs of the same spread
    assert median_rel_se([1.0, math.e] * 4) < median_rel_se([1.0, math.e])
    for bad in ([], [2.0], [0.0, 1.0], [-1.0, 1.0]):
        assert math.isnan(median_rel_se(bad))

def test_sensitivity_of_a_bandwidth_bound_decode():
    from ryzlab.projection.sensitivity import sensitivity

    m, _ = load_shape("llama-2-7b")
    e = sensitivity(m, hardware.get_device("a100-80gb"), ZERO, Deployment(), StepShape.decode(1, 8))
    assert e["hbm_gbps"] == pytest.approx(-1.0, abs=0.03) and e["bw_frac"] == pytest.approx(-1.0, abs=0.03)
    assert abs(e["bf16_tflops"]) < 0.01 and e["host_ms"] == 0.0 and e["link_gbps"] == 0.0


def test_projection_experiment_rows_are_labelled_projected_with_validation():
    from ryzlab.experiments import run_experiment

    df = run_experiment("projection", {"model": "llama-2-7b", "device": "a100-80gb", "tp": 2, "rates": [2.0],
                                       "num_requests": 10, "prompt_tokens": 128, "output_tokens": 16})
    assert set(df["series"]) == {"static", "serving", "sensitivity"}
    assert (df["basis"] == "projected").all() and (df["calibration"] == "gpu-default").all()
    assert df["validation_rows"].iloc[0] >= 20 and 0 < df["validation_median_abs_error"].iloc[0] < 1
    assert "gpt-fast" in df["validation_note"].iloc[0]
    # fp8: its own device's tables, named; refused in the spec on a device without fp8 tensor cores
    h = run_experiment("projection", {"model": "llama-2-7b", "device": "h100-sxm", "weights": "fp8", "batch": 2})
    assert "tensorrt-llm-h100" in h["validation_note"].iloc[0] and "fp8" in h["validation_note"].iloc[0]
    with pytest.raises(ValueError, match=r"a100-80gb has none \(fp8_tflops is null\).*; devices with them: h100-sxm"):
        run_experiment("projection", {"model": "llama-2-7b", "device": "a100-80gb", "weights": "fp8"})
    cpu = run_experiment("projection", {"model": "reference", "device": "cpu", "weights": "fp32", "batch": 2})
    assert cpu["validation_median_abs_error"].isna().all() and "--cpu" in cpu["validation_note"].iloc[0]


@pytest.mark.parametrize("args, words", [
    (["--hbm-gbps", "nan"], "finite number > 0"), (["--hbm-gbps", "1e400"], "finite number > 0"),
    (["--prompt-tokens", "99999999999"], "1 to 1048576 tokens"), (["--host-overhead-ms", "-1"], "finite number >= 0"),
    (["--rate", "inf"], "finite number > 0")])
def test_cli_refuses_non_finite_and_huge_numbers_before_any_work(capsys, args, words):
    """nan bandwidth printed NaN rows (invalid JSON); a 1e11-token prompt ran for minutes."""
    from ryzlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["project", "--model", "llama-3-8b", "--device", "h100-sxm", "--json", *args])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_attention_fraction_and_cp_merge_kernels_by_hand():
    """attn_frac scales only the attention's bandwidth; cp > 1 adds the merge's kernels per layer."""
    from ryzlab.projection.cost import CP_MERGE_KERNELS, KERNELS_PER_LAYER

    m, _ = load_shape("llama-2-7b")
    dev = hardware.get_device("a100-80gb")
    shape = StepShape.decode(8, 4096)
    full = step_cost(m, dev, ZERO, Deployment(), shape)
    half = step_cost(m, dev, ZERO.replace(attn_frac=0.5), Deployment(), shape)
    assert half.attention_ms == pytest.approx(2 * full.attention_ms, rel=1e-9)
    assert half.gemm_ms == full.gemm_ms and half.other_ms == full.other_ms
    k = ZERO.replace(kernel_us=10.0)
    one, two = (step_cost(m, dev, k, Deployment(cp=cp), shape).overhead_ms for cp in (1, 2))
    assert one == pytest.approx((m.n_layers * KERNELS_PER_LAYER + 4) * 10.0 / 1e3)
    assert two - one == pytest.approx(m.n_layers * (CP_MERGE_KERNELS + 1) * 10.0 / 1e3)   # merge + its all-gather
    # a calibration whose cp_attn_us holds the measured merge counts no merge kernels
    none = step_cost(m, dev, k.replace(cp_merge_kernels=0.0), Deployment(cp=2), shape).overhead_ms
    assert none - one == pytest.approx(m.n_layers * 1 * 10.0 / 1e3)
    with pytest.raises(ValueError, match="cp_merge_kernels"):
        ZERO.replace(cp_merge_kernels=-1.0)


def test_ranks_sharing_a_host_share_its_host_time_too():
    """On a shared host (cpu) with more ranks than cores, the per-step host time and kernel gaps
    stretch like compute does (each rank's Python gets a share of a core); on a GPU they do not."""
    from ryzlab.projection.cost import CP_MERGE_KERNELS, KERNELS_PER_LAYER

    m, _ = load_shape("reference")
    cpu = hardware.get_device("cpu", {"devices_per_node": 2})
    gpu = hardware.get_device("a100-80gb")
    cal = ZERO.replace(host_ms=1.0, kernel_us=10.0)
    shape = StepShape.decode(4, 512)
    for dev, stretched in ((cpu, True), (gpu, False)):
        two = step_cost(m, dev, cal, Deployment(tp=2), shape).overhead_ms
        four = step_cost(m, dev, cal, Deployment(tp=2, cp=2), shape).overhead_ms
        kernels = m.n_layers * (KERNELS_PER_LAYER + CP_MERGE_KERNELS) + 4 + m.n_layers * 3
        assert four == pytest.approx((2 if stretched else 1) * (1.0 + kernels * 10.0 / 1e3))
        assert two == pytest.approx(1.0 + (m.n_layers * KERNELS_PER_LAYER + 4 + 2 * m.n_layers) * 10.0 / 1e3)


def test_rank_skew_and_log_sum_exp_cost_by_hand():
    """coll_skew_frac adds that share of a layer's work to its collectives (only with collectives);
    attn_lse_cost multiplies a cp rank's attention (only under cp); gemm_ms is step_cost's GEMM part."""
    from ryzlab.projection.cost import gemm_ms

    m, _ = load_shape("llama-2-7b")
    dev = hardware.get_device("a100-80gb")
    shape = StepShape.decode(8, 4096)
    for tp, cp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        dep = Deployment(tp=tp, cp=cp)
        base = step_cost(m, dev, ZERO, dep, shape)
        skew = step_cost(m, dev, ZERO.replace(coll_skew_frac=0.25), dep, shape)
        work = base.gemm_ms + base.attention_ms + base.parts["elementwise_ms"]
        assert skew.comm_ms - base.comm_ms == pytest.approx(0.25 * work if tp * cp > 1 else 0.0, rel=1e-9)
        lse = step_cost(m, dev, ZERO.replace(attn_lse_cost=1.5), dep, shape)
        assert lse.attention_ms == pytest.approx(base.attention_ms * (1.5 if cp > 1 else 1.0), rel=1e-9)
        assert lse.gemm_ms == base.gemm_ms
        fixed = step_cost(m, dev, ZERO.replace(cp_attn_us=250.0), dep, shape)   # a GPU: no shared host
        assert fixed.attention_ms - base.attention_ms == pytest.approx(m.n_layers * 0.25 if cp > 1 else 0.0, rel=1e-9)
    one = step_cost(m, dev, ZERO, Deployment(), StepShape.decode(4, 16))
    assert gemm_ms(m, dev, ZERO, Deployment(), 4) == pytest.approx(one.gemm_ms, rel=1e-12)
    with pytest.raises(ValueError, match="attn_lse_cost"):
        ZERO.replace(attn_lse_cost=0.9)
    with pytest.raises(ValueError, match="coll_skew_frac"):
        ZERO.replace(coll_skew_frac=-0.1)
    with pytest.raises(ValueError, match="cp_attn_us"):
        ZERO.replace(cp_attn_us=-1.0)


def test_gemm_row_efficiency_table_by_hand(tmp_path):
    """gemm_row_eff: the roofline's GEMM time over a measured efficiency by rows, linear in
    log(rows) between points and flat past the ends; fit_gemm_row_eff gives a profile back exactly;
    a calibration file's lists become the table, and bad tables are refused."""
    from ryzlab.projection.cost import gemm_ms, row_efficiency
    from ryzlab.projection.validation import fit_gemm_row_eff

    table = ((1, 0.5), (4, 1.0))
    assert row_efficiency((), 7) == 1.0
    assert [row_efficiency(table, r) for r in (1, 2, 4, 64)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    m, _ = load_shape("reference")
    dev = hardware.get_device("a100-80gb")
    dep = Deployment(weights="fp32")
    cal = ZERO.replace(gemm_row_eff=table)
    for rows in (1, 2, 4, 16):
        assert gemm_ms(m, dev, cal, dep, rows) == pytest.approx(gemm_ms(m, dev, ZERO, dep, rows)
                                                                / row_efficiency(table, rows), rel=1e-12)
        assert step_cost(m, dev, cal, dep, StepShape.decode(rows, 64)).gemm_ms == pytest.approx(
            gemm_ms(m, dev, cal, dep, rows), rel=1e-12)
    prof = [{"batch": 1, "ms": 0.26}, {"batch": 4, "ms": 0.61}, {"batch": 16, "ms": 1.5}]
    fitted = ZERO.replace(gemm_row_eff=fit_gemm_row_eff(prof, m, dev, ZERO, dep))
    assert [gemm_ms(m, dev, fitted, dep, p["batch"]) for p in prof] == pytest.approx([0.26, 0.61, 1.5], rel=1e-9)
    # a calibration file: JSON lists in any order -> the sorted table, and back
    c = Calibration(name="t", gemm_row_eff=[[4, 1.0], [1, 0.5]])
    assert c.gemm_row_eff == table
    assert load_calibration(save_calibration(c, tmp_path / "c.json")).gemm_row_eff == table
    for bad in ([[0, 1.0]], [[1, -1.0]], [[1, math.nan]], [[1, 0.5], [1, 0.6]], "abc", [[1, 0.5, 3]]):
        with pytest.raises(ValueError, match="gemm_row_eff"):
            Calibration(name="t", gemm_row_eff=bad)
    with pytest.raises(ValueError, match="positive, finite"):
        fit_gemm_row_eff([{"batch": 1, "ms": 0.0}], m, dev, ZERO)


def test_cp_attention_fit_recovers_a_line_and_keeps_its_bounds():
    """fit_cp_attention: ms_cp = a * ms + b (ms) gives (a, b in us) exactly; a never below 1, b never below 0."""
    from ryzlab.projection.validation import fit_cp_attention

    rows = [{"ms": x, "ms_cp": 1.4 * x + 0.108} for x in (0.16, 0.76, 0.37, 0.25)]
    lse, us = fit_cp_attention(rows)
    assert lse == pytest.approx(1.4, rel=1e-9) and us == pytest.approx(108.0, rel=1e-9)
    assert fit_cp_attention([{"ms": x, "ms_cp": 0.5 * x + 0.2} for x in (0.1, 0.3)]) == pytest.approx((1.0, 100.0))
    assert fit_cp_attention([{"ms": x, "ms_cp": 2.0 * x - 0.05} for x in (0.1, 0.3)]) == pytest.approx((2.0, 0.0))
    assert fit_cp_attention([{"ms": 0.2, "ms_cp": 0.5}]) == pytest.approx((1.0, 300.0))   # one row: a multiple 1
    with pytest.raises(ValueError, match="at least one"):
        fit_cp_attention([])


def _layouts_with_and_without(cal: Calibration, **change):
    """(on the 2-core cpu?, tp, cp, step cost under ``cal``, under ``cal`` with ``change``) for one
    reference-model decode step, on a 2-core cpu and on an A100, at tp / cp 1 and 2."""
    m, _ = load_shape("reference")
    shape = StepShape.decode(4, 512)
    for dev, on_cpu in ((hardware.get_device("cpu", {"devices_per_node": 2}), True),
                        (hardware.get_device("a100-80gb"), False)):
        for tp, cp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            dep = Deployment(tp=tp, cp=cp)
            yield on_cpu, tp, cp, step_cost(m, dev, cal, dep, shape), step_cost(m, dev, cal.replace(**change), dep, shape)


def test_cp_step_planning_is_host_time_of_cp_steps_only():
    """cp_step_us adds to a cp step's host time (stretched like it on a shared host), never to tp or one rank."""
    for on_cpu, tp, cp, base, plan in _layouts_with_and_without(ZERO, cp_step_us=200.0):
        share = 2.0 if on_cpu and tp * cp > 2 else 1.0
        assert plan.overhead_ms - base.overhead_ms == pytest.approx(share * 0.2 if cp > 1 else 0.0, rel=1e-9)
        assert plan.total_ms - base.total_ms == pytest.approx(plan.overhead_ms - base.overhead_ms, rel=1e-9)
    with pytest.raises(ValueError, match="cp_step_us"):
        ZERO.replace(cp_step_us=-1.0)


def test_corun_factor_slows_a_shared_hosts_multi_rank_compute_only():
    """corun_factor divides a shared host's bandwidth and peak for replicas of several ranks (GEMMs,
    attention, elementwise, logits: all the streams); one rank, a GPU and the host time are untouched."""
    cal = ZERO.replace(host_ms=1.0, kernel_us=10.0)
    for on_cpu, tp, cp, base, slow in _layouts_with_and_without(cal, corun_factor=1.5):
        f = 1.5 if on_cpu and tp * cp > 1 else 1.0
        assert slow.gemm_ms == pytest.approx(f * base.gemm_ms, rel=1e-9)
        assert slow.attention_ms == pytest.approx(f * base.attention_ms, rel=1e-9)
        assert slow.other_ms == pytest.approx(f * base.other_ms, rel=1e-9)
        assert slow.overhead_ms == pytest.approx(base.overhead_ms, rel=1e-9)
    for bad in (0.9, math.inf, math.nan):
        with pytest.raises(ValueError, match="corun_factor"):
            ZERO.replace(corun_factor=bad)


def test_cp_planning_fit_and_profile_rows():
    """fit_cp_planning: the median extra per step, never below 0; the profile plans real steps on
    one rank's cache and on cp rank 0's shard (rows for every point, both sides positive)."""
    from ryzlab.projection.validation import fit_cp_planning, profile_cp_planning

    assert fit_cp_planning([{"us": 50.0, "us_cp": 150.0}, {"us": 100.0, "us_cp": 130.0},
                            {"us": 10.0, "us_cp": 400.0}]) == pytest.approx(100.0)
    assert fit_cp_planning([{"us": 100.0, "us_cp": 90.0}]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        fit_cp_planning([])
    m, _ = load_shape("reference")
    rows = profile_cp_planning(m, points=((2, 40), (1, 17)), iters=2)
    assert [(r["batch"], r["context"]) for r in rows] == [(2, 40), (1, 17)]
    assert all(r["us"] > 0 and r["us_cp"] > 0 for r in rows)


def test_max_kl_without_results_measures_the_codecs_on_weights(capsys):
    """--max-kl with no --kl-results measures each codec's KL on the weights now (none is 0); a
    config-only model has none, and is refused before any work with the two ways out."""
    from ryzlab.cli import main
    from ryzlab.projection.planner import kl_model_problem, measure_kl

    kl = measure_kl("reference", ["none", "int8", "int2", "int8"], windows=2, progress=False)
    assert set(kl) == {"none", "int8", "int2"} and kl["none"] == 0.0
    assert 0 < kl["int8"] < kl["int2"]            # fewer bits, more error: measured, not assumed
    assert kl_model_problem("reference") is None
    for cfg_only in ("llama-3-8b", str(CONFIGS_DIR / "llama-3-8b")):
        why = kl_model_problem(cfg_only)
        assert why and "--kl-results" in why and "--kl-model" in why
    assert main(["plan", "--model", "llama-3-8b", "--kl-model", "llama-2-7b", "--devices", "h100-sxm", "--rate", "10",
                 "--slo-ttft-ms", "500", "--slo-tpot-ms", "50", "--max-kl", "0.01"]) == 2
    assert "'llama-2-7b' ships as config.json only" in capsys.readouterr().err


def test_layout_link_probe_by_hand(monkeypatch):
    """probe_gloo_link(layout=(2, 2)): one launch of four ranks per amount of work; the skew is the
    slope of collective time over work, the alpha terms at no work are divided by the core share
    (4 ranks / 2 cores) the cost model multiplies every collective by."""
    import ryzlab.orchestrator as orch
    import ryzlab.projection.validation as V

    dev = hardware.get_device("cpu")
    monkeypatch.setattr(V, "get_device", lambda key: dev.__class__(**{**dev.__dict__, "devices_per_node": 2,
                                                                      "hbm_gbps": 1e9}))
    launches = []

    def fake(fn, world_size, *, args, **kw):
        launches.append(world_size)
        small = args[4] == 4   # work_rows
        ar, ag, w = (500e-6, 400e-6, 100e-6) if small else (2500e-6, 2400e-6, 4100e-6)
        return [{"all_reduce": ar, "all_gather": ag, "work_all_reduce": w, "work_all_gather": w}] * world_size
    monkeypatch.setattr(orch, "launch", fake)
    r = V.probe_gloo_link(numel=1, iters=1, work_rows=(4, 64), cpu_comm="shm", layout=(2, 2))
    assert launches == [4, 4]
    assert r["coll_skew_frac"] == pytest.approx(0.5)
    # at no work: all-reduce 450 us, all-gather 350 us, / share 2 -> 225, 175: hop 50, base 125
    assert r["link_latency_us"] == pytest.approx(50.0, abs=1e-3) and r["coll_base_us"] == pytest.approx(125.0, abs=1e-3)
    assert r["layout"] == "tp2xcp2" and r["all_reduce_us"] == pytest.approx(500.0)


def test_operator_profiles_and_link_probe_return_what_the_fit_reads():
    """The one-rank operator profiles (GEMMs; one rank's decode attention and a cp rank's path on a
    real paged cache) the 2-rank link probe at two amounts of work and the host co-run probe give finite positive figures."""
    from ryzlab.projection.validation import probe_corun, probe_gloo_link, profile_cp_attention, profile_gemms

    m = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    g = profile_gemms(m, batches=(1, 8), iters=3)
    assert [r["batch"] for r in g] == [1, 8] and all(r["ms"] > 0 for r in g)
    a = profile_cp_attention(m, points=((2, 32), (3, 48)), iters=3)
    assert [(r["batch"], r["context"]) for r in a] == [(2, 32), (3, 48)]
    assert all(r["ms"] > 0 and r["ms_cp"] > 0 for r in a)
    for layout in ((1, 1), (2, 2)):   # 2-rank pairs; all four ranks of tp 2 x cp 2 at once
        link = probe_gloo_link(numel=64, iters=10, work_rows=(4, 64), layout=layout)
        for k in ("all_reduce_us", "all_gather_us", "link_latency_us", "coll_base_us", "coll_skew_frac", "work_us",
                  "work_busy_us"):
            assert math.isfinite(link[k]) and link[k] >= 0, k
        assert link["layout"] == ("pairs" if layout == (1, 1) else "tp2xcp2")
    for bad in ((2, 4), (4, 1), (0, 2)):   # refused before any rank starts
        with pytest.raises(ValueError, match=r"layout must be \(1, 1\).*\(2, 2\)"):
            probe_gloo_link(layout=bad)
    co = probe_corun(m, iters=2, rounds=2, tp=2)
    assert co["ranks"] == 2 and co["corun_factor"] >= 1.0 and co["alone_ms"] > 0 and co["corun_ms"] > 0
    with pytest.raises(ValueError, match="at least 2 ranks"):
        probe_corun(m, ranks=1)
