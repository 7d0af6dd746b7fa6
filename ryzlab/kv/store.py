"""One rank's KV bytes: the pages of every layer, the full-precision tail, and the transforms
applied on the way in and out (codec, rotation, pre-RoPE keys).

:class:`PageStore` knows page slots and tail rows, not sequences' progress (that is
:class:`ryzlab.kv.manager.KVCacheManager`'s) nor attention (:mod:`ryzlab.kv.attention`). It writes
a step's new K/V (quantising them: token by token for token-local scales, whole blocks when a
block fills for token-spanning ones), gathers decoded K/V for attention, copies blocks
(copy-on-write; point-to-point between cp ranks for migration) and grows with an unbounded pool.

Keys stored before RoPE (``CacheConfig.pre_rope_keys``): the store undoes RoPE on write and redoes
it at every read, with the model's own RoPE handed in as a :class:`KeyRope` (the cache cannot
know a model's RoPE by itself: it sits below the models layer).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.kv.blocks import SeqId
from ryzlab.kv.codecs import KVFormat
from ryzlab.kv.pages import LayerPages, PagedTensor
from ryzlab.kv.rotation import HeadRotation
from ryzlab.kv.step import PageLayout, Step
from ryzlab.parallel.comm import Comm

__all__ = ["PageStore", "KeyRope", "WriteSlots"]

log = logging.getLogger(__name__)

_INITIAL_SLOTS = 4  # tail rows for this many sequences at first; doubles when they run out

WriteSlots = Callable[[PagedTensor, int, torch.Tensor, torch.Tensor], None]
"""``(pages, layer in the group, slots [N], x [N, H, D])``: token-local encode into page slots."""


@dataclass(frozen=True, eq=False)
class KeyRope:
    """The model's RoPE, injected into a cache that stores keys before RoPE.

    ``inv_freq [head_dim / 2]`` on the cache's device, ``cos_sin(positions, inv_freq, dtype)`` ->
    ``(cos, sin)`` ``[..., head_dim]`` and ``apply(x, cos, sin)`` (the model's rotate-half) come
    from the model side, e.g. ``KeyRope(rope_inv_freq(cfg, device), rope_cos_sin, apply_rope)``
    with the functions of :mod:`ryzlab.models.transformer`.
    """

    inv_freq: torch.Tensor
    cos_sin: Callable[[torch.Tensor, torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """RoPE (or its inverse: the angle negated) of ``x [..., T, H, D]`` at ``positions [..., T]``."""
        cos, sin = self.cos_sin(positions, self.inv_freq, torch.float32)
        return self.apply(x.float(), cos, -sin if inverse else sin).to(x.dtype)


class PageStore:
    """Pages + tail of one rank. ``cp`` is the context-parallel group (rank ``r`` stores block
    ``b`` iff ``b % cp == r``, at page ``b // cp``); ``rope`` is required with ``pre_rope_keys``."""

    def __init__(self, model: ModelConfig, cache: CacheConfig, *, dtype: torch.dtype, device: torch.device,
                 cp: Comm, rope: KeyRope | None = None, initial_blocks: int = 16):
        if cache.pre_rope_keys and rope is None:
            raise ValueError("pre_rope_keys=True stores keys before RoPE, so the cache must redo the model's RoPE at "
                             "every read: pass rope=KeyRope(rope_inv_freq(model_cfg, device), rope_cos_sin, "
                             "apply_rope) (the model's RoPE)")
        self.dtype, self.device, self.cp = dtype, device, cp
        self.n_kv_heads, self.head_dim = model.n_kv_heads, model.head_dim
        self.block_size = bs = cache.block_size
        self.key_formats = [KVFormat(cache.codec_of(i), cache.key_granularity, cache.group_size, cache.symmetric,
                                     dtype) for i in range(model.n_layers)]
        self.value_formats = [KVFormat(cache.codec_of(i), cache.value_granularity, cache.group_size,
                                       cache.symmetric, dtype) for i in range(model.n_layers)]
        quantized = cache.any_quantized
        # One commit unit for K and V: a block if any layer needs block-wide scales, else a token.
        spans = any(f.spans_tokens for f in self.key_formats + self.value_formats)
        self.commit_unit = bs if spans else 1
        self.rotation = (HeadRotation(cache.rotation, model.head_dim, cache.rotation_seed, device)
                         if cache.rotation != "none" else None)
        self.rope = rope if cache.pre_rope_keys else None
        self.residual = cache.residual if quantized else 0  # full precision == the stored copy
        self.tail_len = max(self.residual, self.commit_unit - 1) if quantized else 0
        self.layout = PageLayout(bs, self.commit_unit, self.residual, self.tail_len, cp.rank, cp.world_size, device)
        cap = -(-(cache.num_blocks or initial_blocks) // cp.world_size)  # this rank's pages
        H, D = self.n_kv_heads, self.head_dim
        self.k = LayerPages(self.key_formats, cap, bs, H, D, device)
        self.v = LayerPages(self.value_formats, cap, bs, H, D, device)
        tail_dtype = dtype if cache.residual_dtype == "model" else getattr(torch, cache.residual_dtype)
        self.tail_k = torch.zeros(model.n_layers, _INITIAL_SLOTS, self.tail_len, H, D, dtype=tail_dtype, device=device)
        self.tail_v = torch.zeros_like(self.tail_k)
        self._free_slots = list(range(_INITIAL_SLOTS))
        self._slots: dict[SeqId, int] = {}
        self._scratch: tuple[int, int] | None = None

    # ------------------------------------------------------------------ capacity and tail rows
    def ensure_capacity(self, num_blocks: int) -> None:
        """Pages for ``num_blocks`` global block ids (this rank's share), doubling when short."""
        need = -(-num_blocks // self.cp.world_size)
        if need > self.k.capacity:
            cap = max(need, 2 * self.k.capacity)
            self.k.grow(cap)
            self.v.grow(cap)

    def add(self, seq_id: SeqId) -> None:
        """Give a new sequence its tail rows."""
        if not self._free_slots:
            n = self.tail_k.shape[1]
            self.tail_k = torch.cat([self.tail_k, torch.zeros_like(self.tail_k)], dim=1)
            self.tail_v = torch.cat([self.tail_v, torch.zeros_like(self.tail_v)], dim=1)
            self._free_slots = list(range(n, 2 * n))
        self._slots[seq_id] = self._free_slots.pop()

    def fork(self, parent: SeqId, child: SeqId) -> None:
        """``child`` gets tail rows holding a copy of ``parent``'s."""
        self.add(child)
        p, c = self._slots[parent], self._slots[child]
        self.tail_k[:, c] = self.tail_k[:, p]
        self.tail_v[:, c] = self.tail_v[:, p]

    def scratch(self, num_blocks: int) -> tuple[int, int]:
        """``(page slot, tail slot)`` that no sequence ever uses: where the padding rows of a
        fixed-shape step (a captured CUDA graph, :mod:`ryzlab.serve.graphs`) write their K/V.

        The page is one past this rank's share of ``num_blocks`` (the most the block pool hands
        out: the cache must be bounded), added once with exactly one page of growth; the tail
        slot is held for good and counted in no sequence.
        """
        if self._scratch is None:
            page = -(-num_blocks // self.cp.world_size)
            if self.k.capacity < page + 1:
                self.k.grow(page + 1)
                self.v.grow(page + 1)
            marker = ("ryzlab.kv.store", "scratch")
            self.add(marker)
            self._scratch = (page, self._slots.pop(marker))
        return self._scratch

    def drop(self, seq_id: SeqId) -> None:
        self._free_slots.append(self._slots.pop(seq_id))

    def slot(self, seq_id: SeqId) -> int:
        """Row of the sequence's tail in the tail tensors."""
        return self._slots[seq_id]

    @property
    def num_seqs(self) -> int:
        return len(self._slots)

    def nbytes(self) -> int:
        """Bytes of every storage tensor: pages (all capacity) and tail (every slot), K + V."""
        return self.k.nbytes() + self.v.nbytes() + 2 * self.tail_k.numel() * self.tail_k.element_size()

    # ------------------------------------------------------------------ block copies
    def apply(self, copies: Sequence[tuple[int, int]], num_blocks: int) -> None:
        """After the pool changed: pages for ``num_blocks`` block ids, then the ``(src, dst)`` copies."""
        self.ensure_capacity(num_blocks)
        self.copy_blocks(copies)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy block ``src``'s pages into ``dst`` for each pair (copy-on-write, migration).

        With cp > 1 a pair whose blocks live on two ranks is a point-to-point transfer; every
        rank walks the same list in the same order, so sends and receives pair up.
        """
        if not copies:
            return
        cp, me = self.cp.world_size, self.cp.rank
        if cp == 1:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.k.copy_blocks(src, dst)
            self.v.copy_blocks(src, dst)
            return
        for a, b in copies:
            so, do = a % cp, b % cp
            if so == do == me:
                idx = (torch.tensor([a // cp], device=self.device), torch.tensor([b // cp], device=self.device))
                self.k.copy_blocks(*idx)
                self.v.copy_blocks(*idx)
            elif so == me:
                for t in self.k.block_tensors(a // cp) + self.v.block_tensors(a // cp):
                    self.cp.send(t, do)
            elif do == me:
                for pages in (self.k, self.v):
                    bufs = [torch.empty_like(t) for t in pages.block_tensors(b // cp)]
                    for t in bufs:
                        self.cp.recv(t, so)
                    pages.load_block(b // cp, bufs)

    # ------------------------------------------------------------------ write
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: Step, write_slots: WriteSlots) -> None:
        """Store the step's new ``k, v [N, Hkv, D]`` (already in ``dtype``) for ``layer``.

        ``write_slots`` encodes token-local formats into page slots (the attention backend's
        writer: torch, or the Triton write kernel); whole-block commits always run in torch.
        """
        if self.rope is not None:  # RoPE undone: the key as the projection made it
            k = self.rope(k, step.positions, inverse=True)
        if self.rotation is not None:  # stored rotated, pages and tail alike
            k, v = self.rotation.apply(k), self.rotation.apply(v)
        for pages, tail, x in ((self.k, self.tail_k, k), (self.v, self.tail_v, v)):
            flat_tail = tail[layer].view(-1, self.n_kv_heads, self.head_dim)
            if self.commit_unit == 1:
                if step._own_slots.numel():
                    pt, j = pages.where(layer)
                    write_slots(pt, j, step._own_slots, x if step._own_tok is None else x[step._own_tok])
            elif step._commit_blocks.numel():
                # read the old tail BEFORE this step's tokens overwrite its ring rows; new tokens
                # are indexed after the tail rows (counted now: slots may have grown since)
                rows = flat_tail.shape[0]
                idx = torch.where(step._commit_src < 0, rows - 1 - step._commit_src, step._commit_src)
                src = torch.cat([flat_tail.to(x.dtype), x])[idx]  # [nc, bs, H, D]
                pages.write_blocks(layer, step._commit_blocks, src)
            if step._tail_dst.numel():
                flat_tail[step._tail_dst] = x[step._tail_src].to(flat_tail.dtype)

    # ------------------------------------------------------------------ read
    def tail(self, layer: int, which: str) -> torch.Tensor:
        """``layer``'s tail rows of K or V, flattened: ``[slots * tail_len, Hkv, D]``."""
        t = self.tail_k if which == "k" else self.tail_v
        return t[layer].view(-1, self.n_kv_heads, self.head_dim)

    def gather(self, layer: int, which: str, tables: torch.Tensor,
               ov: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Decoded K or V ``[B, H, S, D]`` of ``tables`` in the stored basis, tail rows overlaid."""
        pages = self.k if which == "k" else self.v
        x = pages.gather(layer, tables, self.dtype)  # [B, H, S, D]
        if ov[0].numel():
            x[ov[0], :, ov[1]] = self.tail(layer, which)[ov[2]].to(x.dtype)
        return x

    def gather_heads(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[B, H, S, D]`` in the stored basis; pre-RoPE keys come back post-RoPE in the model's basis."""
        ov = (step._ov_b, step._ov_idx, step._ov_row)
        k = self.gather(layer, "k", step._tables, ov)
        if self.rope is not None:
            k = self.keys_at(k, step._kpos)
        return k, self.gather(layer, "v", step._tables, ov)

    def keys_at(self, k: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Stored pre-RoPE keys ``[B, H, S, D]`` -> the model's basis with RoPE at ``kpos [B or 1, S]``."""
        assert self.rope is not None, "keys_at is for pre-RoPE keys only"
        if self.rotation is not None:  # RoPE and the rotation do not commute: rotate back first
            k = self.rotation.invert(k)
        return self.rope(k.transpose(1, 2), kpos).transpose(1, 2).contiguous()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors ``[..., D]`` into the basis of the stored K/V (identity without a rotation)."""
        return x if self.rotation is None else self.rotation.apply(x)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors ``[..., D]`` in the stored basis back to the model's."""
        return x if self.rotation is None else self.rotation.invert(x)
