"""One rank's share of a sharded KV cache: encoded pages addressed by directory block id.

Each rank keeps, per layer, the K and V pages of the blocks it owns (``sequence``) or of every
block for its KV heads (``heads`` / ``replicated``), encoded with the cache's codec through
:class:`ryzlab.kv.codecs.KVFormat`, so a codec applies per shard. The precision policy is the
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

from .codecs import Encoded, KVFormat

__all__ = ["ShardStore", "partial_attention"]

log = logging.getLogger(__name__)

_INITIAL_BLOCKS = 16  # unbounded stores start here and double


class _Pages:
    """K or V pages: payload ``[L, cap, bs, H, Dp]`` + scales/zero points ``[L, cap, sT, sH, nG]``."""

    def __init__(self, fmt: KVFormat, layers: int, cap: int, bs: int, heads: int, head_dim: int,
                 device: torch.device):
        self.fmt, self.bs, self.heads, self.head_dim = fmt, bs, heads, head_dim
        self.dp = fmt.packed_dim(head_dim)
        self.scale_shape = fmt.scale_shape(bs, heads, head_dim)
        self.payload = torch.zeros(layers, cap, bs, heads, self.dp, dtype=fmt.storage_dtype, device=device)
        # scale dtype is the codec's choice (float16, or E8M0 exponent bytes for fp8)
        sdt = getattr(fmt, "scale_dtype", torch.float16)
        self.scale = torch.ones(layers, cap, *self.scale_shape, dtype=sdt, device=device) if fmt.quantized else None
        self.zero = (torch.zeros(layers, cap, *self.scale_shape, dtype=torch.float16, device=device)
                     if fmt.has_zero else None)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.payload, self.scale, self.zero) if t is not None]

    def block_nbytes(self) -> int:
        """Bytes of one block, all layers: payload + scales (+ zero points)."""
        return sum(t[:, 0].numel() * t.element_size() for t in self.tensors())

    def grow(self, cap: int) -> None:
        def g(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.cat([t, t.new_zeros(t.shape[0], cap - t.shape[1], *t.shape[2:])], 1)
        self.payload, self.scale, self.zero = g(self.payload), g(self.scale), g(self.zero)

    def write_tokens(self, layer: int, phys: torch.Tensor, offs: torch.Tensor, x: torch.Tensor) -> None:
        """Token-local scales: encode ``x [N, H, D]`` and scatter to ``(phys, offs)``."""
        enc = self.fmt.encode(x)
        self.payload[layer, phys, offs] = enc.payload
        if enc.scale is not None:
            self.scale[layer, phys, offs] = enc.scale
        if enc.zero is not None:
            self.zero[layer, phys, offs] = enc.zero

    def write_block(self, layer: int, phys: int, x: torch.Tensor) -> None:
        """Encode one full block ``x [bs, H, D]`` (block-wide scales for spanning formats)."""
        enc = self.fmt.encode(x)
        self.payload[layer, phys] = enc.payload
        if enc.scale is not None:
            self.scale[layer, phys] = enc.scale
        if enc.zero is not None:
            self.zero[layer, phys] = enc.zero

    def gather(self, layer: int, phys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Decode ``phys [B, nb]`` -> ``[B, nb * bs, H, D]``."""
        b, nb = phys.shape
        enc = Encoded(self.payload[layer][phys], None if self.scale is None else self.scale[layer][phys],
                      None if self.zero is None else self.zero[layer][phys])
        return self.fmt.decode(enc, dtype).reshape(b, nb * self.bs, self.heads, self.head_dim)


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
        self.k = _Pages(key_format, n_layers, cap, block_size, heads, head_dim, self.device)
        self.v = _Pages(value_format, n_layers, cap, block_size, heads, head_dim, self.device)
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
        return self.k.block_nbytes() + self.v.block_nbytes()

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
                    self.k.write_block(layer, self._phys[b], st.k[layer])
                    self.v.write_block(layer, self._phys[b], st.v[layer])
                    st.committed.add(layer)
                    if len(st.committed) == self.n_layers:
                        del self._staged[b]
        elif block_ids:
            phys = torch.tensor([self._phys[b] for b in block_ids], dtype=torch.long, device=self.device)
            offs = torch.tensor(offsets, dtype=torch.long, device=self.device)
            self.k.write_tokens(layer, phys, offs, x_k)
            self.v.write_tokens(layer, phys, offs, x_v)
        for b in dict.fromkeys(block_ids):
            self.stamps[layer][b] = versions[b]

    def gather(self, layer: int, tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K and V of ``tables`` (block ids per sequence): ``[B, nb * bs, H, D]`` each.

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
                    k[i, j * bs:(j + 1) * bs] = st.k[layer]
                    v[i, j * bs:(j + 1) * bs] = st.v[layer]
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


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a subset of keys, with its log-sum-exp, in float32.

    ``q [B, Hq, D]``, ``k``/``v [B, S, Hkv, D]`` (GQA: query head ``j`` reads KV head
    ``j // (Hq / Hkv)``), ``mask [B, S]`` (True = key included) -> ``out [B, Hq, D]`` normalised
    over the included keys (0 where none) and ``lse [B, Hq]`` (-inf where none).
    """
    b, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, d)                            # [B, Hkv, g, D]
    s = torch.einsum("bhgd,bshd->bhgs", qg, k.float()) * scale           # [B, Hkv, g, S]
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                     # [B, Hkv, g]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.einsum("bhgs,bshd->bhgd", p, v.float())                  # [B, Hkv, g, D]
    return out.reshape(b, hq, d), lse.reshape(b, hq)
