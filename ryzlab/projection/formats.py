"""Weight storage formats and THE formula for their bytes (no torch: the CLI lists the choices).

One function, :func:`matrix_bytes`, says what a weight matrix costs in each format; the cost
model, the memory estimate and the planner all call it. (Issue 21's ``ryzlab.models.quant``
packs real weights; where both exist, this formula must match its packed sizes.)
"""
from __future__ import annotations

import math
from typing import Literal, get_args

__all__ = ["WeightFormat", "WEIGHT_FORMATS", "matrix_bytes"]

WeightFormat = Literal["fp32", "bf16", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)


def matrix_bytes(fmt: str, rows: int, cols: int, group: int = 128) -> float:
    """Bytes of one ``[rows, cols]`` weight matrix stored as ``fmt`` (THE weight-bytes formula).

    fp32 4 / bf16 2 bytes a value; int8 weight-only: 1 byte a value + one bf16 scale per output
    row (gpt-fast ``WeightOnlyInt8``, torchao); int4: half a byte a value + a bf16 scale and a
    bf16 zero per ``group`` input columns per row (gpt-fast / tinygemm, GPTQ / AWQ).
    """
    n = rows * cols
    if fmt == "fp32":
        return 4.0 * n
    if fmt == "bf16":
        return 2.0 * n
    if fmt == "int8":
        return n + 2.0 * rows
    if fmt == "int4":
        return n / 2 + 4.0 * rows * math.ceil(cols / group)
    raise ValueError(f"weights={fmt!r} is not valid; choose one of {', '.join(WEIGHT_FORMATS)}")
