"""The hardware catalog: named devices (``devices.yaml``, every number with its source), user YAML
files that add or replace devices, and per-field overrides (``--hbm-gbps 1700``).

No torch here: the CLI lists the device names for its help and its error messages. The ``cpu``
entry is *measured* on this machine at first use (:func:`probe_cpu`); every other device is a
datasheet.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ryzlab.config import ConfigError

__all__ = ["Device", "CATALOG_FILE", "device_names", "load_catalog", "get_device", "probe_cpu", "OVERRIDABLE"]

log = logging.getLogger(__name__)

CATALOG_FILE = Path(__file__).with_name("devices.yaml")

OVERRIDABLE = ("memory_gb", "hbm_gbps", "bf16_tflops", "fp8_tflops", "int8_tops", "link_gbps", "link_latency_us",
               "devices_per_node", "net_gbps", "net_latency_us")
"""Fields a user may override per run; each is a command-line flag (``--hbm-gbps``)."""


@dataclass(frozen=True, kw_only=True)
class Device:
    """One accelerator (or this CPU) as the cost model sees it. Units in the field names."""

    key: str
    """Catalog name (``h100-sxm``)."""
    name: str
    """What the datasheet calls it."""
    memory_gb: float
    hbm_gbps: float
    """Memory bandwidth, GB/s (1e9 bytes/s)."""
    bf16_tflops: float
    """Dense bf16 matmul peak (on ``cpu``: float32, what ryzlab runs there)."""
    fp8_tflops: float | None
    int8_tops: float
    interconnect: str
    link_gbps: float
    """Scale-up link, GB/s one direction per device."""
    link_latency_us: float
    """Latency of one hop of a collective over the scale-up link."""
    devices_per_node: int
    """Devices that share the scale-up link; a group larger than this crosses the network."""
    net_gbps: float
    net_latency_us: float
    shared_host: bool = False
    """Ranks share one host's cores and memory (``cpu``): ranks beyond the cores slow each other."""
    sources: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, float] = field(default_factory=dict)
    """Fields the user overrode for this run (reported beside every projection)."""

    def spec(self) -> str:
        """One line naming the device and what was overridden: goes in every projected row."""
        extra = "".join(f", {k}={v:g}" for k, v in sorted(self.overrides.items()))
        return (f"{self.key} ({self.name}: {self.memory_gb:g} GB, {self.hbm_gbps:g} GB/s, "
                f"{self.bf16_tflops:g} TFLOPS bf16{f' / {self.fp8_tflops:g} fp8' if self.fp8_tflops else ''}, "
                f"{self.interconnect} {self.link_gbps:g} GB/s{extra})")


def _read(path: Path) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of device name -> fields (see {CATALOG_FILE})")
    return data


@functools.lru_cache(maxsize=None)
def _builtin() -> dict[str, dict[str, Any]]:
    return _read(CATALOG_FILE)


def load_catalog(extra: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The raw catalog: built-in devices, then ``extra`` (a YAML file of the same shape) on top.

    A device in ``extra`` with the name of a built-in one replaces the fields it gives (so a file
    holding ``h100-sxm: {hbm_gbps: 3000}`` retunes one number); a new name must give every field.
    """
    cat = {k: dict(v) for k, v in _builtin().items()}
    if extra is not None:
        path = Path(extra).expanduser()
        if not path.is_file():
            raise ValueError(f"devices file {path} does not exist")
        for k, v in _read(path).items():
            cat[k] = {**cat.get(k, {}), **v, "sources": {**cat.get(k, {}).get("sources", {}),
                                                       **{f: f"user file {path.name}" for f in v if f != "sources"},
                                                       **(v.get("sources") or {})}}
    return cat


def device_names(extra: str | os.PathLike | None = None) -> list[str]:
    return list(load_catalog(extra))


@functools.lru_cache(maxsize=1)
def probe_cpu() -> dict[str, float]:
    """Measure this CPU once per process: one-thread copy bandwidth and matmul rate, memory, cores.

    One thread because ryzlab's ranks run one torch thread each (the scaling experiment's default),
    so a rank's roof is one core's. Median of 5 repeats of each.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB: well past the caches
        b = torch.empty_like(a)
        copies, mms = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            copies.append(time.perf_counter() - t0)
        x = torch.randn(512, 512)
        for _ in range(5):
            t0 = time.perf_counter()
            x @ x
            mms.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    copy_s, mm_s = sorted(copies)[2], sorted(mms)[2]
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024 / 1e9
    except OSError:  # no /proc (not Linux): fall back to torch's view below
        pass
    tflops = 2 * 512**3 / mm_s / 1e12
    return {"memory_gb": mem or 8.0, "hbm_gbps": 2 * a.numel() * 4 / copy_s / 1e9, "bf16_tflops": tflops,
            "int8_tops": tflops, "devices_per_node": float(os.cpu_count() or 1)}


def get_device(name: str, overrides: dict[str, float | None] | None = None,
               extra: str | os.PathLike | None = None) -> Device:
    """The catalog's ``name`` with ``overrides`` (None values ignored) applied.

    Raises :class:`ConfigError` naming the valid devices for an unknown name, and the valid fields
    for an unknown override.
    """
    cat = load_catalog(extra)
    if name not in cat:
        raise ConfigError([f"device={name!r} is not in the catalog; valid devices: {', '.join(cat)} "
                           f"(add one with --devices-file FILE.yaml)"])
    ov = {k: float(v) for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(set(ov) - set(OVERRIDABLE))
    if bad:
        raise ConfigError([f"cannot override {bad}; overridable fields: {', '.join(OVERRIDABLE)}"])
    raw = dict(cat[name])
    measured = [k for k, v in raw.items() if v == "measured"]
    if measured:
        probe = probe_cpu()
        raw.update({k: probe[k] for k in measured if k in probe})
    raw.update(ov)
    fields = {f.name for f in dataclasses.fields(Device)} - {"key", "overrides"}
    unknown = sorted(set(raw) - fields)
    missing = sorted(f.name for f in dataclasses.fields(Device)
                     if f.name in fields and f.name not in raw and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
    if unknown or missing:
        raise ConfigError([p for p in (f"unknown fields {unknown}; valid: {sorted(fields)}" if unknown else "",
                                       f"missing fields {missing}" if missing else "") if p], where=f"device {name}")
    if bad := _bad_fields(raw):
        raise ConfigError(bad, where=f"device {name}")
    raw["devices_per_node"] = int(raw["devices_per_node"])
    return Device(key=name, overrides=ov, **raw)


_MAY_BE_NULL = ("fp8_tflops",)
"""Numeric fields a device may leave null (no fp8 tensor cores)."""
_MAY_BE_ZERO = ("link_latency_us", "net_latency_us")


def _bad_fields(raw: dict[str, Any]) -> list[str]:
    """What is wrong with a device's numeric fields (a user's YAML is input like any other): each
    must be a finite number, > 0 (a latency >= 0); ``fp8_tflops`` may be null; ``devices_per_node``
    a whole number >= 1."""
    out = []
    for f in OVERRIDABLE:
        v = raw.get(f)
        if v is None and f in _MAY_BE_NULL:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and (v < 0 or (v == 0 and f not in _MAY_BE_ZERO)):
            ok = False
        if ok and f == "devices_per_node" and v != int(v):
            ok = False
        if not ok:
            want = "a whole number >= 1" if f == "devices_per_node" else (
                "a finite number >= 0" if f in _MAY_BE_ZERO else "a finite number > 0")
            out.append(f"{f}={v!r}: expected {want}" + (" or null" if f in _MAY_BE_NULL else ""))
    for f in ("name", "interconnect"):
        if not isinstance(raw.get(f), str):
            out.append(f"{f}={raw.get(f)!r}: expected text")
    return out
