"""Which heads, MLP columns and KV blocks each rank holds in a tp x cp layout, checked before any
process group exists, and the closed-form communication the scaling experiment compares with.

Ranks form a ``cp x tp`` mesh (:mod:`ryzlab.parallel.mesh`): global rank ``r`` is
``(cp_rank, tp_rank) = divmod(r, tp)``, so the ranks of one tensor-parallel group are
neighbours (on a GPU box: the same NVLink island).

* **Tensor parallelism** (``tp``): query heads ``[r * Hq/tp, (r+1) * Hq/tp)`` and their KV heads
  live on tp rank ``r``, with ``ffn_dim / tp`` MLP columns. When ``n_kv_heads < tp`` each KV head is
  replicated on ``tp / n_kv_heads`` ranks (vLLM does the same); every copy is counted.
* **Context parallelism** (``cp``): a sequence's KV blocks are spread over the cp ranks; each
  rank stores its blocks for the KV heads its tp rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from ryzlab.config import CacheConfig, ConfigError, ModelConfig, ParallelConfig

__all__ = ["TPLayout", "tp_layout", "valid_tp_sizes", "validate_parallel", "tp_comm_bytes_formula",
           "cp_comm_bytes_formula", "wire_bytes_formula"]


@dataclass(frozen=True)
class TPLayout:
    """What one tensor-parallel rank holds (global head numbering)."""

    tp: int
    rank: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    kv_replication: int
    """Copies of each KV head across the tp ranks (1 = partitioned)."""
    ffn_cols: tuple[int, int]
    """``[start, stop)`` of the MLP hidden columns this rank holds."""


def valid_tp_sizes(model: ModelConfig, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes that fit the model: heads and MLP columns split evenly, KV heads
    split evenly or replicated a whole number of times."""
    kv = model.n_kv_heads
    return [t for t in range(1, limit + 1)
            if model.n_heads % t == 0 and model.ffn_dim % t == 0 and (kv % t == 0 or t % kv == 0)]


def tp_layout(model: ModelConfig, tp: int, rank: int) -> TPLayout:
    """The heads and MLP columns of tp rank ``rank`` (layout assumed valid: see :func:`validate_parallel`)."""
    if not 0 <= rank < tp:
        raise ValueError(f"tp rank={rank} out of range for tp={tp}")
    hq, kv = model.n_heads, model.n_kv_heads
    q_per = hq // tp
    q = tuple(range(rank * q_per, (rank + 1) * q_per))
    f = model.ffn_dim // tp
    if kv % tp == 0:
        per = kv // tp
        return TPLayout(tp, rank, q, tuple(range(rank * per, (rank + 1) * per)), 1, (rank * f, (rank + 1) * f))
    rep = tp // kv
    return TPLayout(tp, rank, q, (rank // rep,), rep, (rank * f, (rank + 1) * f))


def validate_parallel(model: ModelConfig, parallel: ParallelConfig, cache: CacheConfig | None = None) -> None:
    """Raise :class:`ConfigError` listing every reason the layout cannot run, with the valid choices.

    Call it in the parent, before any process starts: a bad layout must not fail inside a group.
    """
    problems: list[str] = []
    tp, cp = parallel.tp, parallel.cp
    if tp not in valid_tp_sizes(model, max(64, tp)):
        problems.append(
            f"tp={tp} does not fit the model: it must divide n_heads ({model.n_heads}) and ffn_dim "
            f"({model.ffn_dim}), and divide n_kv_heads ({model.n_kv_heads}) or be a multiple of it; "
            f"valid tp sizes: {valid_tp_sizes(model)[:12]}")
    if cache is not None:
        try:
            cache.check_head_dim(model.head_dim)
        except ValueError as e:
            problems.append(str(e))
        if cache.num_blocks is not None and (cache.num_blocks < cp or cache.num_blocks % cp):
            problems.append(f"num_blocks={cache.num_blocks} cannot be spread over cp={cp} ranks: it must be a "
                            f"multiple of cp (each rank holds num_blocks / cp); e.g. {max(cp, cache.num_blocks // cp * cp)}")
    if problems:
        raise ConfigError(problems, where=f"tp={tp}, cp={cp}")


def tp_comm_bytes_formula(model: ModelConfig, *, tp: int, tokens: int, element_size: int = 4) -> int:
    """Bytes one rank hands to tensor-parallel collectives per layer for ``tokens`` new tokens.

    Two all-reduces of ``[tokens, dim]`` per layer (after ``wo`` and after ``w2``); 0 at tp 1.
    """
    return 0 if tp == 1 else 2 * tokens * model.dim * element_size


def cp_comm_bytes_formula(model: ModelConfig, *, cp: int, tp: int = 1, tokens: int, element_size: int = 4) -> int:
    """Bytes one rank hands to context-parallel collectives per layer for ``tokens`` queries.

    One all-gather of the packed partial ``[tokens, heads, head_dim + 1]`` (attention output and
    its log-sum-exp over the rank's blocks) for the rank's ``n_heads / tp`` query heads; it does
    not depend on the context length. 0 at cp 1.
    """
    return 0 if cp == 1 else tokens * (model.n_heads // tp) * (model.head_dim + 1) * element_size


def wire_bytes_formula(call_site_bytes: int, group_size: int, kind: str) -> int:
    """Bytes a rank sends on the wire for a ring collective of ``call_site_bytes`` per rank.

    A ring all-gather forwards ``group_size - 1`` chunks of the rank's contribution; a ring
    all-reduce (reduce-scatter + all-gather) sends ``2 (n - 1) / n`` of the tensor. Backend
    headers come on top (the measured ``wire_bytes`` include them).
    """
    if group_size == 1:
        return 0
    if kind == "all_gather":
        return (group_size - 1) * call_site_bytes
    if kind == "all_reduce":
        return 2 * (group_size - 1) * call_site_bytes // group_size
    raise ValueError(f"kind={kind!r} is not valid; choose one of 'all_gather', 'all_reduce'")
