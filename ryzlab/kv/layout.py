"""Which KV heads and query heads each rank holds, checked before any process group exists.

Strategies (``ParallelConfig.strategy``):

- ``replicated``: every rank keeps every block with every head (the baseline, no communication).
- ``heads``: KV heads partitioned as in tensor parallelism. With ``n_kv_heads >= world_size``
  rank ``r`` holds ``n_kv_heads / world_size`` heads; with fewer KV heads than ranks each head
  is replicated on ``world_size / n_kv_heads`` ranks (the byte ledger counts every copy) and the
  head's query group is split between its copies.
- ``sequence``: every rank holds all heads of *its* blocks; the blocks of one sequence are
  spread across ranks and partial attention is merged by log-sum-exp.

:func:`comm_bytes_formula` is the closed form the measured ledger is compared with.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import STRATEGIES, CacheConfig, ConfigError, ModelConfig, ParallelConfig

__all__ = ["HeadLayout", "head_layout", "validate_layout", "comm_bytes_formula", "wire_bytes_formula",
           "collectives_formula"]


@dataclass(frozen=True)
class HeadLayout:
    """Heads one rank stores (KV) and computes (query); contiguous ranges in global numbering."""

    kv_heads: tuple[int, ...]
    q_heads: tuple[int, ...]
    replication: int
    """Copies of each KV head across ranks (1 = partitioned or ``sequence``; world_size = ``replicated``)."""


def validate_layout(model: ModelConfig, parallel: ParallelConfig, cache: CacheConfig | None = None) -> None:
    """Raise :class:`ConfigError` (every problem, valid choices named) if the layout cannot run.

    Call it before launching ranks: a bad layout must fail in the parent, not inside a process group.
    """
    problems: list[str] = []
    if parallel.strategy not in STRATEGIES:
        problems.append(f"strategy={parallel.strategy!r} is not valid; choose one of "
                        f"{', '.join(map(repr, STRATEGIES))}")
    else:
        try:
            parallel.check_model(model)
        except ValueError as e:
            problems.append(str(e))
    if cache is not None:
        try:
            cache.check_head_dim(model.head_dim)
        except ValueError as e:
            problems.append(str(e))
        if cache.residual and parallel.strategy == "sequence" and parallel.world_size > 1:
            problems.append(f"residual={cache.residual} keeps a sequence's newest tokens in one full-precision "
                            f"window, which 'sequence' sharding would split across ranks; use residual=0 or "
                            f"strategy 'heads' / 'replicated'")
    if problems:
        raise ConfigError(problems, where=f"strategy={parallel.strategy!r}, world_size={parallel.world_size}")


def head_layout(model: ModelConfig, parallel: ParallelConfig, rank: int) -> HeadLayout:
    """The heads ``rank`` holds under ``parallel.strategy`` (layout assumed valid)."""
    kv, hq, ws = model.n_kv_heads, model.n_heads, parallel.world_size
    if not 0 <= rank < ws:
        raise ValueError(f"rank={rank} out of range for world_size={ws}")
    if parallel.strategy != "heads" or ws == 1:
        return HeadLayout(tuple(range(kv)), tuple(range(hq)), ws if parallel.strategy == "replicated" else 1)
    q_per_rank = hq // ws
    q = tuple(range(rank * q_per_rank, (rank + 1) * q_per_rank))
    if kv % ws == 0:
        per = kv // ws
        return HeadLayout(tuple(range(rank * per, (rank + 1) * per)), q, 1)
    rep = ws // kv
    return HeadLayout((rank // rep,), q, rep)


def comm_bytes_formula(strategy: str, *, world_size: int, batch: int, n_heads: int, head_dim: int,
                       element_size: int = 4) -> int:
    """Bytes one rank hands to collectives per layer per decode step (what the ledger measures).

    - ``sequence``: one all-gather of the packed partial ``[batch, n_heads, head_dim + 1]``
      (output and its log-sum-exp) -> ``batch * n_heads * (head_dim + 1) * element_size``,
      independent of the context length.
    - ``heads``: one all-gather of the rank's query heads' output ``[batch, n_heads / world_size,
      head_dim]`` -> ``batch * n_heads / world_size * head_dim * element_size``.
    - ``replicated`` and world_size 1: 0 (no collective).
    """
    if world_size == 1 or strategy == "replicated":
        return 0
    if strategy == "sequence":
        return batch * n_heads * (head_dim + 1) * element_size
    if strategy == "heads":
        return batch * (n_heads // world_size) * head_dim * element_size
    raise ValueError(f"strategy={strategy!r} is not valid; choose one of {', '.join(map(repr, STRATEGIES))}")


def wire_bytes_formula(strategy: str, *, world_size: int, batch: int, n_heads: int, head_dim: int,
                       element_size: int = 4) -> int:
    """Bytes one rank *sends on the wire* per layer per decode step with a ring all-gather.

    A ring all-gather forwards ``world_size - 1`` chunks per rank, so this is
    ``(world_size - 1) * comm_bytes_formula(...)`` (the backend's message headers come on top;
    the measured ``wire_bytes_sent`` includes them).
    """
    return (world_size - 1) * comm_bytes_formula(strategy, world_size=world_size, batch=batch, n_heads=n_heads,
                                                 head_dim=head_dim, element_size=element_size)


def collectives_formula(strategy: str, *, world_size: int) -> int:
    """Collectives per layer per decode step: one all-gather when sharded, none otherwise."""
    return 0 if world_size == 1 or strategy == "replicated" else 1
