"""Which model shapes (and tp sizes) a weight format fits. The formats themselves (what a
``--weights`` string names, what is packed and what is not, the ``-f32`` suffix) and their byte
formula are :mod:`ryzlab.weights`, torch-free, re-exported here.
"""
from __future__ import annotations

from typing import get_args

from ryzlab.config import ModelConfig
from ryzlab.weights import (INT4_GROUP_SIZES, INT4_ROW_BLOCK, TERNARY_PER_BYTE, WEIGHT_FORMAT_CHOICES,  # noqa: F401
                            WeightFormat, WeightKind, parse_weight_format)

__all__ = ["WeightFormat", "WeightKind", "WEIGHT_FORMAT_CHOICES", "INT4_GROUP_SIZES", "parse_weight_format",
           "check_weight_format", "weight_format_problems"]

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
