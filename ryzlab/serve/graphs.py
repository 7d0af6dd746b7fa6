"""Decode steps replayed as captured CUDA graphs, one per batch-size bucket (vLLM, gpt-fast).

A decode step of a small model on a GPU is launch-bound: a few hundred kernels of microseconds
each, every one paying Python and launch overhead. Captured once into a CUDA graph, the whole
step (embedding, every layer's projections, the paged K/V write and the paged-attention Triton
kernel, the output head) is one ``cudaGraphLaunch``.

A graph has fixed shapes and fixed addresses, so a step runs in a **bucket**: ``rows = bucket + 1``
query rows (the batch padded up to the next bucket size, plus one row that is always padding),
block tables ``ceil(max_model_len / block_size)`` wide, and static input buffers the step's plan
is copied into before each replay. Padding rows decode token 0 at position 0 into a scratch page
and tail slot no sequence owns (:meth:`ryzlab.kv.store.PageStore.scratch`); their logits are
dropped. The plan itself (block bookkeeping, :meth:`PagedKVCache.extend`) stays eager: it is
Python, and it is what the graph's inputs are copied from.

What runs eagerly instead (the reason is logged once): any step that is not decode-only, larger
than the largest bucket, longer than the tables, or that commits a block (token-spanning
scales); and every step of an engine where graphs cannot hold: not CUDA, a tp x cp group, an
unbounded cache (pages reallocate as it grows), keys stored before RoPE or rotated. A step whose
pages or tail moved since capture (tail slots grow with the number of sequences) recaptures.

:class:`DecodeGraphs` also runs the same fixed-shape step **without capture** (``capture=False``):
how the padding and buffers are checked on a CPU (tests), where no graph can be captured.

Not yet run on a GPU in this repository (no GPU was lent when it was written):
``benchmarks/gpu_decode.py --engine-step`` measures launches per step and step time eager vs graphs.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import torch

from ryzlab.models.transformer import PagedContext

__all__ = ["DecodeGraphs", "BUCKETS", "graphs_unavailable_reason"]

log = logging.getLogger(__name__)

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Batch sizes a graph is captured for (a step pads up to the next one), as vLLM's capture sizes."""

_FAR = 1 << 30  # the Triton plan's "no tail" page end (ryzlab.kv.triton.decode._FAR)


def graphs_unavailable_reason(cache: Any, *, grouped: bool) -> str | None:
    """Why no step of an engine over ``cache`` can run as a captured graph (None if some can)."""
    store = cache.store
    if cache.device.type != "cuda":
        return f"device {cache.device.type!r}: CUDA graphs need a CUDA device"
    if grouped:
        return "a tp x cp group: collectives are not captured"
    if cache.num_blocks is None:
        return "an unbounded cache (num_blocks=None) reallocates its pages as it grows"
    if store.rope is not None or store.rotation is not None:
        return "keys stored before RoPE or rotated K/V are not supported in a captured step"
    return None


@dataclasses.dataclass
class _Bucket:
    """The static buffers of one bucket, the fixed-shape step over them, and its graph."""

    rows: int
    tokens: torch.Tensor      # [rows]
    positions: torch.Tensor   # [rows]
    slots: torch.Tensor       # [rows] page slot each row's new token is written to
    tables: torch.Tensor      # [rows, NB]
    q_pos: torch.Tensor       # [rows, 1]
    tail_dst: torch.Tensor    # [rows] (empty without a tail)
    ov: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tail overlay (row, key, tail row), padded
    step: Any                 # ryzlab.kv.step.Step over these buffers
    plan: Any = None          # the Triton PagePlan over int32 buffers (Triton backend)
    logits_at: torch.Tensor | None = None
    graph: Any = None         # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the graph's output buffer


class DecodeGraphs:
    """Fixed-shape decode steps of ``model`` over ``cache`` (see the module docstring).

    ``max_batch``: the largest bucket needed (the engine's ``max_num_seqs``); ``max_model_len``
    bounds the block tables. ``capture``: record CUDA graphs (needs CUDA); False runs the same
    fixed-shape step eagerly (the CPU check). Call :meth:`forward` with each planned step.
    """

    def __init__(self, model: torch.nn.Module, cache: Any, *, max_batch: int, max_model_len: int,
                 capture: bool = True):
        store = cache.store
        self.model, self.cache, self.capture = model, cache, capture
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # every standard size below max_batch, then max_batch itself (the engine never runs more)
        self.buckets = tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)
        self.bs = cache.block_size
        self.nb = -(-max_model_len // self.bs)
        self.tail_len = store.tail_len
        self.device = cache.device
        self.scratch_page, self.scratch_tail = store.scratch(cache.num_blocks)
        self._bucket: dict[int, _Bucket] = {}
        self._moved_key: tuple[int, ...] | None = None
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.counters: collections.Counter = collections.Counter()
        """``replayed`` steps, and ``eager:<reason>`` per step that ran without a graph."""
        self.triton = cache.backend.name == "triton"

    # ------------------------------------------------------------------ per step
    def forward(self, step: Any, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits ``[B, vocab]`` of a planned decode ``step`` with new ``tokens [B]`` from a graph
        (or the fixed-shape eager step), or None: run the ordinary forward for this step."""
        why = self._eager_reason(step)
        if why is not None:
            self.counters[f"eager:{why}"] += 1
            return None
        n = len(step.seq_ids)
        key = self._storage_key()
        if key != self._moved_key:  # pages or tail reallocated: every captured address is stale
            if self._bucket:
                log.info("KV storage moved: dropping %d captured decode graph(s)", len(self._bucket))
            self._bucket.clear()
            self._moved_key = key
        size = next(b for b in self.buckets if b >= n)
        bucket = self._bucket.get(size) or self._build(size)
        self._load(bucket, step, tokens)
        if bucket.graph is not None:
            bucket.graph.replay()
            out = bucket.logits
        else:
            out = self._run(bucket)
        self.counters["replayed" if bucket.graph is not None else "fixed_shape_eager"] += 1
        return out[:n].clone()

    def _eager_reason(self, step: Any) -> str | None:
        if not step.is_decode:
            return "not a decode-only step"
        if len(step.seq_ids) > self.buckets[-1]:
            return "batch larger than the largest bucket"
        if step._tables.shape[1] > self.nb:
            return "context longer than the captured tables"
        if step._commit_blocks.numel():
            return "a block commit (token-spanning scales)"
        if self.tail_len and step._ov_b.numel() > (self.buckets[-1] + 1) * self.tail_len:
            return "tail overlay larger than its buffer"
        return None

    def _storage_key(self) -> tuple[int, ...]:
        st = self.cache.store
        return tuple(t.data_ptr() for t in (*st.k.tensors(), *st.v.tensors(), st.tail_k, st.tail_v))

    # ------------------------------------------------------------------ buffers
    def _build(self, size: int) -> _Bucket:
        from ryzlab.kv.step import Step

        rows, dev, long = size + 1, self.device, torch.long
        nov = rows * self.tail_len
        b = _Bucket(rows=rows, tokens=torch.zeros(rows, dtype=long, device=dev),
                    positions=torch.zeros(rows, dtype=long, device=dev),
                    slots=torch.full((rows,), self.scratch_page * self.bs, dtype=long, device=dev),
                    tables=torch.full((rows, self.nb), self.scratch_page, dtype=long, device=dev),
                    q_pos=torch.zeros(rows, 1, dtype=long, device=dev),
                    tail_dst=(torch.full((rows,), self.scratch_tail * self.tail_len, dtype=long, device=dev)
                              if self.tail_len else torch.zeros(0, dtype=long, device=dev)),
                    ov=(torch.full((nov,), rows - 1, dtype=long, device=dev), torch.zeros(nov, dtype=long, device=dev),
                        torch.full((nov,), self.scratch_tail * self.tail_len, dtype=long, device=dev)),
                    step=None)
        empty = torch.zeros(0, dtype=long, device=dev)
        b.step = Step(seq_ids=tuple(range(rows)), query_lens=(1,) * rows, context_lens=(1,) * rows,
                      positions=b.positions, slot_mapping=b.slots, _q_b=torch.arange(rows, device=dev),
                      _q_t=torch.zeros(rows, dtype=long, device=dev), _q_pos=b.q_pos, _tables=b.tables,
                      _kpos=torch.arange(self.nb * self.bs, device=dev).view(1, -1), _own_tok=None, _own_slots=b.slots,
                      _ov_b=b.ov[0], _ov_idx=b.ov[1], _ov_row=b.ov[2], _commit_blocks=empty,
                      _commit_src=torch.zeros(0, self.bs, dtype=long, device=dev),
                      _tail_src=torch.arange(rows, device=dev) if self.tail_len else empty, _tail_dst=b.tail_dst)
        b.logits_at = torch.arange(rows, device=dev)
        if self.triton:
            from ryzlab.kv.triton.decode import PagePlan

            i32 = torch.int32
            b.plan = PagePlan(q_row=torch.arange(rows, dtype=i32, device=dev),
                              q_pos=torch.zeros(rows, dtype=i32, device=dev),
                              tables=torch.full((rows, self.nb), self.scratch_page, dtype=i32, device=dev),
                              kstart=(torch.arange(self.nb, dtype=i32, device=dev) * self.bs).expand(rows, -1).contiguous(),
                              pend=torch.full((rows,), _FAR, dtype=i32, device=dev),
                              tail_ptr=torch.zeros(rows + 1, dtype=i32, device=dev),
                              tail_row=torch.zeros(max(nov, 1), dtype=i32, device=dev),
                              tail_pos=torch.zeros(max(nov, 1), dtype=i32, device=dev), block_size=self.bs)
        if self.capture:
            self._capture(b)
        self._bucket[size] = b
        return b

    def _load(self, b: _Bucket, step: Any, tokens: torch.Tensor) -> None:
        """Copy one planned decode step of ``n <= rows - 1`` sequences into the bucket's buffers;
        the rows after it become padding again (scratch page, token 0 at position 0)."""
        n, w = len(step.seq_ids), step._tables.shape[1]
        b.tokens[:n].copy_(tokens)
        b.tokens[n:].zero_()
        b.positions[:n].copy_(step.positions)
        b.positions[n:].zero_()
        b.q_pos[:, 0].copy_(b.positions)
        b.slots[:n].copy_(step.slot_mapping)
        b.slots[n:].fill_(self.scratch_page * self.bs)
        b.tables[:n, :w].copy_(step._tables)
        b.tables[:n, w:].zero_()        # beyond a row's context: masked by causality (positions > q_pos)
        b.tables[n:].fill_(self.scratch_page)
        if self.tail_len:
            b.tail_dst[:n].copy_(step._tail_dst)
            b.tail_dst[n:].fill_(self.scratch_tail * self.tail_len)
            m = step._ov_b.numel()
            for buf, src in zip(b.ov, (step._ov_b, step._ov_idx, step._ov_row)):
                buf[:m].copy_(src)
            b.ov[0][m:].fill_(b.rows - 1)   # the extra padding row: a harmless overlay
            b.ov[1][m:].zero_()
            b.ov[2][m:].fill_(self.scratch_tail * self.tail_len)
        if b.plan is not None:
            from ryzlab.kv.triton.decode import plan_from_gather

            p = plan_from_gather(step._q_b, step.positions, step._tables, step._kpos, self.bs,
                                 step._ov_b, step._ov_idx, step._ov_row)
            b.plan.q_pos.copy_(b.positions)
            b.plan.tables.copy_(b.tables)
            b.plan.pend[:n].copy_(p.pend)
            b.plan.pend[n:].fill_(_FAR)
            b.plan.tail_ptr[:n + 1].copy_(p.tail_ptr)
            b.plan.tail_ptr[n + 1:] = p.tail_ptr[-1]  # padding rows: no tail entries (no host sync)
            m = p.tail_row.numel()
            if m:
                b.plan.tail_row[:m].copy_(p.tail_row)
                b.plan.tail_pos[:m].copy_(p.tail_pos)

    # ------------------------------------------------------------------ running
    def _run(self, b: _Bucket) -> torch.Tensor:
        """The fixed-shape forward over the bucket's buffers -> logits ``[rows, vocab]``.

        Always over a new Step object: what a step caches for its layers (the causal mask) is
        then computed from the buffers in this run -- inside the graph when capturing, so that a
        replay recomputes it from the buffers' new contents."""
        step = dataclasses.replace(b.step)
        if b.plan is not None:  # the Triton backend reads the plan we keep, not one built per step
            self.cache.backend._plan = (step, b.plan)
        return self.model(b.tokens[None], b.positions[None], PagedContext(self.cache, step), logits_at=b.logits_at)

    def _capture(self, b: _Bucket) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks kernels), then record the step."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            b.logits = self._run(b)
        b.graph = g
        log.info("captured the decode step for %d sequence(s) (%d rows) as a CUDA graph", b.rows - 1, b.rows)
