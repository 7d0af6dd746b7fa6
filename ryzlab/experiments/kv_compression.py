"""KV-cache compression: memory, accuracy and speed of one cache layout on the reference model.

One point = codec x scale granularity x block size x residual window x context x batch.
Measured on the device present (``device`` column), with the shipped byte-level reference
model (``model="reference"``, :func:`ryzlab.model.load_reference_model`) or a tiny random one
(``model="random"``, for tests):

* memory: ``kv_bytes_per_token`` (ledger total / tokens held, scales, residual window, block
  padding and block tables included), ``cache_bytes``, ``ratio_vs_bf16``, and
  ``max_tokens_in_budget`` = how many tokens fit ``memory_budget_mib`` at that rate;
* speed: ``prefill_ms`` (``batch`` sequences of ``context`` tokens) and, one row per timed
  step, ``tpot_ms`` = one decode step of the whole batch (time per output token);
* accuracy (:mod:`ryzlab.kv.accuracy`, held-out stdlib text, teacher forcing):
  ``kl_per_token``, ``ppl``, ``ppl_ref``, ``ppl_delta``, ``rel_logit_err``, ``k_rel_err``,
  ``v_rel_err``, ``attn_rel_err``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from ..config import CODECS, GRANULARITIES, CacheConfig, Codec, Granularity, ModelConfig, check_choice
from ..provenance import cpu_model

__all__ = ["Config", "run"]


@dataclass(frozen=True, kw_only=True)
class Config:
    codec: Codec = "int8"
    key_granularity: Granularity = "token_head"
    value_granularity: Granularity = "token_head"
    group_size: int = 32
    """head_dim values per scale with ``group`` granularity (reference model: head_dim 32)."""
    symmetric: bool = True
    residual: int = 0
    """Most recent tokens also kept in full precision."""
    block_size: int = 16
    context: int = 256
    """Prompt tokens per sequence before the timed decode steps."""
    batch: int = 1
    decode_steps: int = 16
    """Timed decode steps (one output row each)."""
    warmup: int = 2
    memory_budget_mib: float = 1024.0
    """KV memory budget for ``max_tokens_in_budget`` (a GPU's free memory after weights, say)."""
    eval_windows: int = 4
    """Held-out windows for the accuracy metrics (0 = skip accuracy)."""
    eval_len: int = 256
    eval_prefill: int = 128
    """Tokens prefilled per window; the rest is decoded teacher-forced and scored."""
    model: Literal["reference", "random"] = "reference"
    """``reference``: the shipped checkpoint; ``random``: a tiny random model (tests)."""
    threads: int = 1
    """CPU threads (0 = torch default); 1 keeps points fair when run side by side."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("codec", self.codec, CODECS)
        check_choice("key_granularity", self.key_granularity, GRANULARITIES)
        check_choice("value_granularity", self.value_granularity, GRANULARITIES)
        for name in ("context", "batch", "decode_steps", "block_size", "group_size", "eval_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup", "residual", "eval_windows", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.memory_budget_mib <= 0:
            raise ValueError(f"memory_budget_mib must be > 0, got {self.memory_budget_mib}")
        if self.eval_windows and not 0 < self.eval_prefill < self.eval_len:
            raise ValueError(f"eval_prefill={self.eval_prefill} must be in [1, eval_len - 1 = {self.eval_len - 1}]")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available; choose 'auto' or 'cpu'")
        self.cache_config()  # validates the cache fields together

    def cache_config(self) -> CacheConfig:
        return CacheConfig(codec=self.codec, key_granularity=self.key_granularity,
                           value_granularity=self.value_granularity, group_size=self.group_size,
                           symmetric=self.symmetric, residual=self.residual, block_size=self.block_size)


TINY = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


def _model(cfg: Config, device: torch.device):
    from ..model import Transformer, load_reference_model

    if cfg.model == "reference":
        model, meta = load_reference_model(device=device)
        return model, meta.get("heldout_perplexity")
    torch.manual_seed(cfg.seed)
    return Transformer(TINY).to(device).eval(), None


def _tokens(n: int, length: int, offset: int, device: torch.device) -> torch.Tensor:
    """Held-out stdlib bytes, wrapping around when more is asked than there is."""
    from ..corpus import stdlib_corpus

    data = stdlib_corpus().heldout
    idx = (offset + torch.arange(n * length)) % data.numel()
    return data[idx].long().view(n, length).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run(cfg: Config) -> pd.DataFrame:
    """One row per timed decode step; memory and accuracy columns repeated on every row."""
    from ..kv.accuracy import evaluate
    from ..kv.cache import PagedKVCache

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    model, ref_ppl = _model(cfg, device)
    cache_cfg = cfg.cache_config()
    cache_cfg.check_head_dim(model.config.head_dim)
    seqs = list(range(cfg.batch))
    # Timing tokens start after the accuracy windows, so the two never overlap.
    tokens = _tokens(cfg.batch, cfg.context + cfg.warmup + cfg.decode_steps, cfg.eval_windows * cfg.eval_len, device)

    paged = PagedKVCache(model.config, cache_cfg, dtype=torch.float32, device=device)
    _sync(device)
    t0 = time.perf_counter()
    model(tokens[:, :cfg.context], cache=paged, seq_ids=seqs)
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for i in range(cfg.warmup + cfg.decode_steps):
        tok = tokens[:, cfg.context + i:cfg.context + i + 1]
        t0 = time.perf_counter()
        model(tok, cache=paged, seq_ids=seqs)
        _sync(device)
        if i >= cfg.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    led = paged.ledger()

    acc: dict = {}
    if cfg.eval_windows:
        windows = _tokens(cfg.eval_windows, cfg.eval_len, 0, device)
        row = evaluate(model, [cache_cfg], windows, cfg.eval_prefill).iloc[0]
        acc = {k: row[k] for k in ("kl_per_token", "kl_max", "ppl", "ppl_ref", "ppl_delta", "rel_logit_err",
                                   "k_rel_err", "v_rel_err", "attn_rel_err", "tokens_scored")}
    budget = cfg.memory_budget_mib * 2**20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return pd.DataFrame({
        "sample": range(len(times)),
        "tpot_ms": times,
        "median_tpot_ms": statistics.median(times),
        "prefill_ms": prefill_ms,
        "kv_bytes_per_token": led["bytes_per_token"],
        "kv_bytes_per_token_codec": led["bytes_per_token_codec"],
        "ratio_vs_bf16": led["ratio_vs_bf16"],
        "cache_bytes": led["total"],
        "payload_bytes": led["payload"], "scale_bytes": led["scales"], "residual_bytes": led["residual"],
        "padding_bytes": led["padding"], "metadata_bytes": led["metadata"],
        "tokens_held": led["tokens"],
        "max_tokens_in_budget": int(budget // led["bytes_per_token"]),
        **acc,
        "model_heldout_ppl": ref_ppl,
        "model_params": sum(p.numel() for p in model.parameters()),
        "device": device.type,
        "device_name": name,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
    })
