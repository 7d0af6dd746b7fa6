"""One rank's share of a sharded KV cache: encoded pages addressed by directory block id.

Each rank keeps, per layer, the K and V pages of the blocks it owns (``sequence``) or of every
block for its KV heads (``heads`` / ``replicated``) in :class:`ryzlab.kv.pages.PagedTensor` pages
encoded with the cache's codec (:class:`ryzlab.kv.codecs.KVFormat`), so a codec applies per
shard. Pages are addressed by directory block id: blocks arrive and leave in any order
(migration, eviction), which the sequence-oriented ``PagedKVCache`` pool does not offer.
The precision policy is the
one of :class:`ryzlab.kv.cache.PagedKVCache`: token-local scales are written as tokens arrive;
token-spanning scales (``tensor``/``head``/``channel``) are computed over a *full* block, so
until a block fills its tokens are staged in full precision (for K and V alike, one commit
unit as in the single-rank cache), which makes a shard's output equal the single-rank cache's.

A block's payload, scales, zero points and staged rows travel together (:meth:`ShardStore.export`
/ :meth:`ShardStore.load`) when it migrates. Per layer, the store stamps the directory version
it wrote; the sharded cache refuses to attend over a block whose stamp is stale.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .codecs import KVFormat
from .pages import PagedTensor

__all__ = ["ShardStore"]

log = logging.getLogger(__name__)

_INITIAL_BLOCKS = 16  # unbounded stores start here and double


def _block_nbytes(pages: PagedTensor) -> int:
    """Bytes of one block of ``pages``, all layers: payload + scales (+ zero points)."""
    return sum(t[:, 0].numel() * t.element_size() for t in pages.tensors())


@dataclass
class _Staged:
    """Full-precision rows of a not-yet-full block (spanning formats), K and V: ``[L, bs, H, D]``."""

    k: torch.Tensor
    v: torch.Tensor
    committed: set[int]
    """Layers whose full block has been encoded into the pages."""


class ShardStore:
    """Encoded K/V pages of one rank for ``heads`` KV heads, addressed by directory block id."""

    def __init__(self, *, n_layers: int, heads: int, head_dim: int, block_size: int, key_format: KVFormat,
                 value_format: KVFormat, dtype: torch.dtype = torch.float32, capacity: int | None = None,
                 device: str | torch.device = "cpu"):
        self.n_layers, self.heads, self.head_dim, self.block_size = n_layers, heads, head_dim, block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = capacity
        cap = capacity or _INITIAL_BLOCKS
        self.k = PagedTensor(key_format, n_layers, cap, block_size, heads, head_dim, self.device)
        self.v = PagedTensor(value_format, n_layers, cap, block_size, heads, head_dim, self.device)
        # one commit unit for K and V, as PagedKVCache: stage both if either needs block-wide scales
        self.spans = key_format.spans_tokens or value_format.spans_tokens
        self._phys: dict[int, int] = {}
        self._free = list(range(cap - 1, -1, -1))
        self._staged: dict[int, _Staged] = {}
        self.stamps: list[dict[int, int]] = [{} for _ in range(n_layers)]

    # ------------------------------------------------------------------ blocks
    def __contains__(self, block_id: int) -> bool:
        return block_id in self._phys

    def block_ids(self) -> list[int]:
        return list(self._phys)

    def block_nbytes(self) -> int:
        """Encoded bytes of one block on this rank, all layers, K + V."""
        return _block_nbytes(self.k) + _block_nbytes(self.v)

    def staging_nbytes(self) -> int:
        """Bytes of one block's full-precision staging (0 when scales are token-local)."""
        return 2 * self.n_layers * self.block_size * self.heads * self.head_dim * self.dtype.itemsize if self.spans else 0

    def _alloc(self, block_id: int) -> int:
        assert block_id not in self._phys, f"block {block_id} allocated twice on this rank"
        if not self._free:
            if self.capacity is not None:
                raise RuntimeError(f"shard store full ({self.capacity} blocks): the directory let a rank "
                                   f"exceed its capacity")
            old = self.k.payload.shape[1]
            self.k.grow(2 * old)
            self.v.grow(2 * old)
            self._free = list(range(2 * old - 1, old - 1, -1))
        p = self._free.pop()
        self._phys[block_id] = p
        if self.spans:
            z = torch.zeros(self.n_layers, self.block_size, self.heads, self.head_dim, dtype=self.dtype,
                            device=self.device)
            self._staged[block_id] = _Staged(z, z.clone(), set())
        return p

    def release(self, block_id: int) -> None:
        """Forget a block (evicted or migrated away): its stamps go, its page is reusable."""
        self._free.append(self._phys.pop(block_id))
        self._staged.pop(block_id, None)
        for st in self.stamps:
            st.pop(block_id, None)

    # ------------------------------------------------------------------ write / read
    def write(self, layer: int, block_ids: list[int], offsets: list[int], x_k: torch.Tensor, x_v: torch.Tensor,
              versions: dict[int, int], full: set[int]) -> None:
        """Store rows ``x [N, H, D]`` at ``(block_ids[i], offsets[i])``; stamp ``versions`` for ``layer``.

        ``full``: blocks that hold ``block_size`` tokens after this write (their staged rows are
        encoded now, with block-wide scales, exactly when the single-rank cache does it).
        """
        for b in dict.fromkeys(block_ids):
            if b not in self._phys:
                self._alloc(b)
        if self.spans:
            for i, (b, o) in enumerate(zip(block_ids, offsets)):
                st = self._staged[b]
                st.k[layer, o] = x_k[i]
                st.v[layer, o] = x_v[i]
            for b in dict.fromkeys(block_ids):
                if b in full:
                    st = self._staged[b]
                    blk = torch.tensor([self._phys[b]], dtype=torch.long, device=self.device)
                    self.k.write_blocks(layer, blk, st.k[layer][None])
                    self.v.write_blocks(layer, blk, st.v[layer][None])
                    st.committed.add(layer)
                    if len(st.committed) == self.n_layers:
                        del self._staged[b]
        elif block_ids:
            slots = torch.tensor([self._phys[b] * self.block_size + o for b, o in zip(block_ids, offsets)],
                                 dtype=torch.long, device=self.device)
            self.k.write_slots(layer, slots, x_k)
            self.v.write_slots(layer, slots, x_v)
        for b in dict.fromkeys(block_ids):
            self.stamps[layer][b] = versions[b]

    def gather(self, layer: int, tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K and V of ``tables`` (block ids per sequence): ``[B, H, nb * bs, D]`` each.

        Shorter tables are padded with this rank's first page (mask it out by token count).
        """
        nb = max([len(t) for t in tables] + [1])
        rows = [[self._phys[b] for b in t] + [0] * (nb - len(t)) for t in tables]
        phys = torch.tensor(rows, dtype=torch.long, device=self.device).reshape(len(tables), nb)
        k = self.k.gather(layer, phys, self.dtype)
        v = self.v.gather(layer, phys, self.dtype)
        bs = self.block_size
        for i, t in enumerate(tables):
            for j, b in enumerate(t):
                st = self._staged.get(b)
                if st is not None and layer not in st.committed:  # partial block: full precision
                    k[i, :, j * bs:(j + 1) * bs] = st.k[layer].transpose(0, 1)
                    v[i, :, j * bs:(j + 1) * bs] = st.v[layer].transpose(0, 1)
        return k, v

    # ------------------------------------------------------------------ migration
    def _parts(self, block_id: int, staged: bool) -> list[torch.Tensor]:
        p = self._phys[block_id]
        parts = [t[:, p] for t in self.k.tensors() + self.v.tensors()]
        if staged:
            st = self._staged[block_id]
            parts += [st.k, st.v]
        return parts

    def export_nbytes(self, staged: bool) -> int:
        """Size of :meth:`export` for one block (known to both ends before the transfer)."""
        return self.block_nbytes() + (self.staging_nbytes() if staged else 0)

    def export(self, block_id: int) -> torch.Tensor:
        """Payload + scales + zero points (+ staged rows) of one block, all layers, as bytes."""
        staged = block_id in self._staged
        return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in self._parts(block_id, staged)])

    def load(self, block_id: int, data: torch.Tensor, version: int, staged: bool) -> None:
        """Inverse of :meth:`export` on the receiving rank; stamps every layer with ``version``."""
        self._alloc(block_id)
        if not staged:
            self._staged.pop(block_id, None)
        pos = 0
        p = self._phys[block_id]
        targets = [t[:, p] for t in self.k.tensors() + self.v.tensors()]
        for t in targets:
            n = t.numel() * t.element_size()
            t.copy_(data[pos:pos + n].view(t.dtype).reshape(t.shape))
            pos += n
        if staged:
            st = self._staged[block_id]
            for t in (st.k, st.v):
                n = t.numel() * t.element_size()
                t.copy_(data[pos:pos + n].view(t.dtype).reshape(t.shape))
                pos += n
        assert pos == data.numel(), f"migration payload of block {block_id}: {data.numel()} bytes, used {pos}"
        for st in self.stamps:
            st[block_id] = version

    # ------------------------------------------------------------------ ledger
    def ledger(self, tokens_per_block: dict[int, int]) -> dict[str, float]:
        """Bytes this rank holds for its live blocks: payload, scales, padding, staging, total."""
        per_tok_payload = sum(t[:, 0, 0].numel() * t.element_size() for t in (self.k.payload, self.v.payload))
        blocks = len(self._phys)
        tokens = sum(tokens_per_block.get(b, 0) for b in self._phys)
        payload = float(tokens * per_tok_payload)
        block_bytes = blocks * self.block_nbytes()
        padding = float((blocks * self.block_size - tokens) * per_tok_payload)
        scales = float(block_bytes - payload - padding)
        staging = float(len(self._staged) * self.staging_nbytes())
        return {"payload": payload, "scales": scales, "padding": padding, "staging": staging,
                "total": payload + scales + padding + staging, "blocks": float(blocks), "tokens": float(tokens),
                "allocated": float(sum(t.numel() * t.element_size() for t in self.k.tensors() + self.v.tensors()))}

