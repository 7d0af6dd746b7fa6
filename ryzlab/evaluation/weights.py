"""Measuring weight formats: accuracy against float32 (teacher forcing), decode / prefill time, and the torchao peer.

Used by ``benchmarks/weight_formats.py`` and the ``weight_compression`` experiment, so both
measure the same way:

* :func:`dense_logits` — a dense causal forward per window: the logits of every position
  (teacher forcing on held-out text), compared with :func:`ryzlab.evaluation.accuracy.compare_logits`;
* :func:`decode_step_ms` — batch-1 greedy decode steps after a prefill, one time per step
  (the caller repeats and reports the spread);
* :func:`torchao_weights` — torchao's own weight-only formats on the same model, when torchao
  is installed (``pip install ryzlab[peers]``): on CPU with torchao 0.18 that is
  ``Int8WeightOnlyConfig`` and, for int4, ``IntxWeightOnlyConfig(int4, PerGroup(g))`` — its only
  int4 layout with a CPU path, which stores each int4 value in an int8 (checked by the benchmark).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ryzlab.models.transformer import DenseKVCache

log = logging.getLogger(__name__)

__all__ = ["dense_logits", "decode_step_ms", "prefill_ms", "torchao_weights", "tensor_bytes", "TORCHAO_FORMATS"]

TORCHAO_FORMATS = ("torchao-int8", "torchao-int4-g32", "torchao-int4-g64")


@torch.no_grad()
def dense_logits(model: nn.Module, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """tokens [B, L] -> logits [B, L - prefill, V] predicting ``tokens[:, prefill:]`` (one window at a time)."""
    return torch.stack([model(row[None])[0, prefill - 1:-1].float() for row in tokens])


@torch.no_grad()
def decode_step_ms(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[float]:
    """Prefill ``prompt`` [1, T] into a :class:`DenseKVCache`, then time ``steps`` greedy decode steps (ms each)."""
    cache = DenseKVCache(model.config.n_layers)
    logits = model(prompt, cache=cache)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits = model(nxt, cache=cache)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.no_grad()
def prefill_ms(model: nn.Module, prompt: torch.Tensor) -> float:
    """Wall time (ms) of one prefill of ``prompt`` [1, T] into a fresh :class:`DenseKVCache`."""
    cache = DenseKVCache(model.config.n_layers)
    t0 = time.perf_counter()
    model(prompt, cache=cache)
    return (time.perf_counter() - t0) * 1e3


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, summing the inner tensors of a tensor subclass (torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def torchao_weights(model: nn.Module, fmt: str) -> dict[str, Any]:
    """Apply torchao's weight-only format ``fmt`` (:data:`TORCHAO_FORMATS`) to every ``nn.Linear`` of ``model`` in place.

    Returns ``{"bytes": weight bytes held (unique tensors), "kernel": what computes the matmul}``.
    Raises ``ImportError`` when torchao is not installed.
    """
    import torchao.quantization as tq
    from torchao.quantization import quantize_

    if fmt == "torchao-int8":
        cfg: Any = tq.Int8WeightOnlyConfig()
        kernel = "torchao Int8Tensor (int8 weight, per-row scale)"
    elif fmt.startswith("torchao-int4-g"):
        g = int(fmt.rsplit("g", 1)[1])
        cfg = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(g))
        kernel = f"torchao IntxUnpackedToInt8Tensor (int4 values in int8, g{g})"
    else:
        raise ValueError(f"torchao format {fmt!r}: choose one of {', '.join(TORCHAO_FORMATS)}")
    if model.output.weight is model.tok_embeddings.weight:  # torchao quantizes Linear weights only: untie
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone(), requires_grad=False)
    quantize_(model, cfg)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_bytes(p)
    return {"bytes": total, "kernel": kernel}
