"""Health: NVML code paths against a fake NVML (only here, in tests/), host fallback, thresholds,
placement, the bounded sampler and the seed's DistributedOrchestrator API."""
import threading
import time
from types import SimpleNamespace

import pytest

from ryzlab.orchestrator.health import describe_health
from ryzlab.orchestrator import (DistributedOrchestrator, GPUHealthMonitor, GPUStats, Thresholds, classify,
                                 device_for_rank, device_score)


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Just enough of pynvml: per-device readings in dicts, unsupported readings raise."""

    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, devices):
        self.devices = devices  # list of dicts
        self.events = []  # (device index, xid)
        self.calls = 0
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def _get(self, h, key):
        self.calls += 1
        v = self.devices[h[1]].get(key)
        if v is None:
            raise FakeNVMLError("NVML_ERROR_NOT_SUPPORTED")
        return v

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._get(h, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        used, total = self._get(h, "mem")
        return SimpleNamespace(used=used * 2**20, total=total * 2**20, free=(total - used) * 2**20)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._get(h, "limit_mw")

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        return self._get(h, "ecc")[kind]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self._get(h, "throttle")

    def nvmlEventSetCreate(self):
        return "set"

    def nvmlDeviceRegisterEvents(self, h, types, es):
        assert types == self.nvmlEventTypeXidCriticalError

    def nvmlEventSetWait_v2(self, es, timeout_ms):
        assert timeout_ms == 0
        if not self.events:
            raise FakeNVMLError("NVML_ERROR_TIMEOUT")
        i, xid = self.events.pop(0)
        return SimpleNamespace(device=("handle", i), eventData=xid, eventType=8)

    def nvmlEventSetFree(self, es):
        pass


def _dev(**kw):
    base = dict(util=30, mem=(8000, 80000), temp=50, power_mw=200_000, limit_mw=700_000, ecc=(0, 0), throttle=0)
    base.update(kw)
    return base


def test_nvml_readings_and_classification():
    nvml = FakeNVML([_dev(), _dev(temp=85, throttle=0x40 | 0x1), _dev(ecc=(5, 2)), _dev(util=None, power_mw=None)])
    nvml.events.append((3, 79))  # XID 79: GPU fell off the bus
    mon = GPUHealthMonitor(nvml=nvml)
    assert mon.device_count == 4 and mon.source == "nvml"
    r = mon.sample()
    assert r[0].utilization_pct == 30 and r[0].memory_total_mb == 80000 and r[0].power_w == 200.0
    assert r[0].power_limit_w == 700.0 and r[0].source == "nvml" and r[0].name == "Fake H100"
    assert r[1].throttle_reasons == ["gpu_idle", "hw_thermal_slowdown"]
    assert r[2].ecc_corrected == 5 and r[2].ecc_uncorrected == 2
    assert r[3].utilization_pct is None and r[3].power_w is None  # unsupported stays None
    assert r[3].xid_events == [79] and r[0].xid_events == []
    assert mon.health(0).status == "healthy"
    h1 = mon.health(1)
    assert h1.status == "degraded" and any("85 C" in x for x in h1.reasons) and any("hw_thermal" in x for x in h1.reasons)
    assert mon.health(2).status == "unhealthy" and "2 uncorrected ECC" in mon.health(2).reasons[0]
    assert mon.health(3).status == "unhealthy" and "[79]" in mon.health(3).reasons[0]
    assert mon.get_healthy_devices() == [0, 1]
    assert mon.get_healthy_devices(include_degraded=False) == [0]
    assert mon.get_least_loaded_device() == 0
    df = mon.to_frame()
    assert list(df["status"]) == ["healthy", "degraded", "unhealthy", "unhealthy"]
    mon.close()
    assert nvml.shutdown


def test_thresholds_are_configurable_and_memory_full_is_unhealthy():
    s = GPUStats(utilization_pct=10, memory_used_mb=79_500, memory_total_mb=80_000, temperature_c=40)
    assert classify(s).status == "unhealthy"
    assert classify(s, Thresholds(memory_unhealthy_frac=1.0)).status == "degraded"
    assert classify(GPUStats(timestamp=time.time() - 100)).status == "unhealthy"  # stale
    assert classify(GPUStats(power_w=699, power_limit_w=700)).status == "degraded"


def test_host_fallback_is_labelled():
    class NoDriver:
        def nvmlInit(self):
            raise FakeNVMLError("NVML_ERROR_LIBRARY_NOT_FOUND")

    mon = GPUHealthMonitor(device_count=2, nvml=NoDriver())
    assert mon.source == "host"
    r = mon.sample()
    assert [x.source for x in r] == ["host", "host"] and r[0].name.startswith("host: ")
    assert r[0].memory_total_mb > 0 and r[0].power_w is None


class _RecordingEvent(threading.Event):
    """The sampler's stop event, recording how long each pause between samples was asked to be."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        if timeout is not None:
            self.waits.append(timeout)
        return super().wait(timeout)


def test_sampler_runs_in_background_with_bounded_cost():
    """Decided by events and by the pauses the sampler asks for, never by how many samples fit
    in a wall-clock window (issue 24: that failed on a loaded machine)."""
    from serving import wait_for

    nvml = FakeNVML([_dev(), _dev()])
    mon = GPUHealthMonitor(nvml=nvml)
    mon._stop = stop = _RecordingEvent()
    mon.start(interval_s=0.02, max_overhead=0.5)
    assert wait_for(lambda: mon.samples >= 3), "samples are taken in the background"
    thread = mon._thread
    mon.stop()
    assert not thread.is_alive()
    n = mon.samples
    assert stop.waits and all(w >= 0.02 for w in stop.waits), "it pauses at least interval_s between samples"
    assert mon.samples == n  # stopped means stopped (the thread is joined)
    # a slow read (100 ms) stretches the pause so sampling takes at most max_overhead of a core
    real = mon.sample

    def slow_sample():
        out = real()
        mon.sample_cost_s = 0.1
        return out

    mon.sample = slow_sample
    mon._stop = stop = _RecordingEvent()
    mon.start(interval_s=0.02, max_overhead=0.5)
    assert wait_for(lambda: len(stop.waits) >= 2)
    mon.stop()
    assert stop.waits[:2] == [pytest.approx(0.2), pytest.approx(0.2)]  # 0.1 s / 0.5
    with pytest.raises(ValueError):
        mon.start(interval_s=0)


def test_placement_skips_unhealthy_and_scores():
    assert [device_for_rank(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert device_for_rank(1, 4, unhealthy={1, 2}) == 3
    assert device_for_rank(5, 4, local_rank=2) == 2
    with pytest.raises(RuntimeError, match="no healthy device"):
        device_for_rank(0, 2, unhealthy={0, 1})
    busy = GPUStats(utilization_pct=90, memory_used_mb=10, memory_total_mb=100, temperature_c=60)
    idle = GPUStats(utilization_pct=5, memory_used_mb=10, memory_total_mb=100, temperature_c=60)
    assert device_score(idle) < device_score(busy)
    assert device_score(idle) == pytest.approx(0.5 * 0.05 + 0.3 * 0.1 + 0.2 * 60 / 90)


def test_seed_api_names_work():
    nvml = FakeNVML([_dev(util=80), _dev(util=10), _dev(ecc=(0, 1))])
    mon = GPUHealthMonitor(3, nvml=nvml)
    mon.sample()
    orch = DistributedOrchestrator(world_size=4, monitor=mon)
    assert orch.get_device_for_rank(2) == "cuda:0"  # device 2 is unhealthy -> next healthy, round-robin
    assert orch.get_device_for_rank(1) == "cuda:1"
    assert orch.get_optimal_device() == 1
    mon.update_stats(0, GPUStats(utilization_pct=1))
    assert mon.get_least_loaded_device() == 0
    for lat, ok in [(10.0, True), (30.0, True), (99.0, False)]:
        orch.update_performance_stats(latency=lat, success=ok)
    s = orch.get_performance_summary()
    assert s["requests"] == 3 and s["avg_latency"] == 20.0 and s["error_rate"] == pytest.approx(1 / 3)
    assert s["healthy_devices"] == [0, 1] and s["latency_ms_p50"] == 20.0
    with pytest.raises(ValueError, match="0..3"):
        orch.get_device_for_rank(4)
    with pytest.raises(ValueError, match="gloo"):
        DistributedOrchestrator(2, backend="mpi")


def test_describe_health_lines():
    nvml = FakeNVML([_dev(), _dev(ecc=(0, 3))])
    lines = describe_health(GPUHealthMonitor(nvml=nvml))
    assert len(lines) == 2 and lines[0].startswith("cuda:0 Fake H100: healthy; util 30%")
    assert "unhealthy (3 uncorrected ECC error(s))" in lines[1]


def test_the_score_lives_with_the_readings_and_placement_uses_it():
    """health does not import placement (the cycle's cause): the score of a reading is health's,
    placement decides with that same function."""
    import ast
    from pathlib import Path

    from ryzlab.orchestrator import health, placement

    assert placement.device_score is health.device_score is device_score
    tree = ast.parse(Path(health.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "ryzlab.orchestrator.placement" not in imported
