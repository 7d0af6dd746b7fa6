"""Weight storage formats and THE formula for their bytes (no torch: the CLI lists the choices).

One function, :func:`matrix_bytes`, says what a weight matrix costs in each format; the cost
model, the memory estimate and the planner all call it. It reads the
packed sizes of :mod:`ryzlab.models.quant` from :func:`ryzlab.weights.linear_weight_parts`, so a
projection and a loaded model count a format's bytes alike. ``fp8`` alone is projected only (the
formats GPU engines ship on Hopper / Ada; ryzlab's engine does not run it), its bytes given here.
"""
from __future__ import annotations

from typing import Literal, get_args

from ryzlab.weights import linear_weight_parts

__all__ = ["WeightFormat", "WEIGHT_FORMATS", "matrix_bytes"]

WeightFormat = Literal["fp32", "bf16", "int8", "int4", "fp8"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)


def matrix_bytes(fmt: str, rows: int, cols: int, group: int = 128) -> float:
    """Bytes of one ``[rows, cols]`` weight matrix stored as ``fmt``: the packed sizes of
    :mod:`ryzlab.models.quant` (:func:`ryzlab.weights.linear_weight_parts`, the one formula),
    with ``int4`` read as ``int4-g<group>``. fp32 4 / bf16 2 bytes a value; int8 weight-only 1 byte
    a value + a bf16 scale per output row (gpt-fast ``WeightOnlyInt8``, torchao); int4 half a byte
    a value + a bf16 scale and zero per ``group`` input columns (gpt-fast / tinygemm).

    ``fp8`` is a projection-only format (ryzlab's engine does not run fp8 weights; nothing here is
    measured on ryzlab): e4m3 weights, 1 byte a value + one float32 scale per tensor, as TensorRT-LLM
    and vLLM store an fp8 checkpoint; the cost model multiplies them on the device's fp8 tensor cores."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weights={fmt!r} is not valid; choose one of {', '.join(WEIGHT_FORMATS)}")
    if fmt == "fp8":
        return float(rows * cols + 4)
    name = {"fp32": "float32", "int4": f"int4-g{group}"}.get(fmt, fmt)
    return float(sum(linear_weight_parts(rows, cols, name).values()))
