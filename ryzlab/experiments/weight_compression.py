"""Weight compression beside KV compression: one weight format x one KV cache layout on one model.

One point = model x weight format (``weights``: :data:`ryzlab.models.quant.WEIGHT_FORMAT_CHOICES`)
x KV layout (the :class:`~ryzlab.config.QuantFields` of the cache) at one context, batch 1.

* memory: ``weight_bytes`` (the weight ledger: packed values, scales and zeros, padding, and the
  norms / biases left in float), ``weight_ratio_vs_float32``, ``weight_scale_bytes``; KV:
  ``kv_bytes_per_token`` and ``kv_ratio_vs_bf16`` (the cache's ledger);
* accuracy: teacher forcing on held-out text through the compressed cache with the compressed
  weights, against the float32 weights with the uncompressed cache (the one reference for every
  point): ``kl_per_token``, ``ppl``, ``ppl_ref``, ``ppl_delta``, ``top1_agree``;
* speed: ``prefill_ms`` (``context`` tokens) and one row per timed decode step (``tpot_ms``);
* ``kernel``: the weight matmul kernels; ``attention_kernel``: the cache's attention path.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch

from ryzlab.config import (CODECS, GRANULARITIES, CacheConfig, Codec, DecodeFields, EvalFields, ModelConfig,
                           QuantFields, check_choice, check_counts, check_eval, group_values)
from ryzlab.provenance import cpu_model

__all__ = ["Config", "run"]

TINY = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
"""model='random': a tiny shape every int4 group size up to 64 fits (tests)."""


@dataclass(frozen=True, kw_only=True)
class Config(EvalFields, DecodeFields, QuantFields):
    """One weight format and one cache layout on one model (batch 1)."""

    weights: str = "int8"
    """Weight format: float32 | bf16 | int8 | int8-g<N> | int4-g32/g64/g128/g256 | ternary | gguf (a .gguf
    model's own blocks); ``-f32`` suffix: float32 scales and activations."""
    codec: Codec = "none"
    """KV codec; ``none`` isolates the weights' effect."""
    eval_windows: int = 2

    def __post_init__(self) -> None:
        from ryzlab.models.quant import check_weight_format

        check_choice("codec", self.codec, CODECS)
        check_choice("key_granularity", self.key_granularity, ("auto", *GRANULARITIES))
        check_choice("value_granularity", self.value_granularity, GRANULARITIES)
        check_counts(self, positive=("context", "decode_steps", "block_size", "group_size", "eval_len"),
                     non_negative=("warmup", "residual", "eval_windows", "threads"))
        check_eval(self)
        mc = self.model_config()
        check_weight_format(mc, self.weights)
        if self.weights.startswith("gguf") and not str(self.model).endswith(".gguf"):
            raise ValueError(f"weights={self.weights!r} keeps a GGUF file's own blocks: model must be a .gguf file, "
                             f"got {self.model!r}")
        self.cache_config().check_head_dim(mc.head_dim)
        self.cache_config().check_layers(mc.n_layers)

    def model_config(self) -> ModelConfig:
        from ryzlab.models import check_model

        return TINY if self.model == "random" else check_model(self.model).config

    def cache_config(self) -> CacheConfig:
        return CacheConfig(**group_values(QuantFields, self))


def _load(cfg: Config, weights: str) -> tuple[torch.nn.Module, object]:
    from ryzlab.models import load_model

    return load_model(cfg.model, dtype="float32", model_config=TINY if cfg.model == "random" else None,
                      seed=cfg.seed, weights=weights)


@torch.no_grad()
def run(cfg: Config) -> pd.DataFrame:
    """One row per timed decode step; memory, accuracy and kernel columns repeated on every row."""
    from ryzlab.evaluation.accuracy import decode_logits, teacher_forced, uncompressed
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.models import check_model
    from ryzlab.models.corpus import token_stream
    from ryzlab.models.quant import weight_ledger

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_cfg = cfg.cache_config()
    model, tok = _load(cfg, cfg.weights)
    timed = cfg.context + cfg.warmup + cfg.decode_steps
    stream = token_stream(tok, cfg.eval_windows * cfg.eval_len + timed, text=cfg.text or None)
    idx = (cfg.eval_windows * cfg.eval_len + torch.arange(timed)) % stream.numel()
    tokens = stream[idx].long().view(1, timed)

    paged = PagedKVCache(model.config, cache_cfg, dtype=torch.float32)
    t0 = time.perf_counter()
    model(tokens[:, :cfg.context], cache=paged, seq_ids=[0])
    prefill_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for i in range(cfg.warmup + cfg.decode_steps):
        t0 = time.perf_counter()
        model(tokens[:, cfg.context + i:cfg.context + i + 1], cache=paged, seq_ids=[0])
        if i >= cfg.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    kv = paged.ledger()

    acc: dict = {}
    if cfg.eval_windows:
        windows = stream[torch.arange(cfg.eval_windows * cfg.eval_len) % stream.numel()].long().view(
            cfg.eval_windows, cfg.eval_len)
        ref_model = _load(cfg, "float32")[0]   # float32 weights, uncompressed cache: every point's reference
        ref = decode_logits(ref_model, windows, uncompressed(cache_cfg), cfg.eval_prefill)[0]
        del ref_model
        r = teacher_forced(model, windows, cache_cfg, cfg.eval_prefill, ref_logits=ref)
        acc = {k: r[k] for k in ("kl_per_token", "kl_max", "ppl", "ppl_ref", "ppl_delta", "top1_agree",
                                 "rel_logit_err", "tokens_scored")}
    led = weight_ledger(model)
    return pd.DataFrame({
        "sample": range(len(times)), "tpot_ms": times, "median_tpot_ms": statistics.median(times),
        "prefill_ms": prefill_ms,
        "weight_bytes": led["total"], "weight_ratio_vs_float32": led["ratio_vs_float32"],
        "weight_scale_bytes": led["scales"], "weight_padding_bytes": led["padding"],
        "weight_float32_bytes": led["float32"], "weight_format": led["format"],
        "kv_bytes_per_token": kv["bytes_per_token"], "kv_ratio_vs_bf16": kv["ratio_vs_bf16"],
        "kv_bytes": kv["total"], "total_bytes": led["total"] + kv["total"],
        **acc,
        "kernel": ", ".join(led["kernels"]) or "aten.linear (float32)",
        "attention_kernel": paged.kernel,
        "model_name": "random" if cfg.model == "random" else check_model(cfg.model).name,
        "device": "cpu", "device_name": cpu_model(), "torch_threads": torch.get_num_threads(),
        "text": cfg.text or "heldout-stdlib",
    })
