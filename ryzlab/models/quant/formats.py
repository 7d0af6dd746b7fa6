"""Weight formats: what a ``--weights`` string names, and which model shapes (and tp sizes) it fits.

    float32       the model as built (nothing quantized)
    bf16          every linear layer and the embeddings stored in bfloat16
    int8          per-output-row symmetric int8 (absmax / 127), one scale per row
    int8-g<N>     the same with one scale per N input values (N a multiple of 16; GGUF Q8_0 is int8-g32)
    int4-g<N>     group-wise asymmetric int4 along the input dimension, a scale and a zero per
                  group of N in {32, 64, 128, 256} (gpt-fast / torchao's int4 weight-only layout)
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
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ryzlab.config import ModelConfig

__all__ = ["WeightFormat", "WeightKind", "WEIGHT_FORMAT_CHOICES", "INT4_GROUP_SIZES", "parse_weight_format",
           "check_weight_format", "weight_format_problems"]

WeightKind = Literal["float32", "bf16", "int8", "int4", "ternary", "gguf"]
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 kernels take (``_weight_int4pack_mm_for_cpu``'s ``qGroupSize``)."""
WEIGHT_FORMAT_CHOICES = ("float32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g256", "ternary",
                         "ternary-a8", "gguf")
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
    """ternary only: 8 = per-token absmax int8 activations (BitNet b1.58's W1.58A8); 0 = none."""

    def __post_init__(self) -> None:
        if self.act_bits not in (0, 8) or (self.act_bits and self.kind != "ternary"):
            raise ValueError(f"act_bits={self.act_bits}: 8-bit activations (-a8) apply to ternary weights only")

    @property
    def name(self) -> str:
        base = f"{self.kind}-g{self.group_size}" if self.group_size else self.kind
        base += "-a8" if self.act_bits else ""
        return base + ("-f32" if self.compute == "float32" and self.kind not in ("float32", "bf16") else "")

    @property
    def compute_dtype(self) -> torch.dtype:
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
    m = re.fullmatch(r"int4-g(\d+)", s)
    if m and int(m.group(1)) in INT4_GROUP_SIZES:
        return WeightFormat(kind="int4", group_size=int(m.group(1)), compute=compute)
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
                     f"(int4 group sizes {INT4_GROUP_SIZES}; int8-g<N>, N a multiple of 16, for a scale per N values "
                     f"instead of per row; add -f32 for float32 scales and activations)")


def _linears(cfg: ModelConfig, tp: int, rank: int) -> list[tuple[str, int, int, int]]:
    """(projection, local rows, local input columns, offset of the first input column) of one rank."""
    from ryzlab.parallel.layout import tp_layout

    lay = tp_layout(cfg, tp, rank)
    hd = cfg.head_dim
    q, kv = len(lay.q_heads) * hd, len(lay.kv_heads) * hd
    f0, f1 = lay.ffn_cols
    return [("wq", q, cfg.dim, 0), ("wk", kv, cfg.dim, 0), ("wv", kv, cfg.dim, 0),
            ("wo", cfg.dim, q, lay.q_heads[0] * hd if tp > 1 else 0),
            ("w1", f1 - f0, cfg.dim, 0), ("w3", f1 - f0, cfg.dim, 0), ("w2", cfg.dim, f1 - f0, f0)]


def weight_format_problems(cfg: ModelConfig, fmt: WeightFormat, tp: int = 1) -> list[str]:
    """Every reason ``fmt`` cannot hold a model of ``cfg`` split over ``tp`` ranks (empty: it fits).

    Each rank quantizes (or loads) only its shard, so a row-parallel shard (``wo``, ``w2``) must
    start and end on a group boundary (int4) or a packed byte (ternary, 4 values per byte);
    otherwise two ranks would each hold part of one group or byte.
    """
    problems: list[str] = []
    if fmt.kind in ("int4", "gguf") or fmt.group_size:
        g = fmt.group_size if fmt.kind != "gguf" else 32  # Q4_0 / Q4_1 / Q8_0 blocks are 32 values
        unit, what = g, f"group size {g}"
    elif fmt.kind == "ternary":
        unit, what = TERNARY_PER_BYTE, f"a packed byte ({TERNARY_PER_BYTE} ternary values)"
    else:
        return problems
    seen: set[str] = set()
    for rank in range(tp):
        for proj, rows, cols, start in _linears(cfg, tp, rank):
            if cols % unit or start % unit:
                msg = (f"{proj}: {'its rank ' + str(rank) + ' shard covers' if tp > 1 else 'rows have'} input "
                       f"columns [{start}, {start + cols}) — {cols} values{' starting at ' + str(start) if start else ''}"
                       f", not whole units of {what}")
                if proj not in seen:
                    problems.append(msg)
                    seen.add(proj)
    if (fmt.kind in ("int4", "gguf") or fmt.group_size) and cfg.dim % unit:
        problems.append(f"embeddings / output head: rows of dim={cfg.dim} values are not whole groups of {unit}")
    return problems


def _fits(cfg: ModelConfig, fmt: WeightFormat, tp: int) -> list[str]:
    """The problems, plus the int4 group sizes that do fit when an int4 one does not."""
    problems = weight_format_problems(cfg, fmt, tp)
    if problems and fmt.kind == "int4":
        valid = [g for g in INT4_GROUP_SIZES if not weight_format_problems(cfg, WeightFormat(kind="int4", group_size=g), tp)]
        problems.append(f"int4 group sizes that fit this model at tp={tp}: "
                        f"{', '.join(f'int4-g{g}' for g in valid) or 'none'}")
    return problems


def check_weight_format(cfg: ModelConfig, fmt: WeightFormat | str, tp: int = 1) -> WeightFormat:
    """Raise one ``ValueError`` listing every problem of ``fmt`` for ``cfg`` at ``tp`` (before any weight is read)."""
    fmt = parse_weight_format(fmt)
    problems = _fits(cfg, fmt, tp)
    if problems:
        raise ValueError(f"weights={fmt.name} does not fit the model (dim={cfg.dim}, ffn_dim={cfg.ffn_dim}, "
                         f"heads={cfg.n_heads}x{cfg.head_dim}) at tp={tp}; nothing loaded:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    return fmt


KINDS: tuple[str, ...] = get_args(WeightKind)
