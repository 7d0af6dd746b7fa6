"""Distributed KV cache scaling: world_size x strategy x codec x context on real ranks.

One run launches ``world_size`` ranks (gloo CPU processes here; the same code at world_size 1),
fills a :class:`ryzlab.kv.sharded.ShardedKVCache` with ``batch`` sequences of ``context`` tokens
(random K/V, the same on every rank), then times ``decode_steps`` decode steps (every layer:
write the new token's K/V, attend one query per sequence). Tidy rows, one per timed step:

* ``step_ms`` / ``tpot_ms`` (decode step latency, slowest rank), ``tokens_per_s`` (batch / step);
* ``kv_bytes_per_rank`` (largest rank) and ``kv_bytes_total`` (all ranks: counts ``heads``
  replication when n_kv_heads < world_size, and ``replicated``'s full copies), ``kv_replication``
  (copies of each KV head across ranks), ``kv_bytes_per_token`` (total / cached tokens);
* ``comm_bytes_per_step`` and ``comm_bytes_per_layer``: bytes this rank handed to collectives,
  *measured* by :class:`ryzlab.kv.comm.Comm` at the call sites, with ``collectives_per_step``;
  ``comm_bytes_formula_per_layer`` from :func:`ryzlab.kv.layout.comm_bytes_formula` beside it;
  ``comm_wire_bytes_per_layer``: bytes the rank process wrote to its sockets during those calls
  (``/proc/self/io``; backend headers and ring forwarding included) vs ``comm_wire_formula_per_layer``;
* ``largest_context``: longest sequence whose KV fits ``budget_mib`` per rank (grown through
  the cache's own placement), and ``largest_context_ws1`` for the same cache at one rank;
* ``device`` (``cpu`` under gloo, ``cuda`` under nccl: where the ranks' caches lived),
  ``device_name``, ``backend``.

Scaling efficiency vs world_size 1 needs the world_size 1 point of the same sweep:
:func:`scaling_efficiency` (used by the report) divides the measured speedup by world_size.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch

from ..config import Backend, CacheConfig, Codec, Granularity, ModelConfig, ParallelConfig, Strategy, from_dict
from ..kv.comm import Comm
from ..kv.layout import collectives_formula, comm_bytes_formula, head_layout, validate_layout, wire_bytes_formula
from ..kv.sharded import ShardedKVCache, largest_context
from ..orchestrator import launch
from ..provenance import cpu_model

__all__ = ["Config", "run", "make_config", "scaling_efficiency", "prefill", "decode_step"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config:
    world_size: int = 2
    """Ranks (CPU processes on gloo here; one per GPU where there are GPUs)."""
    strategy: Strategy = "sequence"
    """replicated, heads or sequence."""
    codec: Codec = "none"
    key_granularity: Granularity = "token_head"
    value_granularity: Granularity = "token_head"
    context: int = 1024
    """Cached tokens per sequence before the timed decode steps."""
    batch: int = 1
    n_layers: int = 2
    """Small model shape: enough to measure the cache, cheap on 2 cores."""
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    decode_steps: int = 8
    warmup: int = 2
    budget_mib: float = 4.0
    """Per-rank KV memory budget for ``largest_context``."""
    seed: int = 0
    backend: Backend = "auto"
    """auto: nccl when every rank has a CUDA device (the cache then lives on cuda:<rank>), else gloo."""
    threads: int = 1
    """torch threads per rank: 1 keeps points comparable across world sizes on a shared CPU
    (ranks beyond the core count still oversubscribe it: the report shows it)."""
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("world_size", "context", "batch", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "block_size", "decode_steps", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup < 0 or self.budget_mib <= 0 or self.timeout_s <= 0:
            raise ValueError("warmup must be >= 0, budget_mib and timeout_s > 0")

    def model(self) -> ModelConfig:
        return ModelConfig(vocab_size=256, dim=self.n_heads * self.head_dim, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           max_seq_len=max(4096, self.context + self.warmup + self.decode_steps))

    def cache(self) -> CacheConfig:
        return CacheConfig(codec=self.codec, key_granularity=self.key_granularity,
                           value_granularity=self.value_granularity, block_size=self.block_size)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(world_size=self.world_size, strategy=self.strategy, backend=self.backend)


def make_config(values: dict) -> Config:
    """Build a :class:`Config` from plain values; every problem in one :class:`ConfigError`."""
    return from_dict(Config, values, where="scaling")


def prefill(cache: ShardedKVCache, seq_ids: list[int], context: int, gen: torch.Generator,
            chunk: int = 4096) -> None:
    """Fill ``seq_ids`` with ``context`` tokens of random K/V (same on every rank: same generator)."""
    m = cache.model
    for s in seq_ids:
        cache.add_sequence(s)
    done = 0
    while done < context:
        n = min(chunk, context - done)
        if cache.extend(seq_ids, n) is None:
            raise RuntimeError(f"prefill of {context} tokens does not fit the cache")
        for layer in range(m.n_layers):
            shape = (len(seq_ids) * n, m.n_kv_heads, m.head_dim)
            cache.write(layer, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        done += n


def decode_step(cache: ShardedKVCache, seq_ids: list[int], gen: torch.Generator) -> torch.Tensor:
    """One decode step over every layer; returns the last layer's attention output ``[B, Hq, D]``."""
    m = cache.model
    b = len(seq_ids)
    if cache.extend(seq_ids, 1) is None:
        raise RuntimeError("decode step does not fit the cache")
    out = None
    with cache.comm.step("decode"):
        for layer in range(m.n_layers):
            k = torch.randn(b, 1, m.n_kv_heads, m.head_dim, generator=gen)
            v = torch.randn(b, 1, m.n_kv_heads, m.head_dim, generator=gen)
            q = torch.randn(b, m.n_heads, m.head_dim, generator=gen)
            cache.write(layer, k, v)
            out = cache.attend(layer, q)
    return out


def _rank_main(rank: int, world_size: int, cfg: Config) -> dict:
    comm = Comm()
    backend = torch.distributed.get_backend()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
    cache = ShardedKVCache(cfg.model(), cfg.cache(), cfg.parallel(), comm=comm, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    seqs = list(range(cfg.batch))
    prefill(cache, seqs, cfg.context, gen)
    for _ in range(cfg.warmup):
        decode_step(cache, seqs, gen)
    comm.ledger.reset()
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(cfg.decode_steps):
        comm.barrier()  # steps start together: the slowest rank sets the step time
        sync()
        t0 = time.perf_counter()
        decode_step(cache, seqs, gen)
        sync()
        times.append(time.perf_counter() - t0)
    cache.check(cross_rank=True)
    per = comm.ledger.per_step("decode")
    return {"times": times, "kv": cache.kv_bytes(), "comm_bytes_per_step": per["bytes_sent"],
            "comm_received_per_step": per["bytes_received"], "collectives_per_step": per["collectives"],
            "wire_bytes_per_step": per["wire_bytes_sent"],
            "threads": torch.get_num_threads(), "backend": backend, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()}


def run(cfg: Config) -> pd.DataFrame:
    """Launch the ranks, time decode steps, and return one tidy row per timed step."""
    model, cache, parallel = cfg.model(), cfg.cache(), cfg.parallel()
    validate_layout(model, parallel, cache)  # a bad layout fails here, before any process starts
    budget = cfg.budget_mib * 2**20
    fits = largest_context(model, cache, parallel, budget)
    fits1 = largest_context(model, cache, ParallelConfig(world_size=1, strategy=cfg.strategy), budget)
    t0 = time.perf_counter()
    res = launch(_rank_main, cfg.world_size, args=(cfg,), backend=cfg.backend, timeout_s=cfg.timeout_s,
                 threads_per_rank=cfg.threads)
    log.info("scaling point %s ran in %.1f s", cfg, time.perf_counter() - t0)
    steps = [max(r["times"][i] for r in res) for i in range(cfg.decode_steps)]
    formula = comm_bytes_formula(cfg.strategy, world_size=cfg.world_size, batch=cfg.batch,
                                 n_heads=cfg.n_heads, head_dim=cfg.head_dim)
    comm_step = max(r["comm_bytes_per_step"] for r in res)
    kv_rank = max(r["kv"]["total"] for r in res)
    kv_total = sum(r["kv"]["total"] for r in res)
    tokens = cfg.batch * (cfg.context + cfg.warmup + cfg.decode_steps)
    return pd.DataFrame({
        "sample": range(cfg.decode_steps),
        "step_ms": [t * 1e3 for t in steps],
        "tpot_ms": [t * 1e3 for t in steps],
        "tokens_per_s": [cfg.batch / t for t in steps],
        "median_step_ms": statistics.median(steps) * 1e3,
        "kv_bytes_per_rank": kv_rank,
        "kv_bytes_total": kv_total,
        "kv_replication": head_layout(model, parallel, 0).replication,
        "kv_bytes_per_token": kv_total / tokens,
        "comm_bytes_per_step": comm_step,
        "comm_bytes_per_layer": comm_step / cfg.n_layers,
        "comm_bytes_formula_per_layer": formula,
        "comm_received_per_step": max(r["comm_received_per_step"] for r in res),
        "comm_wire_bytes_per_layer": max(r["wire_bytes_per_step"] for r in res) / cfg.n_layers,
        "comm_wire_formula_per_layer": wire_bytes_formula(cfg.strategy, world_size=cfg.world_size, batch=cfg.batch,
                                                          n_heads=cfg.n_heads, head_dim=cfg.head_dim),
        "collectives_per_step": max(r["collectives_per_step"] for r in res),
        "collectives_formula_per_step": collectives_formula(cfg.strategy, world_size=cfg.world_size) * cfg.n_layers,
        "largest_context": fits,
        "largest_context_ws1": fits1,
        "context_gain": fits / fits1 if fits1 else float("nan"),
        "device": res[0]["device"],
        "device_name": res[0]["device_name"],
        "backend": res[0]["backend"],
        "torch_threads": res[0]["threads"],
    })


def scaling_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, codec, context, batch, world_size): median tokens/s, speedup and efficiency.

    The baseline is the world_size 1 point with the same device, codec, granularity, context and
    batch; at one rank every strategy is the same single shard, so a world_size 1 point of any
    strategy serves (the same strategy's is preferred). NaN when the sweep has no such point.
    """
    keys = [c for c in ("device", "strategy", "codec", "key_granularity", "context", "batch") if c in df.columns]
    base_keys = [k for k in keys if k != "strategy"]
    med = (df.groupby(keys + ["world_size"], dropna=False)
           .agg(tokens_per_s=("tokens_per_s", "median"), step_ms=("step_ms", "median"),
                largest_context=("largest_context", "first"), kv_bytes_per_rank=("kv_bytes_per_rank", "first"),
                comm_bytes_per_layer=("comm_bytes_per_layer", "first"),
                comm_bytes_formula_per_layer=("comm_bytes_formula_per_layer", "first"))
           .reset_index())
    ws1 = med[med["world_size"] == 1]
    same = ws1.set_index(keys)["tokens_per_s"]
    any_strategy = ws1.groupby(base_keys, dropna=False)["tokens_per_s"].median()
    med["tokens_per_s_ws1"] = [
        same.get(tuple(r[k] for k in keys), any_strategy.get(tuple(r[k] for k in base_keys) if len(base_keys) > 1
                                                               else r[base_keys[0]], float("nan")))
        for _, r in med.iterrows()]
    med["speedup"] = med["tokens_per_s"] / med["tokens_per_s_ws1"]
    med["scaling_efficiency"] = med["speedup"] / med["world_size"]
    return med
