"""Weight formats without torch: what a ``--weights`` string names and THE formula for the bytes
of a weight matrix in each (the CLI, the projections and :mod:`ryzlab.models.quant` all read it;
the packed layers live in :mod:`ryzlab.models.quant`).

Weight formats: what a ``--weights`` string names, and which model shapes (and tp sizes) it fits.

    float32       the model as built (nothing quantized)
    bf16          every linear layer and the embeddings stored in bfloat16
    int8          per-output-row symmetric int8 (absmax / 127), one scale per row
    int8-g<N>     the same with one scale per N input values (N a multiple of 16; GGUF Q8_0 is int8-g32)
    int4-g<N>     group-wise asymmetric int4 along the input dimension, a scale and a zero per
                  group of N in {32, 64, 128, 256} (gpt-fast / torchao's int4 weight-only layout)
    int4-g<N>-a8  the same weights (codes, bf16 scales and zeros) with 8-bit activations (W4A8, as
                  llama.cpp's Q4 x Q8_0 dot products): each token's input to a projection rounded to
                  int8 with an absmax scale per 32 values, the products summed in integers by ryzlab's C++
                  kernel (:mod:`ryzlab.models.quant.w4a8`); rows padded to tiles of 8
    ternary       BitNet b1.58 ternary {-1, 0, +1}, packed 4 values per byte (2 bits), one absmean
                  scale per output row; embeddings / output head stay bf16 (as in BitNet)
    ternary-a8    the same weights with BitNet b1.58's 8-bit activations (W1.58A8): each token's
                  input to a projection rounded to int8 with its absmax scale, the matmul in integers
    gguf          a GGUF file's own blocks: Q8_0 -> int8 with a scale per 32, Q4_0 / Q4_1 -> int4
                  with a scale (and offset) per 32, without a float round trip

What is packed: the attention and MLP projections of every layer and (except ternary) the
token embeddings / output head. What is not: norms, biases and RoPE tables stay in the model dtype.

A ``-f32`` suffix (``int8-f32``) keeps scales, zeros and the kernel's activations in float32
instead of bfloat16: slower on CPU (torch's int8 / int4 CPU kernels are vectorised for bfloat16
activations only), but exact to float32 rounding (the GGUF equivalence tests use it).
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Literal, get_args

if typing.TYPE_CHECKING:
    import torch

__all__ = ["WeightFormat", "WeightKind", "WEIGHT_FORMAT_CHOICES", "INT4_GROUP_SIZES", "TERNARY_PER_BYTE",
           "INT4_ROW_BLOCK", "parse_weight_format", "int4_padded_rows", "linear_weight_parts"]

WeightKind = Literal["float32", "bf16", "int8", "int4", "ternary", "gguf"]
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 kernels take (``_weight_int4pack_mm_for_cpu``'s ``qGroupSize``)."""
WEIGHT_FORMAT_CHOICES = ("float32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g256", "int4-g32-a8",
                         "ternary", "ternary-a8", "gguf")
TERNARY_PER_BYTE = 4
"""Ternary values per packed byte (2 bits each: codes 0, 1, 2 for -1, 0, +1)."""
INT4_ROW_BLOCK = 64
"""torch's CPU int4 layout interleaves blocks of 64 output rows; other row counts are padded (and counted)."""


@dataclass(frozen=True, kw_only=True)
class WeightFormat:
    """One weight format (see the module docstring)."""

    kind: WeightKind = "float32"
    group_size: int = 0
    """int4 / int8: input values sharing a scale (and int4's zero); 0 = a scale per row (int8, ternary)."""
    compute: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of scales / zeros and of the activations handed to the kernel."""
    act_bits: int = 0
    """ternary / int4: 8 = per-token absmax int8 activations (W1.58A8, W4A8); 0 = none."""

    def __post_init__(self) -> None:
        if self.act_bits not in (0, 8) or (self.act_bits and self.kind not in ("ternary", "int4")):
            raise ValueError(f"act_bits={self.act_bits}: 8-bit activations (-a8) apply to ternary and int4 weights only")
        if self.act_bits and self.kind == "int4" and self.compute != "bfloat16":
            raise ValueError("int4 -a8 keeps bfloat16 scales and zeros (its kernel reads them); there is no -a8-f32")

    @property
    def name(self) -> str:
        base = f"{self.kind}-g{self.group_size}" if self.group_size else self.kind
        base += "-a8" if self.act_bits else ""
        return base + ("-f32" if self.compute == "float32" and self.kind not in ("float32", "bf16") else "")

    @property
    def compute_dtype(self) -> "torch.dtype":
        import torch  # lazily: this module is read by torch-free entry points (the CLI, projections)

        return torch.float32 if self.compute == "float32" else torch.bfloat16

    @property
    def quantized(self) -> bool:
        return self.kind != "float32"

    def __str__(self) -> str:
        return self.name


def parse_weight_format(spec: str | WeightFormat | None) -> WeightFormat:
    """``'int4-g32'`` (see :data:`WEIGHT_FORMAT_CHOICES`, optional ``-f32`` suffix) -> :class:`WeightFormat`."""
    if spec is None:
        return WeightFormat()
    if isinstance(spec, WeightFormat):
        return spec
    s = str(spec).strip().lower()
    compute = "bfloat16"
    if s.endswith("-f32") and s not in ("float32",):
        s, compute = s[:-4], "float32"
    m = re.fullmatch(r"int4-g(\d+)(-a8)?", s)
    if m and int(m.group(1)) in INT4_GROUP_SIZES:
        return WeightFormat(kind="int4", group_size=int(m.group(1)), compute=compute, act_bits=8 if m.group(2) else 0)
    m = re.fullmatch(r"int8-g(\d+)", s)
    if m and int(m.group(1)) >= 16 and int(m.group(1)) % 16 == 0:
        return WeightFormat(kind="int8", group_size=int(m.group(1)), compute=compute)
    if s == "ternary-a8":
        return WeightFormat(kind="ternary", compute=compute, act_bits=8)
    if s in ("float32", "bf16", "int8", "ternary", "gguf"):
        if compute == "float32" and s in ("float32", "bf16"):
            raise ValueError(f"weights={spec!r}: the -f32 suffix applies to int8 / int4 / ternary / gguf only")
        return WeightFormat(kind=s, compute=compute)  # type: ignore[arg-type]
    raise ValueError(f"weights={spec!r} is not a weight format; choose one of {', '.join(WEIGHT_FORMAT_CHOICES)} "
                     f"(int4 group sizes {INT4_GROUP_SIZES}, -a8 for 8-bit activations; int8-g<N>, N a multiple of 16, for a scale per N values "
                     f"instead of per row; add -f32 for float32 scales and activations)")


def int4_padded_rows(rows: int) -> int:
    """Rows torch's CPU int4 layout holds for ``rows`` output rows (whole blocks of 64)."""
    return -(-rows // INT4_ROW_BLOCK) * INT4_ROW_BLOCK


def linear_weight_parts(rows: int, cols: int, fmt: WeightFormat | str, group_size: int = 0) -> dict[str, int]:
    """Bytes of one ``[rows, cols]`` weight in ``fmt``: ``payload``, ``scales``, ``padding`` (no bias).

    ``group_size`` overrides the format's (int4) or makes int8 group-wise (GGUF Q8_0: 32);
    ``fmt='gguf'`` is read as int4 with groups of 32 (Q4_0 / Q4_1: the kernel stores a zero per group for both).
    """
    fmt = parse_weight_format(fmt)
    c = 2 if fmt.compute == "bfloat16" else 4
    kind = fmt.kind
    if kind == "float32":
        return {"payload": rows * cols * 4, "scales": 0, "padding": 0}
    if kind == "bf16":
        return {"payload": rows * cols * 2, "scales": 0, "padding": 0}
    if kind == "int8":
        group_size = group_size or fmt.group_size
        groups = cols // group_size if group_size else 1
        return {"payload": rows * cols, "scales": rows * groups * c, "padding": 0}
    if kind == "ternary":
        return {"payload": rows * cols // TERNARY_PER_BYTE, "scales": rows * c, "padding": 0}
    g = group_size or fmt.group_size or 32   # int4 / gguf Q4
    npad = -(-rows // 8) * 8 if fmt.act_bits else int4_padded_rows(rows)   # W4A8: tiles of 8 rows (w4a8.TILE)
    per_row_payload, per_row_scales = cols // 2, (cols // g) * 2 * c
    return {"payload": rows * per_row_payload, "scales": rows * per_row_scales,
            "padding": (npad - rows) * (per_row_payload + per_row_scales)}
