"""Exact merge of partial attention results by log-sum-exp.

Attention over a set of keys split into parts ``P_1..P_n`` is recovered exactly from each part's
normalised output ``o_i`` and log-sum-exp ``l_i = log sum_j exp(s_j)`` of its scores::

    l = logsumexp_i l_i,    o = sum_i exp(l_i - l) * o_i

This is what lets context parallelism attend locally on each rank's blocks and exchange
only ``O(batch * heads * head_dim)`` numbers per layer. An empty part has ``l_i = -inf`` and
weight 0; if every part is empty the output is 0 (no keys) and ``l = -inf``.
"""
from __future__ import annotations

import torch

from ryzlab.parallel.comm import Comm

__all__ = ["merge_partials", "pack_partial", "unpack_partials", "merge_over_ranks"]


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``outs [P, ..., D]`` with ``lses [P, ...]`` over the first dim -> (``[..., D]``, ``[...]``)."""
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"outs {tuple(outs.shape)} and lses {tuple(lses.shape)} disagree")
    m = lses.amax(dim=0)                                        # [...]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m_safe)                                # [P, ...]; exp(-inf) = 0
    denom = w.sum(dim=0)                                        # [...]
    out = (w.unsqueeze(-1) * outs.to(w.dtype)).sum(dim=0) / denom.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1)
    lse = m_safe + torch.log(denom)                             # -inf where every part was empty
    return out.to(outs.dtype), lse


def pack_partial(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """One contiguous ``[..., D + 1]`` float32 tensor, so a merge costs a single collective."""
    return torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1)


def unpack_partials(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_partial` on a stacked ``[P, ..., D + 1]`` tensor."""
    return packed[..., :-1], packed[..., -1]


def merge_over_ranks(cp: Comm, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Context parallelism around any attention backend: each rank's ``out [N, Hq, D]`` and
    ``lse [N, Hq]`` over its own blocks -> attention over all of them (one all-gather of
    ``[N, Hq, D + 1]``, collective over ``cp``), in float32."""
    return merge_partials(*unpack_partials(cp.all_gather(pack_partial(out, lse))))[0]
