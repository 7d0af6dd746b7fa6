"""The engine's scheduler: which sequences run in the next step, and their room in the KV cache.

One :meth:`Scheduler.schedule` is one scheduling round (vLLM's v1 scheduler, simplified):

1. **Running** sequences go first, in admission order. A decoding sequence needs 1 token; a
   prefilling one gets a chunk of at most ``prefill_chunk`` prompt tokens (chunked prefill:
   a long prompt cannot stall everybody's decode). When the cache has no room for a running
   sequence's next tokens, the most recently admitted running sequence is *preempted*
   (``recompute``: its blocks are freed and it is re-prefilled later from prompt + output so
   far; ``swap``: its pages are copied to host memory and copied back later, no recompute).
2. **Waiting** sequences (FIFO; preempted ones in front) are admitted while the per-step
   token budget, ``max_num_seqs`` and free blocks allow. With prefix caching, the cache
   reports how many leading prompt tokens it already holds; those are not recomputed.

With ``split_prefill`` (the engine's default on the torch attention path) one step holds either the decodes (1 and no admission) or
the prefill chunks and admissions (1 and 2 without the decodes), alternating while both wait:
the torch attention path pads a step's sequences to its longest query, so a mixed step pays a
chunk's length for every decode in it.

The scheduler reaches the cache through one call, :meth:`PagedKVCache.allocate_slots`
(vLLM's ``allocate_slots``): blocks for a sequence's next tokens, or None (then it preempts or
waits); it never counts the pool itself. In a tp x cp group it records those calls (``ops``) so
the engine can send them to the other ranks, which replay them on their cache replicas.
"""
from __future__ import annotations

import collections
import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from ryzlab.config import PREEMPTIONS, Preemption, check_choice
from ryzlab.serve.sampling import SamplingParams

__all__ = ["EngineConfig", "EngineSequence", "max_num_seqs_for", "Scheduler", "Status", "Preemption", "PREEMPTIONS", "FinishReason",
           "FINISH_REASONS"]

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "error"]
"""Why the engine ended a sequence: a stop token, ``max_tokens`` reached, or a failure (the first
two are OpenAI's ``finish_reason``; a stop string is the API's ``stop``; an aborted sequence
produces no output at all)."""
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Scheduler knobs; defaults fit the 2-core CPU machine."""

    max_num_seqs: int = 16
    """Sequences decoded together at most (the batch the 4x benchmark uses)."""
    max_num_batched_tokens: int = 256
    """Token budget of one step: decode tokens (1 each) + prefill chunk tokens."""
    prefill_chunk: int = 64
    """Most prompt tokens one sequence prefills in one step (chunked prefill)."""
    preemption: Preemption = "recompute"
    """What to do with a victim when the cache is full: free and recompute, or swap to host."""
    enable_prefix_caching: bool = True
    max_model_len: int = 1024
    """Prompt + output tokens of one request at most."""
    stall_timeout_s: float = 10.0
    """/health turns unhealthy when work is pending and no step finished for this long."""
    cuda_graphs: bool = False
    """Replay decode steps as CUDA graphs per batch-size bucket (:mod:`ryzlab.serve.graphs`); on a
    CUDA device only, else ignored with the reason logged. Off by default: not yet run on a GPU."""
    split_prefill: bool | None = None
    """A step runs either decodes or prefill chunks, alternating while both wait (False: one step
    mixes them, as vLLM's ragged kernels do). None (default): the engine decides from its attention
    path, split on the torch path (it pads), mixed with the Triton kernel (it does not); a scheduler
    driven without an engine (the projections) mixes. The torch attention path pads every sequence of a
    step to its longest query, so a decode beside a 64-token chunk costs 64 query rows: on the
    2-core CPU a step of 20 decodes + 4 x 64 prefill took 124-164 ms, 20 decodes alone 11 ms
    (reference model, issue 20)."""
    compile: bool = False
    """Run the model's forward through ``torch.compile`` (:func:`ryzlab.serve.engine.compile_forward`):
    one graph per kind of step, the paged cache reached through two opaque operators (a decode
    over plain pages traces its attention math into the graph); the engine builds its graphs before
    it serves (:meth:`ryzlab.serve.engine.Engine.warm_up`, 1-2 min on the 2-core CPU). Measured
    there, SmolLM2-135M int4-g32 behind ``ryzlab serve``: single-stream decode 70 tok/s instead of
    48 at 1 thread (``benchmarks/llamacpp_peer.py --compile``). Off by default: every engine start
    pays the compile, and tests, the demo and sweeps start many; ``ryzlab serve --compile``."""

    def __post_init__(self) -> None:
        check_choice("preemption", self.preemption, PREEMPTIONS)
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token per step")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")


def max_num_seqs_for(num_blocks: int | None, max_num_batched_tokens: int = 256) -> int:
    """The default cap on running sequences, derived from the KV capacity (not a constant).

    Every running sequence holds at least one KV block and one token of each step's budget, so at
    most ``num_blocks`` sequences can be resident and at most ``max_num_batched_tokens`` decode in
    one step: the cap is the smaller of the two (an unbounded cache: the token budget). Admission
    stops earlier when the blocks run out (longer sequences hold more), as in vLLM, and the
    transformers peer gets the same cap (``--max-num-seqs``) so batch sizes compare.
    """
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1 or None, got {num_blocks}")
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    return max(1, min(max_num_batched_tokens, num_blocks if num_blocks is not None else max_num_batched_tokens))


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class EngineSequence:
    """One request's sequence inside the engine: its tokens and its progress through the cache."""

    request_id: str
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    arrival_s: float
    output: list[int] = field(default_factory=list)
    in_pool: int = 0
    """Tokens registered in the cache's block pool (0 = holds no blocks)."""
    num_computed: int = 0
    """Tokens whose K/V are written; the next forward feeds tokens[num_computed:]."""
    status: Status = Status.WAITING
    preemptions: int = 0
    cached_tokens: int = 0
    generator: torch.Generator | None = None
    swapped: tuple[torch.Tensor, torch.Tensor] | None = None
    """Host copy of the decoded K/V [L, n, Hkv, D] while swapped out."""
    suspect: bool = False
    """In a batch whose forward failed: runs alone until it produces a token (or fails alone)."""

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_range(self, start: int, stop: int) -> list[int]:
        """``tokens[start:stop]`` without building ``tokens``: a decode step reads one id, and
        copying prompt + output per sequence per step grows with the sequence."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.output[start - p:stop - p]
        return self.prompt[start:] + self.output[:stop - p]

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.num_computed

    @property
    def finish_reason(self) -> FinishReason | None:
        """``stop`` when the last token is a stop token (checked first, as vLLM does: a stop token
        that is also the ``max_tokens``-th token is a stop), ``length`` at ``max_tokens``, else None."""
        if self.output and self.output[-1] in self.params.stop_token_ids:
            return "stop"
        return "length" if len(self.output) >= self.params.max_tokens else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """Waiting and running sequences over ``cache`` (see module docstring)."""

    def __init__(self, cache: Any, config: EngineConfig, *, grouped: bool = False):
        self.cache, self.config, self.grouped = cache, config, grouped
        self.waiting: collections.deque[EngineSequence] = collections.deque()
        self.running: list[EngineSequence] = []
        self.by_id: dict[str, EngineSequence] = {}
        self.counters: collections.Counter = collections.Counter()
        self.ops: list[tuple] = []
        """Cache calls since the last plan was sent (only in a group): the other ranks replay them."""
        self._last_kind = "prefill"
        """What the last step ran under ``split_prefill``: the next step with both kinds runs the other."""

    def add(self, seq: EngineSequence) -> None:
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if unknown/finished."""
        seq = self.by_id.get(request_id)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq)
        return True

    def finish(self, seq: EngineSequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.swapped = None
        seq.status = Status.FINISHED
        self.by_id.pop(seq.request_id, None)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def take_ops(self) -> list[tuple]:
        ops, self.ops = self.ops, []
        return ops

    # ------------------------------------------------------------------ cache bookkeeping
    def _alloc(self, seq: EngineSequence, tokens: list[int]) -> bool:
        """The scheduler's one cache call: room for ``tokens`` (registering ``seq`` if new)."""
        if self.cache.allocate_slots(seq.seq_id, tokens) is None:
            return False
        if self.grouped:
            self.ops.append(("alloc", seq.seq_id, list(tokens)))
        seq.in_pool += len(tokens)
        return True

    def _release(self, seq: EngineSequence) -> None:
        if seq.in_pool:
            self.cache.free(seq.seq_id)
            if self.grouped:
                self.ops.append(("free", seq.seq_id))
        seq.in_pool = 0

    def _swap_out(self, seq: EngineSequence) -> None:
        """Copy the written K/V to host memory and free the blocks (decoded values: exact for
        ``none``, re-encoded on swap-in for compressed codecs)."""
        n = seq.num_computed
        if n:
            k, v = self.cache.read_kv(seq.seq_id)               # [L, n, Hkv, D]
            seq.swapped = (k.to("cpu", copy=True), v.to("cpu", copy=True))
        self._release(seq)
        self.counters["swapped_out_tokens"] += n

    def _swap_in(self, seq: EngineSequence) -> bool:
        """Restore a swapped sequence's K/V into fresh blocks; False when there is no room."""
        n = seq.num_computed
        if not n:
            return self._admit(seq)
        if not self._alloc(seq, seq.tokens[:n]):
            return False
        k, v = seq.swapped
        self.cache.restore(seq.seq_id, k, v)  # the cache plans and writes the tokens not already cached
        seq.swapped = None
        self.counters["swapped_in_tokens"] += n
        return True

    def _admit(self, seq: EngineSequence) -> bool:
        """Register a waiting sequence's tokens in the cache (prefix hits are not recomputed)."""
        if not self._alloc(seq, seq.tokens):
            return False
        cached = self.cache.num_cached_tokens(seq.seq_id)
        seq.num_computed = cached
        seq.cached_tokens += cached
        self.counters["prefix_hit_tokens"] += cached
        return True

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, victim: EngineSequence) -> None:
        self.running.remove(victim)
        if self.config.preemption == "swap":
            self._swap_out(victim)
            victim.status = Status.SWAPPED
        else:
            self._release(victim)
            victim.num_computed = 0
            victim.status = Status.WAITING
        victim.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(victim)
        log.debug("preempted %s (%s)", victim.request_id, self.config.preemption)

    def _schedule_suspect(self) -> list[tuple[EngineSequence, int]] | None:
        """After a failed batched forward, its sequences run one at a time (each alone in its
        step) until each produced a token or failed alone: one bad request fails alone. None
        when there is no suspect (normal scheduling)."""
        seq = next((s for s in self.running if s.suspect), None)
        if seq is None:
            seq = next((s for s in self.waiting if s.suspect), None)
            if seq is None:
                return None
            while not self._admit(seq):
                victims = [s for s in self.running if s is not seq]
                if not victims:
                    return []
                self._preempt(victims[-1])
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
        n = min(seq.pending, self.config.prefill_chunk, self.config.max_num_batched_tokens)
        new = seq.token_range(seq.in_pool, seq.num_computed + n)
        while new and not self._alloc(seq, new):
            victims = [s for s in self.running if s is not seq]
            if not victims:
                return []
            self._preempt(victims[-1])
        return [(seq, n)]

    def isolate(self, seqs: list[EngineSequence]) -> None:
        """A batched forward failed: recompute these sequences later, each alone (suspects)."""
        for s in reversed(seqs):
            if s in self.running:
                self.running.remove(s)
            self._release(s)
            s.num_computed = 0
            s.status = Status.WAITING
            s.suspect = True
            self.waiting.appendleft(s)
        self.counters["isolated"] += len(seqs)

    def schedule(self) -> list[tuple[EngineSequence, int]]:
        """Pick (sequence, tokens to write) for this step, preempting when the cache is full."""
        alone = self._schedule_suspect()
        if alone is not None:
            return alone
        if not self.config.split_prefill:
            return self._fill(None)
        # decodes and prefill chunks in separate steps, alternating; the other kind when one has nothing
        order = ("decode", "prefill") if self._last_kind == "prefill" else ("prefill", "decode")
        for kind in order:
            plan = self._fill(kind)
            if plan:
                self._last_kind = kind
                return plan
        return []

    def _fill(self, kind: str | None) -> list[tuple[EngineSequence, int]]:
        """The step's plan: running sequences first, then admissions. ``kind``: only decodes
        (``decode``: one pending token, no admission), only prefill chunks (``prefill``), or both (None)."""
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[EngineSequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted as a victim earlier in this loop
                continue
            if kind is not None and (seq.pending == 1) != (kind == "decode"):
                continue
            n = min(seq.pending, self.config.prefill_chunk, budget)
            if n <= 0:
                continue
            new = seq.token_range(seq.in_pool, seq.num_computed + n)  # decode: the token sampled last step
            while new and not self._alloc(seq, new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            plan.append((seq, n))
            budget -= n
            if budget <= 0:
                break
        # Admit waiting sequences (preempted ones first) while there is room for them.
        while kind != "decode" and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            ok = self._swap_in(seq) if seq.status is Status.SWAPPED else self._admit(seq)
            if not ok:
                break
            n = min(seq.pending, self.config.prefill_chunk, budget)
            new = seq.token_range(seq.in_pool, seq.num_computed + n)  # a restored swap: its last sampled token
            if new and not self._alloc(seq, new):
                self._swap_out(seq) if seq.status is Status.SWAPPED else self._release(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan
