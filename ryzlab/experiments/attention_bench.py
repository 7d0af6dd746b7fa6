"""Decode attention baseline: time and KV bytes read by torch ``scaled_dot_product_attention``.

One decode step of one layer: a single new query token per sequence attends over ``context``
cached keys and values (GQA). Decode attention is memory-bound, so the figure of merit is the
achieved KV read bandwidth, compared with a copy bandwidth measured on the same device in the
same run. This is the baseline the compressed KV-cache experiments are compared with.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F

from ryzlab.provenance import cpu_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Config:
    context: int = 1024
    """Cached tokens per sequence."""
    batch: int = 1
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int = 2
    """KV heads (GQA: n_heads must be a multiple)."""
    head_dim: int = 64
    iters: int = 30
    """Timed decode steps (each one row of the output)."""
    warmup: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default). Pin to 1 to run points side by side fairly."""
    copy_mib: int = 64
    """Size of the buffer used to measure copy bandwidth (large enough to leave the caches)."""

    def __post_init__(self) -> None:
        for name in ("context", "batch", "n_heads", "n_kv_heads", "head_dim", "iters", "copy_mib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError("warmup and threads must be >= 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available; choose 'auto' or 'cpu'")


def _timer(device: torch.device):
    if device.type == "cuda":
        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        def sync() -> None:
            return None
    return sync


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` device copy bandwidth in bytes/s, counting read + write."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    sync = _timer(device)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def run(cfg: Config) -> pd.DataFrame:
    """One row per timed decode step: ``attn_us``, ``kv_bytes``, achieved and copy bandwidth."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(cfg.batch, cfg.n_heads, 1, cfg.head_dim, generator=gen).to(device, dtype)  # [B, Hq, 1, D]
    k = torch.randn(cfg.batch, cfg.n_kv_heads, cfg.context, cfg.head_dim, generator=gen).to(device, dtype)
    v = torch.randn_like(k)                                                                     # [B, Hkv, S, D]
    gqa = cfg.n_heads != cfg.n_kv_heads
    sync = _timer(device)

    def step() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    for _ in range(cfg.warmup):
        step()
    sync()
    times = []
    for _ in range(cfg.iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    copy_bps = copy_bandwidth(device, cfg.copy_mib)
    kv_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    med = statistics.median(times)
    return pd.DataFrame({
        "sample": range(len(times)),
        "attn_us": [t * 1e6 for t in times],
        "kv_bytes": kv_bytes,
        "kv_bytes_per_token": kv_bytes // (cfg.batch * cfg.context),
        "achieved_gbps": [kv_bytes / t / 1e9 for t in times],
        "median_attn_us": med * 1e6,
        "copy_gbps": copy_bps / 1e9,
        "frac_of_copy_bw": [kv_bytes / t / copy_bps for t in times],
        "kernel": "torch",  # SDPA over dense K/V; compressed pages: kv_compression / benchmarks/gpu_decode.py
        "device": device.type,
        "device_name": name,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
    })
