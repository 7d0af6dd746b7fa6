"""Device health: NVML readings (nvidia-ml-py), thresholds -> healthy/degraded/unhealthy + reasons.

With NVIDIA devices every reading comes from NVML: utilization, memory used/total,
temperature, power draw and limit, volatile ECC error counts, XID critical-error events
(an event set polled without blocking) and clock throttle/event reasons. Readings a driver
does not offer stay ``None`` and are never invented. Without an NVIDIA driver the monitor
reads the *host* through psutil (CPU utilization, RAM, CPU temperature when exposed) and every
such reading says ``source="host"``, so no table confuses a CPU with a GPU.

:class:`GPUHealthMonitor` keeps the latest reading and its classification per device, and
can sample in a background thread whose cost is bounded: after each sample it sleeps long
enough that sampling takes at most ``max_overhead`` of one core (and never less than
``interval_s``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["GPUStats", "Thresholds", "DeviceHealth", "HealthStatus", "GPUHealthMonitor", "classify", "device_score",
           "read_nvml_device", "read_host", "drain_xid_events", "describe_health", "THROTTLE_REASONS"]

log = logging.getLogger(__name__)

HealthStatus = Literal["healthy", "degraded", "unhealthy"]
Source = Literal["nvml", "host", "manual"]

# nvmlClocksThrottleReason* / nvmlClocksEventReason* bit values (stable across driver versions)
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}
DEGRADING_THROTTLES = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                                 "hw_power_brake_slowdown", "sw_power_cap"})
"""Reasons that mean the device runs slower than asked for (idle / app clocks are benign)."""


@dataclass
class GPUStats:
    """One reading of one device. ``None`` = the source does not offer that reading."""

    device_id: int = 0
    utilization_pct: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    xid_events: list[int] = field(default_factory=list)
    """XID codes of critical-error events seen since the previous reading."""
    throttle_reasons: list[str] = field(default_factory=list)
    source: Source = "manual"
    """``nvml`` (a GPU), ``host`` (CPU/RAM via psutil, no GPU here) or ``manual`` (update_stats)."""
    name: str = ""
    timestamp: float = field(default_factory=time.time)

    @property
    def memory_frac(self) -> float | None:
        if self.memory_used_mb is None or not self.memory_total_mb:
            return None
        return self.memory_used_mb / self.memory_total_mb


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Limits that classify a reading; every crossed limit adds a reason."""

    temp_degraded_c: float = 83.0
    """Around where datacenter GPUs begin thermal slowdown."""
    temp_unhealthy_c: float = 90.0
    memory_degraded_frac: float = 0.92
    memory_unhealthy_frac: float = 0.99
    """No headroom left: the next allocation (a KV block) fails."""
    utilization_degraded_pct: float = 98.0
    power_degraded_frac: float = 0.98
    """Drawing at the enforced limit means the power cap is what sets the clock."""
    max_uncorrected_ecc: int = 0
    """Any volatile uncorrectable ECC error: results from this device can no longer be trusted."""
    stale_after_s: float = 30.0


@dataclass(frozen=True)
class DeviceHealth:
    status: HealthStatus
    reasons: tuple[str, ...]


def classify(s: GPUStats, th: Thresholds = Thresholds(), now: float | None = None) -> DeviceHealth:
    """healthy / degraded / unhealthy, with one reason string per crossed threshold."""
    bad: list[str] = []
    warn: list[str] = []
    now = time.time() if now is None else now
    if now - s.timestamp > th.stale_after_s:
        bad.append(f"reading is {now - s.timestamp:.0f} s old (> {th.stale_after_s:g} s)")
    if s.temperature_c is not None:
        if s.temperature_c >= th.temp_unhealthy_c:
            bad.append(f"temperature {s.temperature_c:.0f} C >= {th.temp_unhealthy_c:g} C")
        elif s.temperature_c >= th.temp_degraded_c:
            warn.append(f"temperature {s.temperature_c:.0f} C >= {th.temp_degraded_c:g} C")
    if (frac := s.memory_frac) is not None:
        if frac >= th.memory_unhealthy_frac:
            bad.append(f"memory {frac:.1%} used >= {th.memory_unhealthy_frac:.0%}")
        elif frac >= th.memory_degraded_frac:
            warn.append(f"memory {frac:.1%} used >= {th.memory_degraded_frac:.0%}")
    if s.ecc_uncorrected is not None and s.ecc_uncorrected > th.max_uncorrected_ecc:
        bad.append(f"{s.ecc_uncorrected} uncorrected ECC error(s)")
    if s.xid_events:
        bad.append(f"XID critical error(s) {sorted(set(s.xid_events))}")
    if s.utilization_pct is not None and s.utilization_pct >= th.utilization_degraded_pct:
        warn.append(f"utilization {s.utilization_pct:.0f}% >= {th.utilization_degraded_pct:g}%")
    if s.power_w is not None and s.power_limit_w:
        if s.power_w >= th.power_degraded_frac * s.power_limit_w:
            warn.append(f"power {s.power_w:.0f} W at the {s.power_limit_w:.0f} W limit")
    slow = [r for r in s.throttle_reasons if r in DEGRADING_THROTTLES]
    if slow:
        warn.append(f"clocks throttled: {', '.join(slow)}")
    if bad:
        return DeviceHealth("unhealthy", tuple(bad + warn))
    return DeviceHealth("degraded", tuple(warn)) if warn else DeviceHealth("healthy", ())


W_UTIL, W_MEM, W_TEMP, DEGRADED_PENALTY, TEMP_SCALE_C = 0.5, 0.3, 0.2, 1.0, 90.0


def device_score(stats: GPUStats | None, health: DeviceHealth | None = None) -> float:
    """How loaded a device is, from one reading and its classification; lower is better, ``inf``
    for an unhealthy device::

        score = 0.5 * utilization + 0.3 * memory_used_fraction + 0.2 * temperature / 90 C
                + 1.0 if degraded

    Utilization weighs most because it is what a new request waits behind; memory next because a
    full device cannot take new KV blocks; temperature last, as an early sign of throttling.
    Missing readings count as 0 (a device with no reading yet is not penalised), and a degraded
    device always loses to a healthy one. Placement (:mod:`.placement`) decides with it.
    """
    if health is not None and health.status == "unhealthy":
        return float("inf")
    score = 0.0
    if stats is not None:
        score += W_UTIL * (stats.utilization_pct or 0.0) / 100.0
        score += W_MEM * (stats.memory_frac or 0.0)
        score += W_TEMP * (stats.temperature_c or 0.0) / TEMP_SCALE_C
    if health is not None and health.status == "degraded":
        score += DEGRADED_PENALTY
    return score


def _maybe(fn, *args) -> Any:
    """One NVML reading, or None when the device/driver does not support it."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - NVMLError_NotSupported and friends: reading unavailable
        log.debug("NVML reading %s unavailable: %s", getattr(fn, "__name__", fn), e)
        return None


def drain_xid_events(nvml: Any, event_set: Any, handles: list[Any]) -> dict[int, list[int]]:
    """XID codes waiting in ``event_set``, by device index (polled with a 0 ms wait: never blocks)."""
    out: dict[int, list[int]] = {}
    while event_set is not None:
        data = _maybe(nvml.nvmlEventSetWait_v2, event_set, 0)
        if data is None:  # NVML_ERROR_TIMEOUT: nothing pending
            break
        index = next((i for i, h in enumerate(handles) if h == data.device), -1)
        out.setdefault(index, []).append(int(data.eventData))
    return out


def read_nvml_device(nvml: Any, index: int, handle: Any, xids: list[int] | None = None) -> GPUStats:
    """Every reading NVML offers for one device (``nvml`` is the ``pynvml`` module)."""
    util = _maybe(nvml.nvmlDeviceGetUtilizationRates, handle)
    mem = _maybe(nvml.nvmlDeviceGetMemoryInfo, handle)
    temp = _maybe(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    power = _maybe(nvml.nvmlDeviceGetPowerUsage, handle)
    limit = _maybe(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    ecc_c = _maybe(nvml.nvmlDeviceGetTotalEccErrors, handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                   nvml.NVML_VOLATILE_ECC)
    ecc_u = _maybe(nvml.nvmlDeviceGetTotalEccErrors, handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                   nvml.NVML_VOLATILE_ECC)
    reasons_fn = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                  or getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons"))
    mask = _maybe(reasons_fn, handle) or 0
    name = _maybe(nvml.nvmlDeviceGetName, handle) or ""
    return GPUStats(
        device_id=index,
        utilization_pct=None if util is None else float(util.gpu),
        memory_used_mb=None if mem is None else mem.used / 2**20,
        memory_total_mb=None if mem is None else mem.total / 2**20,
        temperature_c=None if temp is None else float(temp),
        power_w=None if power is None else power / 1000.0,
        power_limit_w=None if limit is None else limit / 1000.0,
        ecc_corrected=ecc_c, ecc_uncorrected=ecc_u, xid_events=list(xids or []),
        throttle_reasons=[r for bit, r in THROTTLE_REASONS.items() if mask & bit],
        source="nvml", name=name.decode() if isinstance(name, bytes) else name)


_CPU_PRIMED = False


def read_host(device_id: int = 0) -> GPUStats:
    """Host CPU/RAM readings through psutil, labelled ``source="host"`` (there is no GPU)."""
    import psutil

    from ryzlab.provenance import cpu_model

    vm = psutil.virtual_memory()
    temp = None
    try:
        sensors = psutil.sensors_temperatures() or {}
        values = [t.current for entries in sensors.values() for t in entries if t.current]
        temp = max(values) if values else None
    except (AttributeError, OSError):
        pass
    global _CPU_PRIMED
    # psutil measures CPU use since its previous call; the very first call has no baseline
    util = psutil.cpu_percent(interval=None if _CPU_PRIMED else 0.1)
    _CPU_PRIMED = True
    return GPUStats(device_id=device_id, utilization_pct=util,
                    memory_used_mb=(vm.total - vm.available) / 2**20, memory_total_mb=vm.total / 2**20,
                    temperature_c=temp, source="host", name=f"host: {cpu_model()}")


class GPUHealthMonitor:
    """Latest reading + classification per device; optional bounded-cost background sampler.

    ``device_count=None`` asks NVML; without NVIDIA devices the monitor watches one device, the
    host (``source="host"``). ``nvml`` defaults to the real ``pynvml`` module (tests pass a
    fake). ``update_stats`` accepts readings from elsewhere (a remote rank, the seed API).
    """

    def __init__(self, device_count: int | None = None, *, thresholds: Thresholds = Thresholds(),
                 nvml: Any = None, history: int = 256):
        if device_count is not None and device_count < 1:
            raise ValueError(f"device_count must be >= 1 or None (detect), got {device_count}")
        self.thresholds = thresholds
        self._lock = threading.Lock()
        self._nvml = None
        self._handles: list[Any] = []
        self._event_set = None
        self._open_nvml(nvml)
        detected = len(self._handles)
        self.device_count = device_count or detected or 1
        if detected and device_count and device_count > detected:
            raise ValueError(f"device_count={device_count} but NVML sees {detected} device(s); "
                             f"valid: 1..{detected} or None")
        self.source: Source = "nvml" if detected else "host"
        self._latest: dict[int, GPUStats] = {}
        self._health: dict[int, DeviceHealth] = {}
        self.history: deque[GPUStats] = deque(maxlen=history)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.sample_cost_s = 0.0
        self.samples = 0

    def _open_nvml(self, nvml: Any) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return
        try:
            nvml.nvmlInit()
        except Exception as e:  # noqa: BLE001 - no driver / no device: host readings instead
            log.info("NVML unavailable (%s); health readings come from the host (psutil)", e)
            return
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        try:
            es = nvml.nvmlEventSetCreate()
            for h in self._handles:
                _maybe(nvml.nvmlDeviceRegisterEvents, h, nvml.nvmlEventTypeXidCriticalError, es)
            self._event_set = es
        except Exception as e:  # noqa: BLE001 - XID events are optional (not on every platform)
            log.info("NVML XID events unavailable: %s", e)

    # -- seed API -------------------------------------------------------------------------
    def update_stats(self, device_id: int, stats: GPUStats) -> DeviceHealth:
        if not 0 <= device_id < self.device_count:
            raise ValueError(f"device_id={device_id} out of range; valid: 0..{self.device_count - 1}")
        stats.device_id = device_id
        health = classify(stats, self.thresholds)
        with self._lock:
            self._latest[device_id] = stats
            self._health[device_id] = health
            self.history.append(stats)
        if health.status != "healthy":
            log.warning("device %d %s: %s", device_id, health.status, "; ".join(health.reasons))
        return health

    def get_healthy_devices(self, include_degraded: bool = True) -> list[int]:
        """Devices fit for work; devices never read are assumed healthy (nothing says otherwise)."""
        ok = ("healthy", "degraded") if include_degraded else ("healthy",)
        return [d for d in range(self.device_count) if self.health(d).status in ok]

    def get_least_loaded_device(self) -> int | None:
        """Healthy device with the lowest utilization (then memory use); None if none is fit."""
        cands = self.get_healthy_devices(include_degraded=False) or self.get_healthy_devices()
        if not cands:
            return None
        return min(cands, key=lambda d: (device_score(self._latest.get(d), self.health(d)), d))

    # -- readings -------------------------------------------------------------------------
    def health(self, device_id: int) -> DeviceHealth:
        with self._lock:
            h = self._health.get(device_id)
            s = self._latest.get(device_id)
        if s is not None and time.time() - s.timestamp > self.thresholds.stale_after_s:
            return classify(s, self.thresholds)
        return h or DeviceHealth("healthy", ())

    def latest(self, device_id: int) -> GPUStats | None:
        with self._lock:
            return self._latest.get(device_id)

    def sample(self) -> list[GPUStats]:
        """Read every device now (NVML, or the host for each device id) and classify."""
        t0 = time.perf_counter()
        if self._nvml is not None:
            xids = drain_xid_events(self._nvml, self._event_set, self._handles)
            readings = [read_nvml_device(self._nvml, i, h, xids.get(i))
                        for i, h in enumerate(self._handles[: self.device_count])]
        else:
            host = read_host()
            readings = [GPUStats(**{**host.__dict__, "device_id": d}) for d in range(self.device_count)]
        for r in readings:
            self.update_stats(r.device_id, r)
        self.sample_cost_s = time.perf_counter() - t0
        self.samples += 1
        return readings

    def start(self, interval_s: float = 1.0, max_overhead: float = 0.01) -> None:
        """Sample every ``interval_s`` in a daemon thread, stretched so sampling uses at most
        ``max_overhead`` of one core (a slow NVML call cannot eat the inference process)."""
        if interval_s <= 0 or not 0 < max_overhead <= 1:
            raise ValueError(f"need interval_s > 0 and 0 < max_overhead <= 1, got {interval_s}, {max_overhead}")
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.sample()
                except Exception:  # noqa: BLE001 - a failed read must not kill the sampler
                    log.exception("health sample failed")
                self._stop.wait(max(interval_s, self.sample_cost_s / max_overhead))

        self._thread = threading.Thread(target=loop, name="ryzlab-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._nvml is not None:
            if self._event_set is not None:
                _maybe(self._nvml.nvmlEventSetFree, self._event_set)
                self._event_set = None
            _maybe(self._nvml.nvmlShutdown)
            self._nvml = None

    def to_frame(self):
        """One row per device: its latest reading, status and reasons."""
        import pandas as pd

        rows = []
        for d in range(self.device_count):
            s, h = self.latest(d), self.health(d)
            rows.append({**(s.__dict__ if s else {"device_id": d, "source": self.source}),
                         "status": h.status, "reasons": "; ".join(h.reasons)})
        return pd.DataFrame(rows)


def describe_health(monitor: GPUHealthMonitor | None = None) -> list[str]:
    """One human-readable line per device from a fresh sample (``ryzlab info``)."""
    mon = monitor if monitor is not None else GPUHealthMonitor()
    try:
        lines = []
        for r in mon.sample():
            h = mon.health(r.device_id)
            where = f"cuda:{r.device_id} {r.name}" if r.source == "nvml" else f"{r.name} (source=host, no GPU)"
            parts = []
            if r.utilization_pct is not None:
                parts.append(f"util {r.utilization_pct:.0f}%")
            if r.memory_used_mb is not None and r.memory_total_mb:
                parts.append(f"mem {r.memory_used_mb / 1024:.1f}/{r.memory_total_mb / 1024:.1f} GiB")
            if r.temperature_c is not None:
                parts.append(f"{r.temperature_c:.0f} C")
            if r.power_w is not None:
                parts.append(f"{r.power_w:.0f}" + (f"/{r.power_limit_w:.0f}" if r.power_limit_w else "") + " W")
            if r.ecc_uncorrected is not None:
                parts.append(f"ECC {r.ecc_corrected or 0}/{r.ecc_uncorrected} (corr/uncorr)")
            status = h.status + (f" ({'; '.join(h.reasons)})" if h.reasons else "")
            lines.append(f"{where}: {status}; {', '.join(parts) or 'no readings'}")
            if r.source == "host":
                break  # the same host reading stands for every device id: print it once
        return lines
    finally:
        if monitor is None:
            mon.close()
