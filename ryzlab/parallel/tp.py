"""Tensor parallelism applied to a built model, gpt-fast style: ``apply_tp(model, comm)``.

The model (:mod:`ryzlab.models.transformer`) knows nothing about ranks. Afterwards, on tp rank ``r``:

* ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` are column-parallel: they keep the output rows of the
  rank's query heads, KV heads (a replicated KV head is kept whole by each of its ranks) and MLP
  columns, biases included;
* ``wo`` and ``w2`` are row-parallel: they keep the matching input columns, and their forward
  all-reduces the partial output (one all-reduce each per layer); a bias is added once, after
  the reduction;
* each attention module's ``n_heads`` / ``n_kv_heads`` become the rank's, so the model's own
  ``view``s and the KV cache (built with :func:`local_config`) see the local heads;
* embeddings, the output head and the norms stay replicated (:func:`weight_bytes` names them).

:func:`shard_spec` is the single source of truth for which rows or columns a rank keeps: it
slices in-memory weights here and tells the checkpoint loaders which slices to read, so a rank
materializes only its shard. At tp 1 nothing is sliced and nothing is reduced.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ryzlab.config import ModelConfig
from ryzlab.names import ParamName, parse_param_name
from ryzlab.parallel.comm import Comm
from ryzlab.parallel.layout import TPLayout, tp_layout

__all__ = ["apply_tp", "shard_spec", "local_config", "weight_bytes"]

log = logging.getLogger(__name__)

_COLUMN = ("wq", "wk", "wv", "w1", "w3")
_ROW = ("wo", "w2")
_SHARDED = frozenset(f"attention.{w}" for w in ("wq", "wk", "wv", "wo")) | frozenset(f"feed_forward.{w}" for w in ("w1", "w2", "w3"))


def _sharded(name: str) -> ParamName | None:
    """The parsed name of a parameter tp splits (attention and MLP projections), else None."""
    p = parse_param_name(name)
    return p if p is not None and p.module in _SHARDED else None


def _head_rows(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def shard_spec(name: str, model: ModelConfig, layout: TPLayout) -> tuple[int, torch.Tensor] | None:
    """``(dim, indices)`` of parameter ``name`` that ``layout``'s rank keeps, or None (whole).

    ``name`` is a :class:`ryzlab.models.transformer.Transformer` parameter name. Row-parallel biases are
    whole (added once after the all-reduce).
    """
    p = _sharded(name)
    if p is None or layout.tp == 1:
        return None
    proj, kind = p.proj, p.kind
    hd = model.head_dim
    if proj == "wq":
        return 0, _head_rows(layout.q_heads, hd)
    if proj in ("wk", "wv"):
        return 0, _head_rows(layout.kv_heads, hd)
    a, b = layout.ffn_cols
    if proj in ("w1", "w3"):
        return 0, torch.arange(a, b)
    if kind == "bias":  # wo / w2 bias: whole, added after the reduction
        return None
    if proj == "wo":
        return 1, _head_rows(layout.q_heads, hd)
    return 1, torch.arange(a, b)  # w2


def local_config(model: ModelConfig, layout: TPLayout) -> ModelConfig:
    """The shape one rank computes and caches: its query/KV heads and MLP columns, global head_dim."""
    return dataclasses.replace(model, n_heads=len(layout.q_heads), n_kv_heads=len(layout.kv_heads),
                               head_dim=model.head_dim, ffn_dim=layout.ffn_cols[1] - layout.ffn_cols[0])


def _row_parallel_forward(mod: nn.Linear, comm: Comm) -> Any:
    """``mod``'s forward on a row-parallel shard: partial product, all-reduce, then the bias once.

    Set on the instance (the parameter names stay ``weight`` / ``bias`` for loaders)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = comm.all_reduce(F.linear(x, mod.weight).contiguous())
        return out if mod.bias is None else out + mod.bias
    return forward


def apply_tp(model: nn.Module, comm: Comm) -> nn.Module:
    """Shard ``model`` (a :class:`ryzlab.models.transformer.Transformer`) in place over ``comm``'s ranks.

    ``comm`` is the tensor-parallel group (:class:`ryzlab.parallel.comm.Comm`; its rank is the tp
    rank). Works on a meta-device skeleton too (shapes only: a loader then fills the shards).
    Sets ``model.tp_layout`` and ``model.local_config``; returns the model.
    """
    cfg: ModelConfig = model.config
    layout = tp_layout(cfg, comm.world_size, comm.rank)
    model.tp_layout = layout
    model.local_config = local_config(cfg, layout)
    if comm.world_size == 1:
        return model
    for name, p in list(model.named_parameters()):
        spec = shard_spec(name, cfg, layout)
        if spec is None:
            continue
        dim, idx = spec
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        kind = name.rsplit(".", 1)[1]
        setattr(mod, kind, nn.Parameter(p.detach().index_select(dim, idx.to(p.device)), requires_grad=False))
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        attn.n_heads, attn.n_kv_heads = len(layout.q_heads), len(layout.kv_heads)
        for mod in (attn.wo, ffn.w2):
            mod.forward = _row_parallel_forward(mod, comm)
            mod.tp_reduce = comm.all_reduce  # a packed replacement (models.quant) reduces its partial product too
        for mod in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w3, ffn.w2):
            mod.out_features, mod.in_features = mod.weight.shape
    log.debug("apply_tp: rank %d/%d holds q heads %s, kv heads %s (x%d), ffn %s", layout.rank, layout.tp,
              layout.q_heads, layout.kv_heads, layout.kv_replication, layout.ffn_cols)
    return model


def weight_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of this rank's weights: ``sharded`` (split by apply_tp), ``replicated`` (whole on every
    rank: embeddings, output head, norms, row-parallel biases) and ``total``; tied tensors once."""
    cfg = model.config
    layout = getattr(model, "tp_layout", None) or tp_layout(cfg, 1, 0)
    seen: set[int] = set()
    sharded = replicated = 0
    names: list[str] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        p = _sharded(name)
        if p is not None and not (p.kind == "bias" and p.proj in _ROW):
            sharded += nbytes
        else:
            replicated += nbytes
            names.append(name)
    kinds = sorted({re.sub(r"layers\.\d+\.", "layers.*.", n) for n in names})
    return {"sharded": float(sharded), "replicated": float(replicated), "total": float(sharded + replicated),
            "tp": float(layout.tp), "replicated_names": ", ".join(kinds)}
