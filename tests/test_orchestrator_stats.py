"""Statistics against numpy: exact percentiles, reservoir bounds, rates, in-flight, export."""
import numpy as np
import pytest

from ryzlab.orchestrator.stats import LatencyStats, StatsCollector


def test_exact_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    xs = rng.lognormal(2, 1, 5000)
    s = LatencyStats()
    for x in xs:
        s.record(float(x))
    got = s.percentiles()
    for key, q in (("latency_ms_p50", 50), ("latency_ms_p90", 90), ("latency_ms_p99", 99), ("latency_ms_p99_9", 99.9)):
        assert got[key] == pytest.approx(np.percentile(xs, q), rel=1e-12)
    assert s.exact and s.mean_ms == pytest.approx(xs.mean())


def test_reservoir_is_bounded_and_unbiased():
    rng = np.random.default_rng(1)
    xs = rng.exponential(10, 50_000)
    s = LatencyStats(reservoir=4000, seed=2)
    for x in xs:
        s.record(float(x))
    assert len(s._samples) == 4000 and not s.exact
    got = s.percentiles()
    assert got["latency_ms_p50"] == pytest.approx(np.percentile(xs, 50), rel=0.06)
    assert got["latency_ms_p90"] == pytest.approx(np.percentile(xs, 90), rel=0.06)
    # the reservoir must hold samples from the whole stream, not just the first 4000
    assert got["latency_ms_p99"] == pytest.approx(np.percentile(xs, 99), rel=0.15)


def test_collector_errors_in_flight_and_frame():
    c = StatsCollector()
    for dev, lat, ok in [(0, 10.0, True), (0, 20.0, True), (1, 30.0, False), (1, 40.0, True)]:
        c.start(dev)
        assert c.in_flight() == 1
        c.finish(dev, lat, ok)
    c.start(1)
    df = c.to_frame(window_s=2.0)
    row = df.set_index("scope").loc["all"]
    assert row["requests"] == 4 and row["errors"] == 1 and row["error_rate"] == 0.25
    assert row["in_flight"] == 1 and row["throughput_rps"] == 2.0
    assert row["latency_ms_p50"] == pytest.approx(np.percentile([10, 20, 40], 50))
    assert df.set_index("scope").loc["1", "latency_ms_p50"] == 40.0
    with pytest.raises(ValueError, match="start"):
        c.finish(7, 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        LatencyStats(reservoir=0)


def test_one_percentile_helper_names_and_numbers():
    """ryzlab.analysis is the one helper: names p50/p90/p99 (p99_9), NaN when empty, numpy's values;
    the orchestrator's statistics and the load generator's serving metrics agree on the same samples."""
    from ryzlab.analysis import PERCENTILES, TAIL_PERCENTILES, percentile_name, percentiles, summary_columns
    from ryzlab.loadgen.metrics import _stats

    assert PERCENTILES == (50.0, 90.0, 99.0) and TAIL_PERCENTILES[:3] == PERCENTILES
    assert [percentile_name(q) for q in TAIL_PERCENTILES] == ["p50", "p90", "p99", "p99_9"]
    with pytest.raises(ValueError, match="percentile"):
        percentile_name(101)
    assert all(v != v for v in percentiles([]).values()) and list(percentiles([])) == ["p50", "p90", "p99"]
    xs = np.random.default_rng(4).lognormal(1, 1, 777)
    got = summary_columns("e2el_ms", xs, mean=True)
    assert list(got) == ["e2el_ms_mean", "e2el_ms_p50", "e2el_ms_p90", "e2el_ms_p99"]
    assert [got[f"e2el_ms_p{q}"] for q in (50, 90, 99)] == [np.percentile(xs, q) for q in (50, 90, 99)]
    s = LatencyStats()
    for x in xs:
        s.record(float(x))
    served = _stats("e2el", list(xs / 1000.0))
    for k in ("p50", "p90", "p99"):
        assert s.percentiles()[f"latency_ms_{k}"] == pytest.approx(served[f"e2el_ms_{k}"], rel=1e-12)
