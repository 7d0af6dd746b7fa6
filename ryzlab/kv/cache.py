"""Paged, optionally compressed KV cache with attention over the pages (pure torch, CPU/CUDA).

The model-facing flow: one :meth:`PagedKVCache.extend` per forward step plans the step
(positions, slot mapping, what to quantise), then per layer ``write`` + ``attend``::

    cache = PagedKVCache(ModelConfig(), CacheConfig(codec="int8", block_size=16))
    cached = cache.add_sequence("a", prompt_ids)   # prefix tokens already cached: skip them
    step = cache.extend(["a"])                      # this step writes prompt_ids[cached:]
    h = embed(prompt_ids[cached:])                  # [N, dim]; step.positions [N] for RoPE
    for layer in range(model.n_layers):
        q, k, v = qkv(layer, h, step.positions)     # [N, Hq, D], [N, Hkv, D], [N, Hkv, D]
        cache.write(layer, k, v)                    # stores (quantises) the new tokens
        h = block_rest(layer, cache.attend(layer, q))   # [N, Hq, D], causal over the pages
    step = cache.extend(["a"], [[next_id]])         # decode: append one token, same loop
    cache.free("a")

A batch is ragged and flat (vLLM style): the ``N`` new tokens of every sequence in
``step.seq_ids`` order. A ``[B, T, H, D]`` tensor is accepted when every sequence writes T.

Storage and precision. Per layer, K and V pages hold ``[num_blocks, block_size, H, Dp]``
payload plus scales (see :mod:`ryzlab.kv.codecs`). Attention always reads what the cache
stores (prefill included), so paged attention equals dense attention on the decoded K/V.
Token-local scales (``token_head``, ``group``) are written as tokens arrive. Token-spanning
scales (``tensor``, ``head``, ``channel``) are computed over one *full block* when it fills
(KIVI-style): until then that block's tokens live only in a per-sequence full-precision
*tail*. The tail also holds the ``residual`` most recent tokens (read in full precision
instead of the quantised copy), so it has ``max(residual, block_size - 1)`` rows (or
``residual`` rows with token-local scales). Codec ``none`` has no tail. The ledger counts
the tail as ``residual`` bytes: the staging cost of token-spanning scales is not hidden.

Contract. ``extend`` commits the bookkeeping at once (``num_written`` advances, full blocks
enter the prefix cache), so the caller must ``write`` every layer of a step before planning
the next one; a sequence whose prompt hits cached blocks reads their quantised copy (it never
wrote them, so they are not in its tail). Shortage (bounded ``num_blocks``) returns None from
``add_sequence`` / ``extend`` with nothing changed; misuse raises ``ValueError``.

Mixed precision and rotation. ``CacheConfig.layer_codecs`` gives each layer its own codec
(the pages of layers sharing a format share one allocation: :class:`LayerPages`). With
``CacheConfig.rotation`` every K/V head vector is rotated (:mod:`ryzlab.kv.rotation`) before it
is stored — pages and tail alike; :meth:`attend` rotates the queries the same way and its output
back, so only this step's ``[N, Hq, D]`` queries are touched; :meth:`gather` and
:meth:`read_kv` return K/V in the model's basis unless asked for the rotated one.

Pre-RoPE keys (``CacheConfig.pre_rope_keys``): the keys are stored before RoPE and RoPE is
redone at every read, with the model's RoPE passed in as ``rope=`` (a
:class:`ryzlab.kv.store.KeyRope`); without it such a cache raises ``ValueError``.

Context parallelism: built with ``cp=`` (the :class:`ryzlab.parallel.comm.Comm` of the cp
group), the cache's :class:`BlockPool` is sharded (block ``b`` lives on cp rank ``b % cp``) and
replicated: every rank plans the same steps, stores only its own blocks (``num_blocks / cp``
pages), attends over them with log-sum-exp, and one all-gather of the packed partials
``[N, Hq, D + 1]`` per layer is merged exactly (:func:`ryzlab.kv.merge.merge_partials`) into
what one rank holding everything computes. The full-precision tail (residual window, open
block) is small and kept by every cp rank; each reads only the positions of its own blocks.
Migration, rebalancing and cross-rank coherency checks: :mod:`ryzlab.kv.context`.

The parts (vLLM v1's seam): :class:`ryzlab.kv.manager.KVCacheManager` keeps the bookkeeping
(blocks, prefix cache, each sequence's progress; no tensors), :class:`ryzlab.kv.store.PageStore`
this rank's bytes (pages, tail, codec / rotation / pre-RoPE transforms), :mod:`ryzlab.kv.step`
plans a step from both, :mod:`ryzlab.kv.attention` holds the backends (torch, Triton), and
context parallelism is the log-sum-exp merge around them. :class:`PagedKVCache` composes them
behind the model-facing API above.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.kv.attention import KERNELS, Kernel, decode_attention, pick_backend
from ryzlab.kv.blocks import BlockPool, SeqId
from ryzlab.kv.codecs import KVFormat
from ryzlab.kv.ledger import codec_bytes_per_token, paged_ledger
from ryzlab.kv.manager import KVCacheManager
from ryzlab.kv.merge import merge_over_ranks
from ryzlab.kv.pagemap import DecodePages, page_map
from ryzlab.kv.pages import LayerPages
from ryzlab.kv.step import Step, gather_plan, plan_step
from ryzlab.kv.store import KeyRope, PageStore
from ryzlab.parallel.comm import Comm

__all__ = ["PagedKVCache", "Step"]

log = logging.getLogger(__name__)


class PagedKVCache:
    """Per-layer paged K/V storage with its block bookkeeping, and attention over the pages.

    ``dtype`` is the model's compute dtype (what ``none`` stores, what the tail holds and what
    attention returns); ``device`` holds every tensor. ``model`` is the shape this rank computes
    (under tensor parallelism: :func:`ryzlab.parallel.tp.local_config`, its own heads); ``cp``
    the context-parallel group (None: one rank holds every block). ``rope`` is the model's RoPE,
    required when ``cache.pre_rope_keys`` (see the module doc). Raises ``ValueError`` if the
    cache layout does not fit the model (e.g. a group size that does not divide head_dim).

    ``kernel`` picks the attention path: ``torch`` decodes pages then runs matmuls/SDPA (the
    reference, and the CPU path); ``triton`` reads the compressed pages in
    :mod:`ryzlab.kv.triton` kernels (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests);
    ``auto`` is ``triton`` on CUDA when Triton is installed, else ``torch``. The attribute
    ``kernel`` says which one runs; experiments record it in every row.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", cp: Comm | None = None, kernel: Kernel = "auto",
                 rope: KeyRope | None = None):
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not valid; choose one of {', '.join(KERNELS)}")
        cache.check_head_dim(model.head_dim)
        cache.check_layers(model.n_layers)
        self.model, self.config = model, cache
        self.dtype, self.device = dtype, torch.device(device)
        self.n_layers, self.n_kv_heads, self.head_dim = model.n_layers, model.n_kv_heads, model.head_dim
        self.block_size = cache.block_size
        self.cp = cp if cp is not None else Comm(local=True)
        self.cp_rank, self.cp_size = self.cp.rank, self.cp.world_size
        self.manager = KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching,
                                      shards=self.cp_size)
        self.store = PageStore(model, cache, dtype=dtype, device=self.device, cp=self.cp, rope=rope)
        st = self.store
        self.key_formats, self.value_formats = st.key_formats, st.value_formats
        self.key_format, self.value_format = self.key_formats[0], self.value_formats[0]  # layer 0's
        self.commit_unit, self.residual, self.tail_len, self.rotation = (st.commit_unit, st.residual, st.tail_len,
                                                                         st.rotation)
        self.backend = pick_backend(kernel, self.device, [*self.key_formats, *self.value_formats],
                                    pre_rope=st.rope is not None)
        self.kernel = self.backend.name
        self._step: Step | None = None
        # pages a decode step can write and read with a handful of tensor ops (write_attend): one
        # rank, the model dtype stored as is, no rotation / pre-RoPE keys / tail, the torch backend
        self._plain = (self.cp_size == 1 and st.rope is None and self.rotation is None and self.commit_unit == 1
                       and self.tail_len == 0 and self.kernel == "torch"
                       and not any(f.quantized for f in (*self.key_formats, *self.value_formats)))
        self._page_map: tuple[tuple[Any, ...], tuple[tuple[int, ...], ...]] | None = None   # page_map, once
        log.debug("PagedKVCache: %s, commit unit %d, tail %d rows", cache, self.commit_unit, self.tail_len)

    # ------------------------------------------------------------------ the parts, for inspection
    @property
    def pool(self) -> BlockPool:
        """The block pool under the manager (blocks, free queue, prefix cache, shards)."""
        return self.manager.pool

    @property
    def k(self) -> LayerPages:
        return self.store.k

    @property
    def v(self) -> LayerPages:
        return self.store.v

    @property
    def num_blocks(self) -> int | None:
        """Blocks the cache may hold in all, over every cp rank (None = unbounded)."""
        return self.manager.num_blocks

    @property
    def capacity_tokens(self) -> int | None:
        """Tokens the whole cache holds (None = unbounded): ``num_blocks * block_size``."""
        return self.manager.capacity_tokens

    def evict_cached(self, num_blocks: int | None = None) -> int:
        """Drop the prefix-cache entries of up to ``num_blocks`` free blocks (None = all); how many.

        Call it when the cached blocks may not hold what their hashes say: a forward step that
        failed after :meth:`extend` registered blocks it never wrote, or new model weights.
        """
        return self.manager.evict_cached(num_blocks)

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: SeqId, token_ids: Sequence[int] | int) -> int | None:
        """Register a prompt (ids, or a count when ids are unknown: no prefix caching).

        Returns how many leading tokens are already cached (their KV is reused; the next
        :meth:`extend` writes only the rest), or None when the pool is short of blocks
        (nothing changed: preempt or evict, then retry).
        """
        cached = self.manager.add_sequence(seq_id, token_ids)
        if cached is None:
            return None
        self.store.ensure_capacity(self.manager.num_allocated_blocks)
        self.store.add(seq_id)
        return cached

    def allocate_slots(self, seq_id: SeqId, token_ids: Sequence[int]) -> list[int] | None:
        """The scheduler's one call (vLLM's ``allocate_slots``): room for ``token_ids`` or None.

        A new ``seq_id`` is registered with ``token_ids`` as its prompt (prefix-cache hits are
        reused: :meth:`num_cached_tokens` tells how many); a live one gets them appended. Returns
        the block ids this call added (possibly none), or None when the pool is short of blocks
        (nothing changed: preempt or wait). The next :meth:`extend` (with ``num_write``) writes
        their K/V. Under context parallelism every rank makes the same calls in the same order.
        """
        if seq_id not in self.manager:
            if self.add_sequence(seq_id, token_ids) is None:
                return None
            return self.manager.block_table(seq_id)
        res = self.manager.allocate_slots(seq_id, token_ids)
        if res is None:
            return None
        self.store.apply(res[1], self.manager.num_allocated_blocks)
        return res[0]

    def fork(self, parent: SeqId, child: SeqId) -> None:
        """``child`` shares every block of ``parent`` (copy-on-write on its first append)."""
        self.manager.fork(parent, child)
        self.store.fork(parent, child)

    def free(self, seq_id: SeqId) -> None:
        """Drop a sequence; its written full blocks stay in the prefix cache until reused."""
        self.manager.free(seq_id)
        self.store.drop(seq_id)

    def seq_ids(self) -> list[SeqId]:
        return self.manager.seq_ids()

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self.manager

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens of a sequence, written or pending."""
        return self.manager.num_tokens(seq_id)

    def num_written(self, seq_id: SeqId) -> int:
        """Tokens whose KV has been planned by :meth:`extend` (and written by ``write``)."""
        return self.manager.num_written(seq_id)

    def num_cached_tokens(self, seq_id: SeqId) -> int:
        return self.manager.num_cached_tokens(seq_id)

    def block_table(self, seq_id: SeqId) -> list[int]:
        return self.manager.block_table(seq_id)

    def extend(self, seq_ids: Sequence[SeqId], new_tokens: Sequence[Sequence[int] | int] | None = None, *,
               num_write: Sequence[int] | None = None) -> Step | None:
        """Append ``new_tokens`` (ids or counts) per sequence and plan the step that writes them.

        The step writes every pending token of each sequence (prompt tokens after
        :meth:`add_sequence`, plus the new ones), or at most ``num_write[i]`` of them (chunked
        prefill). Returns None if the pool cannot hold the new tokens: nothing changed.
        Copy-on-write copies are applied to the tensors here. The caller must then call
        :meth:`write` for every layer before the next ``extend``.
        """
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in one step: {seq_ids}")
        states = [self.manager.progress(s) for s in seq_ids]
        toks: list[Sequence[int] | int] = list(new_tokens) if new_tokens is not None else [0] * len(seq_ids)
        if len(toks) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(toks)} token lists")
        if num_write is not None and len(num_write) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(num_write)} num_write values")
        copies = self.manager.append(seq_ids, toks)
        if copies is None:
            return None
        self.store.apply(copies, self.manager.num_allocated_blocks)
        starts, writes = [], []
        for i, (s, st) in enumerate(zip(seq_ids, states)):
            pending = self.manager.pending(s)
            w = pending if num_write is None else num_write[i]
            if not 0 <= w <= pending:
                raise ValueError(f"num_write[{i}]={w} for {s!r}, which has {pending} pending tokens")
            starts.append(st.num_written)
            writes.append(w)
        step = plan_step(self.store.layout, seq_ids, [self.pool.block_table(s) for s in seq_ids],
                         [st.tail_start for st in states], [self.store.slot(s) for s in seq_ids], starts, writes)
        for s, w in zip(seq_ids, writes):
            self.manager.commit(s, w)
        self._step = step
        return step

    def restore(self, seq_id: SeqId, k: torch.Tensor, v: torch.Tensor) -> Step:
        """Write back a sequence's K/V read out earlier with :meth:`read_kv` (swap-in).

        ``k, v [L, n, Hkv, D]`` (any device) hold at least the sequence's :meth:`num_tokens`
        tokens; the pending ones (those not already cached) are planned as one step and written
        for every layer. Allocate the sequence first (:meth:`allocate_slots` with its tokens).
        """
        a, n = self.num_written(seq_id), self.num_tokens(seq_id)
        if k.shape != v.shape or k.dim() != 4 or k.shape[0] != self.n_layers or k.shape[1] < n:
            raise ValueError(f"restore({seq_id!r}) needs k and v of shape [{self.n_layers}, >= {n}, "
                             f"{self.n_kv_heads}, {self.head_dim}]; got {tuple(k.shape)} and {tuple(v.shape)}")
        step = self.extend([seq_id], None, num_write=[n - a])
        assert step is not None, "a step that appends no token needs no block"
        for layer in range(self.n_layers):
            self.write(layer, k[layer, a:n].to(self.device), v[layer, a:n].to(self.device))
        return step

    # ------------------------------------------------------------------ per layer
    def _flat(self, x: torch.Tensor, step: Step, name: str, heads: int) -> tuple[torch.Tensor, bool]:
        """Accept ``[N, H, D]`` or ``[B, T, H, D]`` (every sequence writing T tokens)."""
        if x.dim() == 4:
            if x.shape[0] != len(step.seq_ids) or any(t != x.shape[1] for t in step.query_lens):
                raise ValueError(f"{name} has shape {tuple(x.shape)} but the step writes {step.query_lens} "
                                 f"tokens for {len(step.seq_ids)} sequences; pass [N, H, D] for ragged batches")
            x = x.reshape(-1, *x.shape[2:])
            four_d = True
        else:
            four_d = False
        if x.dim() != 3 or x.shape[0] != step.num_tokens or x.shape[1] != heads or x.shape[2] != self.head_dim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [{step.num_tokens}, {heads}, "
                             f"{self.head_dim}] (N new tokens, heads, head_dim)")
        return x, four_d

    def _current(self, step: Step | None) -> Step:
        step = step or self._step
        if step is None:
            raise ValueError("no step planned: call extend() before write()/attend()")
        return step

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, step: Step | None = None) -> None:
        """Store the step's new keys/values ``[N, Hkv, D]`` for ``layer`` (quantising them)."""
        step = self._current(step)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer={layer} out of range [0, {self.n_layers})")
        k, _ = self._flat(k, step, "k", self.n_kv_heads)
        v, _ = self._flat(v, step, "v", self.n_kv_heads)
        self.store.write(layer, k.to(self.dtype), v.to(self.dtype), step, self.backend.write_slots)

    def gather(self, layer: int, *, step: Step | None = None, heads_first: bool = False,
               rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values the step attends to, position-aligned, in ``dtype``.

        ``[B, S, Hkv, D]`` each, or contiguous ``[B, Hkv, S, D]`` with ``heads_first`` (what a
        Hugging Face attention layer wants back from its cache). ``S`` is the longest context
        rounded up to whole blocks; positions ``>= context_lens[b]`` are padding. One cp rank only
        (with cp > 1 no rank holds every position). With a rotation, K/V come back in the model's
        basis (one ``[D, D]`` product per cached vector) unless ``rotated=True``: then the caller
        rotates its queries with :meth:`rotate` and its output back with :meth:`unrotate`.
        """
        self._single_rank("gather")
        pre_rope = self.store.rope is not None
        if rotated and pre_rope:
            raise ValueError("pre_rope_keys: keys come back post-RoPE in the model's basis; use rotated=False")
        k, v = self.store.gather_heads(layer, self._current(step))
        if self.rotation is not None and not rotated:
            v = self.rotation.invert(v)
            k = k if pre_rope else self.rotation.invert(k)
        return (k, v) if heads_first else (k.transpose(1, 2), v.transpose(1, 2))

    def attend(self, layer: int, q: torch.Tensor, *, step: Step | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Causal attention of the step's queries ``[N, Hq, D]`` over the cache -> ``[N, Hq, D]``.

        Each query at position ``p`` sees keys ``0..p`` of its own sequence (cached prefix plus
        this step's tokens), GQA included. The backend (``kernel``) attends over this rank's
        blocks; with cp > 1 every rank's partial (with its log-sum-exp) is all-gathered as one
        ``[N, Hq, D + 1]`` tensor and merged exactly.
        """
        step = self._current(step)
        q, four_d = self._flat(q, step, "q", self.model.n_heads)
        if not step.num_tokens:
            return q.new_zeros(q.shape)
        if self.rotation is not None:  # scores need q in the keys' basis; the output is rotated back
            qk = q if self.store.rope is not None else self.rotation.apply(q)  # pre-RoPE keys: model basis
            out = self.rotation.invert(self._attend(layer, qk, step, scale))
        else:
            out = self._attend(layer, q, step, scale)
        return out.view(len(step.seq_ids), -1, *out.shape[1:]) if four_d else out

    def write_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     step: Step | None = None, scale: float | None = None) -> torch.Tensor:
        """:meth:`write` of ``k, v [N, Hkv, D]`` then :meth:`attend` of ``q [N, Hq, D]``: a model's one call per layer.

        A decode step over plain pages (:meth:`plain_decode`) takes a short path: :meth:`write_gather`
        and :func:`ryzlab.kv.attention.decode_attention`, none of the general path's per-call
        planning (~65 vs ~120 us per layer on a CPU core, which a 30-layer model pays every token);
        the same bits as :meth:`attend`.
        """
        step = self._current(step)
        if not self.plain_decode(step):
            self.write(layer, k, v, step=step)
            return self.attend(layer, q, step=step, scale=scale)
        hq = self.model.n_heads
        if q.shape != (len(step.seq_ids), hq, self.head_dim):
            raise ValueError(f"q has shape {tuple(q.shape)}; expected [{len(step.seq_ids)}, {hq}, {self.head_dim}]")
        keys, values = self.write_gather(layer, k, v, step=step)
        return decode_attention(q, keys, values, step.causal_mask[:, 0], scale)

    def plain_decode(self, step: Step | None = None) -> bool:
        """Whether ``step`` (default: the current one) is a decode step (one new token per sequence)
        over plain pages: one rank, the model dtype stored as is (``none``), no rotation, pre-RoPE
        keys or tail, the torch backend -- where :meth:`write_gather` serves."""
        step = self._current(step)
        return self._plain and step.is_decode and step.num_tokens > 0

    def write_gather(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, step: Step | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A :meth:`plain_decode` step: store ``k, v [B, Hkv, D]`` in their slots, return every
        layer-``layer`` key and value the step's sequences attend to, heads first, ``[B, Hkv, S, D]``
        each, contiguous, in the model dtype (``S``: the longest context rounded up to whole
        blocks; position ``s`` is key ``s``; which are real: ``step.causal_mask[:, 0]``, ``[B, S]``).
        Two slot writes and two page gathers, laid out as the general path decodes pages (so the
        attention's products, and the greedy tokens, are the same to the bit)."""
        step = self._current(step)
        if not self.plain_decode(step):
            raise ValueError("write_gather serves a decode step over plain pages (one rank, codec 'none', no "
                             "rotation, tail or pre-RoPE keys, torch kernel); use write() and attend()")
        b, hkv, d = len(step.seq_ids), self.n_kv_heads, self.head_dim
        if k.shape != (b, hkv, d) or v.shape != (b, hkv, d):
            raise ValueError(f"a decode step of {b} sequences writes k, v [{b}, {hkv}, {d}]; got "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        (pk, jk), (pv, jv) = self.store.k.where(layer), self.store.v.where(layer)
        kp, vp = pk.payload[jk], pv.payload[jv]                                     # [cap, bs, Hkv, D]
        slots, tables = step._own_slots, step._tables                               # [B], [B, nb]
        kp.view(-1, hkv, d)[slots] = k.to(kp.dtype)
        vp.view(-1, hkv, d)[slots] = v.to(vp.dtype)
        flat, nb, bs = tables.reshape(-1), tables.shape[1], self.block_size

        def gather(pages: torch.Tensor) -> torch.Tensor:
            x = pages.index_select(0, flat)                                         # [B * nb, bs, Hkv, D]
            return x.view(b, nb, bs, hkv, d).permute(0, 3, 1, 2, 4).contiguous().view(b, hkv, nb * bs, d)

        return gather(kp), gather(vp)

    def decode_pages(self, step: Step | None = None) -> DecodePages:
        """A :meth:`plain_decode` step's pages as tensors a compiled forward indexes itself (no
        operator per layer, no Python): see :class:`DecodePages`. The same slots and pages
        :meth:`write_gather` writes and reads."""
        step = self._current(step)
        if not self.plain_decode(step):
            raise ValueError("decode_pages serves a decode step over plain pages (one rank, codec 'none', no "
                             "rotation, tail or pre-RoPE keys, torch kernel); use write() and attend()")
        if self._page_map is None:
            self._page_map = page_map(self.store, self.n_layers)
        groups, where = self._page_map
        tables = step._tables                                                       # [B, nb]
        bs = self.block_size
        tokens = (tables[:, :, None] * bs + torch.arange(bs, device=tables.device)).view(tables.shape[0], -1)
        return DecodePages(tuple(g.payload.view(-1, g.heads, g.dp) for g in groups), where, step._own_slots, tokens)

    def _attend(self, layer: int, q: torch.Tensor, step: Step, scale: float | None) -> torch.Tensor:
        out, lse = self.backend.attend(self.store, layer, q, step, scale, with_lse=self.cp_size > 1)
        if self.cp_size > 1:
            assert lse is not None, f"{self.kernel} backend returned no log-sum-exp for the cp merge"
            out = merge_over_ranks(self.cp, out, lse)
        return out.to(q.dtype)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Queries ``[..., D]`` into the basis of the stored keys (identity without a rotation)."""
        return self.store.rotate(x)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output ``[..., D]`` over stored values back to the model's basis."""
        return self.store.unrotate(x)

    def _single_rank(self, what: str) -> None:
        if self.cp_size > 1:
            raise ValueError(f"{what} reads every position of a sequence, which no rank holds under context "
                             f"parallelism (cp={self.cp_size}); use attend()")

    # ------------------------------------------------------------------ inspection
    def read_kv(self, seq_id: SeqId, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K and V of the written tokens, exactly as attention sees them.

        ``[n, Hkv, D]`` each for one layer, ``[L, n, Hkv, D]`` for ``layer=None``. For the
        accuracy harness (reconstruction error against the unquantised K/V) and swap-out. One
        cp rank only.
        """
        self._single_rank("read_kv")
        st = self.manager.progress(seq_id)
        n = st.num_written
        tables, kpos, *ov = gather_plan(self.store.layout, [self.pool.block_table(seq_id)], [st.tail_start],
                                        [self.store.slot(seq_id)], [n])
        layers = range(self.n_layers) if layer is None else [layer]
        store = self.store

        def keys(i: int) -> torch.Tensor:
            k = store.gather(i, "k", tables, ov)
            k = store.keys_at(k, kpos) if store.rope is not None else store.unrotate(k)
            return k[0, :, :n].transpose(0, 1)

        ks = [keys(i) for i in layers]
        vs = [store.unrotate(store.gather(i, "v", tables, ov)[0, :, :n].transpose(0, 1)) for i in layers]
        return (torch.stack(ks), torch.stack(vs)) if layer is None else (ks[0], vs[0])

    def stats(self) -> dict[str, float]:
        """The pool's stats plus the number of live sequences."""
        return self.manager.stats()

    def bytes_per_token_codec(self) -> float:
        """Asymptotic bytes per token, all layers, K + V: payload + amortised scales only."""
        return codec_bytes_per_token(self.key_formats, self.value_formats, self.n_kv_heads, self.head_dim,
                                     self.block_size)

    def ledger(self) -> dict[str, float]:
        """Exact bytes this rank holds for the live sequences, by kind: :func:`ryzlab.kv.ledger.paged_ledger`."""
        return paged_ledger(self)
