"""Policies on synthetic loads, and the simulator that runs them (mode = simulated)."""
import collections

import numpy as np
import pytest

from ryzlab.orchestrator import POLICY_NAMES, Request, WorkerView, make_policy
from ryzlab.orchestrator.sim import SimConfig, simulate


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_policy("random")
    for name in POLICY_NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="prefix_affinity"):
        make_policy("round_robin", abs_threshold=3)


def test_round_robin_cycles_and_skips_unhealthy():
    ws = [WorkerView() for _ in range(4)]
    ws[2].healthy = False
    p = make_policy("round_robin")
    picks = [p.choose(Request(i), ws) for i in range(6)]
    assert picks == [0, 1, 3, 0, 1, 3]
    for w in ws:
        w.healthy = False
    assert p.choose(Request(9), ws) is None


def test_least_outstanding_picks_min_and_breaks_ties_fairly():
    ws = [WorkerView(outstanding=o) for o in (3, 1, 5, 1)]
    p = make_policy("least_outstanding", seed=1)
    counts = collections.Counter(p.choose(Request(i), ws) for i in range(400))
    assert set(counts) == {1, 3} and min(counts.values()) > 150
    ws[1].healthy = ws[3].healthy = False
    assert p.choose(Request(0), ws) == 0


def test_power_of_two_never_picks_the_max_of_its_pair():
    ws = [WorkerView(outstanding=o) for o in (0, 10, 20, 30)]
    p = make_policy("power_of_two", seed=3)
    counts = collections.Counter(p.choose(Request(i), ws) for i in range(600))
    assert 3 not in counts  # the busiest worker always loses its pair
    # worker 0 wins every pair it is in: P = 3/6 of pairs
    assert 0.4 < counts[0] / 600 < 0.6


def test_prefix_affinity_sticks_then_falls_back_past_threshold():
    ws = [WorkerView() for _ in range(3)]
    p = make_policy("prefix_affinity", abs_threshold=2, rel_threshold=1.5)
    first = p.choose(Request(0, prefix_key="sys"), ws)
    ws[first].outstanding = 2  # within the threshold: stay
    assert p.choose(Request(1, prefix_key="sys"), ws) == first
    ws[first].outstanding = 3  # 3 - 0 > 2 and 3 > 1.5 * 0: move to least loaded
    moved = p.choose(Request(2, prefix_key="sys"), ws)
    assert moved != first
    ws[first].outstanding = 0
    assert p.choose(Request(3, prefix_key="sys"), ws) == moved  # the prefix now lives there
    ws[moved].healthy = False
    assert p.choose(Request(4, prefix_key="sys"), ws) != moved
    assert p.hits == 2 and p.fallbacks == 1


def test_prefix_affinity_beats_least_outstanding_on_cache_hits_in_sim():
    rates = {}
    for name in ("least_outstanding", "prefix_affinity"):
        df, _ = simulate(SimConfig(policy=name, workers=4, load=0.7, num_requests=3000, prefixes=24,
                                   size_dist="exponential", prefix_cache_size=8))
        rates[name] = df["prefix_hit"].mean()
    assert rates["prefix_affinity"] > rates["least_outstanding"] + 0.2


def test_sim_known_result_jsq_and_p2_beat_round_robin_at_high_load():
    p99 = {}
    for name in ("round_robin", "least_outstanding", "power_of_two"):
        df, info = simulate(SimConfig(policy=name, workers=8, load=0.9, num_requests=8000, size_dist="bimodal"))
        assert info["completed"] == info["submitted"] == 8000
        assert info["mode"] == "simulated" and set(df["mode"]) == {"simulated"}
        p99[name] = np.percentile(df["e2el_ms"], 99)
    assert p99["least_outstanding"] <= 0.5 * p99["round_robin"]
    assert p99["power_of_two"] <= 0.6 * p99["round_robin"]


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_sim_fault_reroutes_and_loses_nothing(fault):
    df, info = simulate(SimConfig(policy="least_outstanding", workers=4, load=0.6, num_requests=2000,
                                  fault=fault, heartbeat_timeout_s=0.5, restart_s=0.3))
    assert info["completed"] == 2000 and df["request_id"].is_unique
    assert info["rerouted"] > 0 and (df["attempts"] > 1).sum() == info["rerouted"]
    expect = 0.05 if fault == "kill" else 0.5
    assert info["detect_t"] - info["fault_t"] == pytest.approx(expect)
    assert info["recover_t"] - info["detect_t"] == pytest.approx(0.3)


def test_sim_rejects_bad_input():
    with pytest.raises(ValueError, match="least_outstanding"):
        SimConfig(policy="jsq")
    with pytest.raises(ValueError, match="pause"):
        SimConfig(fault="crash")


def test_sim_and_live_configs_share_one_declaration_of_their_knobs():
    """Every knob a simulated and a live run share is declared once (RunConfig) under one name;
    the old names are gone."""
    import dataclasses

    from ryzlab.orchestrator import LiveConfig
    from ryzlab.orchestrator.run_config import RunConfig

    shared = {f.name for f in dataclasses.fields(SimConfig)} & {f.name for f in dataclasses.fields(LiveConfig)}
    assert shared == {f.name for f in dataclasses.fields(RunConfig)}
    assert {"num_requests", "mean_work_ms", "heartbeat_timeout_s", "fault_at"} <= shared
    assert issubclass(SimConfig, RunConfig) and issubclass(LiveConfig, RunConfig)
    for old in ("n_requests", "mean_service_ms"):
        with pytest.raises(TypeError, match=old):
            SimConfig(**{old: 10})
    with pytest.raises(ValueError, match="num_requests"):
        LiveConfig(num_requests=0)
