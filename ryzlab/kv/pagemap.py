"""A plain decode step's K/V pages as plain tensors, for a compiled forward
(:meth:`ryzlab.kv.cache.PagedKVCache.decode_pages`)."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["DecodePages", "page_map"]


def page_map(store: Any, n_layers: int) -> tuple[tuple[Any, ...], tuple[tuple[int, ...], ...]]:
    """A page store's groups (each a :class:`ryzlab.kv.pages.PagedTensor` of several layers) and, per
    layer, (K group, K layer index, K group's layers, V group, V layer index, V group's layers)."""
    groups: list[Any] = []
    where = []
    for layer in range(n_layers):
        row: list[int] = []
        for side in (store.k, store.v):
            pt, j = side.where(layer)
            if all(g is not pt for g in groups):
                groups.append(pt)
            row += [next(i for i, g in enumerate(groups) if g is pt), j, pt.payload.shape[0]]
        where.append(tuple(row))
    return tuple(groups), tuple(where)


class DecodePages(NamedTuple):
    """A plain decode step's K/V pages as plain tensors (:meth:`PagedKVCache.decode_pages`), for a
    compiled forward: :meth:`write_read` is pure tensor code, so the compiler traces each layer's
    slot write and page gather into its graph (an in-place scatter into the pages and an indexed
    load fused with the layout), where an opaque operator per layer cost ~70 us of dispatch and
    Python on a CPU core (SmolLM2's 30 layers: ~2 ms a token). vLLM's CPU backend and gpt-fast
    index their caches inside the graph the same way."""

    pages: tuple[torch.Tensor, ...]
    """Each page group's payload flattened to token rows ``[layers * cap * bs, H, D]`` (views: a
    write lands in the cache)."""
    where: tuple[tuple[int, ...], ...]
    """Per layer: (K group, K layer index, K group's layers, V group, V layer index, V group's layers)."""
    slots: torch.Tensor
    """``[B]`` the new token's row within a layer's ``cap * bs`` rows, per sequence."""
    tokens: torch.Tensor
    """``[B, S]`` the rows of every key the step's sequences attend to (whole pages; the step's
    ``causal_mask[:, 0]`` says which are real)."""

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, Hkv, D]`` in the layer's slots, return its keys and values ``[B, S, Hkv, D]``."""
        gk, jk, lk, gv, jv, lv = self.where[layer]
        out = []
        for x, g, j, n in ((k, gk, jk, lk), (v, gv, jv, lv)):
            rows = self.pages[g]
            base = j * (rows.shape[0] // n)                 # the layer's first row (capacity may grow)
            rows.index_put_((self.slots + base,), x.to(rows.dtype))
            out.append(rows[self.tokens + base])
        return out[0], out[1]
