"""KV-cache compression: memory, accuracy and speed of one cache layout on one model.

One point = model x codec x scale granularity x block size x residual window x context x batch.
Measured on the device present (``device`` column), with the shipped byte-level reference
model (``model="reference"``), a tiny random one (``model="random"``, for tests) or any
checkpoint :func:`ryzlab.models.load_model` reads (a Hugging Face folder or a ``.gguf`` file:
``model`` is a sweep axis like any other). Text is tokenized with the model's own tokenizer:
``text`` names a UTF-8 file, empty = the held-out stdlib text.

* memory: ``kv_bytes_per_token`` (ledger total / tokens held, scales, residual window, block
  padding and block tables included), ``cache_bytes``, ``ratio_vs_bf16``, and
  ``max_tokens_in_budget`` = how many tokens fit ``memory_budget_mib`` at that rate;
* speed (attention path in ``kernel``: ``torch`` or ``triton``): ``prefill_ms`` (``batch``
  sequences of ``context`` tokens) and, one row per timed
  step, ``tpot_ms`` = one decode step of the whole batch (time per output token);
* accuracy (:mod:`ryzlab.evaluation.accuracy`, teacher-forced decode through the compressed cache vs the
  uncompressed one): ``kl_per_token``, ``ppl``, ``ppl_ref``, ``ppl_delta``, ``top1_agree``,
  ``ppl_dense``, ``rel_logit_err``, ``k_rel_err``, ``v_rel_err``, ``attn_rel_err``.

Real-model evaluation is the ground truth for codec decisions (a random or tiny model has no
outlier channels): point ``model`` at a checkpoint (e.g. the SmolLM2 GGUF,
``ryzlab.models.smollm2_gguf_path()``); the demo keeps the reference model for speed. ``peer``
measures a peer cache instead of ryzlab's (:mod:`ryzlab.evaluation.peers`: optimum-quanto's
``QuantizedCache`` on the transformers model of the same checkpoint, teacher-forced against
``DynamicCache``; bytes from the peer's counter), so a report draws both on the same axes. The
two paths differ in one documented way: HF attends a step's own token at full precision.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from ryzlab.config import (CODECS, GRANULARITIES, CacheConfig, Codec, DecodeFields, EvalFields, ModelConfig,
                           QuantFields, check_choice, check_counts, check_eval, group_values)
from ryzlab.provenance import cpu_model

__all__ = ["Config", "run"]


@dataclass(frozen=True, kw_only=True)
class Config(EvalFields, DecodeFields, QuantFields):
    """One cache layout (:class:`~ryzlab.config.QuantFields`, as :class:`~ryzlab.config.CacheConfig`
    declares it) on one model, context and batch (:class:`~ryzlab.config.DecodeFields`), scored on
    held-out text (:class:`~ryzlab.config.EvalFields`)."""

    codec: Codec = "int8"
    """The experiment's default: the 8-bit format every other codec is compared with."""
    batch: int = 1
    memory_budget_mib: float = 1024.0
    """KV memory budget for ``max_tokens_in_budget`` (a GPU's free memory after weights, say)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and uncompressed-cache dtype; ``auto``: float32 on CPU, the checkpoint's dtype on CUDA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """Attention path of the paged cache: ``triton`` reads compressed pages in Triton kernels (CUDA),
    ``torch`` decodes pages then attends; ``auto``: triton on CUDA when installed. Recorded per row."""
    weights: str = "float32"
    """Weight format of the model (:data:`ryzlab.models.quant.WEIGHT_FORMAT_CHOICES`); the accuracy
    reference is the same weights with an uncompressed cache (the weight_compression experiment
    measures weights against float32)."""
    peer: Literal["", "quanto_int4", "quanto_int2"] = ""
    """Measure this peer cache instead of ryzlab's (needs a Hugging Face folder or .gguf ``model``)."""

    def __post_init__(self) -> None:
        check_choice("codec", self.codec, CODECS)
        check_choice("key_granularity", self.key_granularity, ("auto", *GRANULARITIES))
        check_choice("value_granularity", self.value_granularity, GRANULARITIES)
        check_counts(self, positive=("context", "batch", "decode_steps", "block_size", "group_size", "eval_len",
                                     "memory_budget_mib"),
                     non_negative=("warmup", "residual", "eval_windows", "threads"))
        check_eval(self)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available; choose 'auto' or 'cpu'")
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("kernel", self.kernel, ("auto", "torch", "triton"))
        if self.kernel == "triton":
            from ryzlab.kv.triton import unavailable_reason

            cuda = self.device != "cpu" and torch.cuda.is_available()
            why = unavailable_reason(torch.device("cuda" if cuda else "cpu"))
            if why:
                raise ValueError(f"kernel='triton' cannot run here: {why}; choose 'auto' or 'torch'")
        self.cache_config().check_head_dim(self.model_config().head_dim)  # the cache fields together, and vs the model
        self.cache_config().check_layers(self.model_config().n_layers)
        from ryzlab.models.quant import check_weight_format

        check_weight_format(self.model_config(), self.weights)
        if self.peer and self.weights != "float32":
            raise ValueError(f"weights={self.weights!r} applies to ryzlab's model; a peer cache runs float32 weights")
        if self.peer and (self.model in ("reference", "random") or not Path(self.model).expanduser().exists()):
            raise ValueError(f"peer={self.peer!r} runs on a transformers model: model must be a Hugging Face "
                             f"folder or a .gguf file, got {self.model!r}")

    def model_config(self) -> ModelConfig:
        """The model's shape from its metadata alone (raises naming the valid model specs)."""
        from ryzlab.models import check_model

        return TINY if self.model == "random" else check_model(self.model).config

    def cache_config(self) -> CacheConfig:
        return CacheConfig(**group_values(QuantFields, self))


TINY = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


def _model(cfg: Config, device: torch.device) -> tuple[Any, Any, float | None, str]:
    """(model, tokenizer, recorded held-out perplexity or None, model name)."""
    from ryzlab.models import check_model, load_model

    src = check_model(cfg.model)
    model, tok = load_model(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype, device=device,
                            model_config=TINY if cfg.model == "random" else None, seed=cfg.seed, weights=cfg.weights)
    ref_ppl = None
    if src.kind == "reference":
        ref_ppl = json.loads(src.path.with_suffix(".json").read_text()).get("heldout_perplexity")
    return model, tok, ref_ppl, src.name


def _tokens(stream: torch.Tensor, n: int, length: int, offset: int, device: torch.device) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of ``stream`` from ``offset``, wrapping around when more is asked."""
    idx = (offset + torch.arange(n * length)) % stream.numel()
    return stream[idx].long().view(n, length).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run(cfg: Config) -> pd.DataFrame:
    """One row per timed decode step; memory and accuracy columns repeated on every row."""
    from ryzlab.evaluation.accuracy import evaluate
    from ryzlab.kv.cache import PagedKVCache

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    from ryzlab.models.corpus import token_stream

    if cfg.peer:
        return _run_peer(cfg, device)
    cache_cfg = cfg.cache_config()
    cache_cfg.check_head_dim(cfg.model_config().head_dim)
    model, tok, ref_ppl, model_name = _model(cfg, device)
    dtype = model.tok_embeddings.weight.dtype
    seqs = list(range(cfg.batch))
    # Timing tokens start after the accuracy windows, so the two never overlap.
    timed = cfg.context + cfg.warmup + cfg.decode_steps
    stream = token_stream(tok, cfg.eval_windows * cfg.eval_len + cfg.batch * timed, text=cfg.text or None)
    tokens = _tokens(stream, cfg.batch, timed, cfg.eval_windows * cfg.eval_len, device)

    paged = PagedKVCache(model.config, cache_cfg, dtype=dtype, device=device, kernel=cfg.kernel)
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
        windows = _tokens(stream, cfg.eval_windows, cfg.eval_len, 0, device)
        row = evaluate(model, [cache_cfg], windows, cfg.eval_prefill, model_name=model_name).iloc[0]
        acc = {k: row[k] for k in ("kl_per_token", "kl_max", "ppl", "ppl_ref", "ppl_delta", "top1_agree", "ppl_dense",
                                   "rel_logit_err", "k_rel_err", "v_rel_err", "attn_rel_err", "tokens_scored")}
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
        "model_name": model_name,
        "model_dtype": str(dtype).removeprefix("torch."),
        "model_params": sum(p.numel() for p in model.parameters()),
        "kernel": paged.kernel,
        "device": device.type,
        "device_name": name,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "text": cfg.text or "heldout-stdlib",
        "peer": "",
    })


@torch.no_grad()
def _run_peer(cfg: Config, device: torch.device) -> pd.DataFrame:
    """The same rows for a peer cache on the transformers model of ``cfg.model``."""
    from ryzlab.models.corpus import token_stream
    from ryzlab.evaluation.accuracy import hf_heldout_tokens
    from ryzlab.kv.hf import load_hf_causal_lm
    from ryzlab.evaluation.peers import evaluate_peer, hf_cache_bytes, peer_cache
    from ryzlab.models import check_model, load_tokenizer

    model = load_hf_causal_lm(cfg.model).to(device)
    tok = load_tokenizer(cfg.model)
    timed = cfg.context + cfg.warmup + cfg.decode_steps
    stream = token_stream(tok, cfg.eval_windows * cfg.eval_len + cfg.batch * timed, text=cfg.text or None)
    tokens = _tokens(stream, cfg.batch, timed, cfg.eval_windows * cfg.eval_len, device)
    cache = peer_cache(model.config, cfg.peer)
    _sync(device)
    t0 = time.perf_counter()
    model(tokens[:, :cfg.context], cache=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for i in range(cfg.warmup + cfg.decode_steps):
        t0 = time.perf_counter()
        model(tokens[:, cfg.context + i:cfg.context + i + 1], cache=cache, use_cache=True)
        _sync(device)
        if i >= cfg.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    total = float(hf_cache_bytes(cache))
    held = cfg.batch * (timed - 1)
    acc: dict = {}
    if cfg.eval_windows:
        windows = _tokens(stream, cfg.eval_windows, cfg.eval_len, 0, device)
        acc = evaluate_peer(model, cfg.peer, windows, cfg.eval_prefill)
        acc = {k: acc[k] for k in ("kl_per_token", "kl_max", "ppl", "ppl_ref", "ppl_delta", "top1_agree",
                                   "rel_logit_err", "tokens_scored")}
    mc = cfg.model_config()
    bf16 = 2.0 * mc.n_layers * mc.n_kv_heads * mc.head_dim * 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return pd.DataFrame({
        "sample": range(len(times)), "tpot_ms": times, "median_tpot_ms": statistics.median(times),
        "prefill_ms": prefill_ms, "kv_bytes_per_token": total / held, "ratio_vs_bf16": total / held / bf16,
        "cache_bytes": total, "tokens_held": float(held),
        "max_tokens_in_budget": int(cfg.memory_budget_mib * 2**20 // (total / held)), **acc,
        "model_name": check_model(cfg.model).name, "model_dtype": "float32",
        "model_params": sum(p.numel() for p in model.parameters()), "device": device.type, "device_name": name,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "text": cfg.text or "heldout-stdlib", "peer": cfg.peer,
    })
