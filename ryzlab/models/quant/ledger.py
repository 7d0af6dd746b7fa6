"""The weight ledger: exact bytes per weight format, computed from shapes and measured on a model.

Beside the KV ledger (:mod:`ryzlab.kv.ledger`). Two views that must agree (the tests hold them equal):

* :func:`linear_weight_bytes` / :func:`model_weight_bytes`: bytes a format needs, from shapes
  alone (the projection, the planner and the experiments call these);
* :func:`weight_ledger`: bytes a loaded (and possibly packed, possibly tp-sharded) model holds.

Counted per matrix: ``payload`` (codes or float values), ``scales`` (scales and zero points),
``padding`` (int4: torch's CPU layout holds whole blocks of 64 output rows; extra rows are stored).
Norms, biases and any matrix left in float are ``float``, at the model's dtype. A tied embedding /
output head is one matrix, counted once.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ryzlab.config import ModelConfig
from ryzlab.models.quant.formats import WeightFormat, _linears, parse_weight_format
from ryzlab.weights import linear_weight_parts  # noqa: F401 - the formula, re-exported where it was
from ryzlab.models.quant.linear import (Bf16Linear, Int4A8Linear, Int4Linear, Int8Linear, PackedLinear, TernaryLinear,
                                        _table_format)
from ryzlab.models.quant.w4a8 import TILE as W4A8_TILE

__all__ = ["linear_weight_bytes", "linear_weight_parts", "model_weight_bytes", "weight_ledger"]


def linear_weight_bytes(rows: int, cols: int, fmt: WeightFormat | str, group_size: int = 0) -> int:
    """Exact bytes of one ``[rows, cols]`` linear weight stored in ``fmt`` (scales, zeros, padding included).

    The one formula for weight bytes per format: ``float32`` 4 B/value, ``bf16`` 2, ``int8`` 1 +
    a scale per row (per group of ``group_size`` if given), ``int4-g<G>`` 0.5 + a scale and a zero
    per group (rows padded to a multiple of 64), ``ternary`` 0.25 + a scale per row. Scales and
    zeros are 2 bytes (bfloat16), 4 with the ``-f32`` suffix.
    """
    return sum(linear_weight_parts(rows, cols, fmt, group_size).values())


def model_weight_bytes(cfg: ModelConfig, fmt: WeightFormat | str, *, tp: int = 1, rank: int = 0,
                       dtype_bytes: int = 4) -> dict[str, Any]:
    """Bytes rank ``rank`` of ``tp`` holds for a model of ``cfg`` with weights in ``fmt``, from shapes alone.

    Keys: ``linears`` (the 7 projections of every layer), ``tables`` (embeddings and output head;
    bf16 under ``ternary``), ``float`` (norms and biases at ``dtype_bytes``), ``scales`` and
    ``padding`` (the parts of linears + tables that are not payload), ``total``, ``float32``
    (the same weights in float32) and ``ratio_vs_float32``.
    """
    fmt = parse_weight_format(fmt)
    if fmt.kind == "gguf":
        raise ValueError("weights=gguf: the bytes depend on the file's tensor types; load it and call weight_ledger")
    lin = {"payload": 0, "scales": 0, "padding": 0}
    f32 = 0
    for _, rows, cols, _ in _linears(cfg, tp, rank):
        for k, v in linear_weight_parts(rows, cols, fmt).items():
            lin[k] += v * cfg.n_layers
        f32 += rows * cols * 4 * cfg.n_layers
    n_tables = 1 if cfg.tie_embeddings else 2
    tab = {k: v * n_tables for k, v in
           linear_weight_parts(cfg.vocab_size, cfg.dim, _table_format(fmt) if fmt.quantized else fmt).items()}
    f32 += n_tables * cfg.vocab_size * cfg.dim * 4
    bias = _bias_values(cfg, tp, rank)
    floats = ((2 * cfg.n_layers + 1) * cfg.dim + bias) * dtype_bytes
    f32 += ((2 * cfg.n_layers + 1) * cfg.dim + bias) * 4
    total = sum(lin.values()) + sum(tab.values()) + floats
    return {"format": fmt.name, "tp": tp, "rank": rank, "linears": sum(lin.values()), "tables": sum(tab.values()),
            "float": floats, "scales": lin["scales"] + tab["scales"], "padding": lin["padding"] + tab["padding"],
            "total": total, "float32": f32, "ratio_vs_float32": total / f32}


def _bias_values(cfg: ModelConfig, tp: int, rank: int) -> int:
    shapes = {p: (rows, cols) for p, rows, cols, _ in _linears(cfg, tp, rank)}
    n = 0
    if cfg.qkv_bias:
        n += shapes["wq"][0] + shapes["wk"][0] + shapes["wv"][0]
    if cfg.o_bias:
        n += cfg.dim
    if cfg.mlp_bias:
        n += 2 * shapes["w1"][0] + cfg.dim
    return n * cfg.n_layers


_PAYLOAD = {Int8Linear: ("qweight",), Int4Linear: ("packed",), Int4A8Linear: ("packed",), TernaryLinear: ("packed",),
            Bf16Linear: ("weight_bf16",)}
_SCALES = {Int8Linear: ("scales",), Int4Linear: ("scales_zeros",), Int4A8Linear: ("sz",), TernaryLinear: ("scales",),
           Bf16Linear: ()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_ledger(model: nn.Module) -> dict[str, Any]:
    """Bytes ``model`` (this rank) holds, measured on its tensors, in :func:`model_weight_bytes`'s keys.

    ``kernels`` lists the matmul kernels of its packed layers.
    """
    seen: set[int] = set()
    out = {"linears": 0, "tables": 0, "float": 0, "scales": 0, "padding": 0, "float32": 0}
    kernels: set[str] = set()
    packed_params: set[int] = set()
    table_mods = {id(m) for m in (getattr(model, "output", None),
                                  getattr(getattr(model, "tok_embeddings", None), "table", None)) if m is not None}
    for mod in model.modules():
        if not isinstance(mod, PackedLinear):
            continue
        if mod.bias is not None:
            packed_params.add(id(mod.bias))
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        kernels.add(mod.kernel)
        payload = sum(_nbytes(getattr(mod, n)) for n in _PAYLOAD[type(mod)])
        scales = sum(_nbytes(getattr(mod, n)) for n in _SCALES[type(mod)])
        pad = 0
        if isinstance(mod, (Int4Linear, Int4A8Linear)):  # padded rows hold payload and scales too
            npad = mod.packed.shape[0] * (W4A8_TILE if isinstance(mod, Int4A8Linear) else 1)
            pad = (payload + scales) * (npad - mod.out_features) // npad
            payload -= payload * (npad - mod.out_features) // npad
            scales -= scales * (npad - mod.out_features) // npad
        out["tables" if id(mod) in table_mods else "linears"] += payload + scales + pad
        out["scales"] += scales
        out["padding"] += pad
        out["float32"] += mod.out_features * mod.in_features * 4
    for name, p in model.named_parameters():  # float leftovers: norms, biases, unpacked weights (tied: once)
        if id(p) in seen:
            continue
        seen.add(id(p))
        is_table = name in ("output.weight", "tok_embeddings.weight")
        if is_table or (p.dim() == 2 and id(p) not in packed_params):
            out["tables" if is_table else "linears"] += _nbytes(p)
        else:
            out["float"] += _nbytes(p)
        out["float32"] += p.numel() * 4
    total = out["linears"] + out["tables"] + out["float"]
    fmt = getattr(model, "weight_format", None)
    layout = getattr(model, "tp_layout", None)
    return {"format": fmt.name if fmt is not None else "float32", "tp": layout.tp if layout else 1,
            "rank": layout.rank if layout else 0, **out, "total": total, "ratio_vs_float32": total / out["float32"],
            "kernels": sorted(kernels)}
