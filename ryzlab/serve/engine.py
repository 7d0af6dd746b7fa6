"""Continuous-batching engine over the paged, compressed KV cache and the reference model.

One :meth:`Engine.step` is one scheduling round (vLLM's v1 scheduler, simplified):

1. **Running** sequences go first, in admission order. A decoding sequence needs 1 token; a
   prefilling one gets a chunk of at most ``prefill_chunk`` prompt tokens (chunked prefill:
   a long prompt cannot stall everybody's decode). When the cache has no room for a running
   sequence's next tokens, the most recently admitted running sequence is *preempted*
   (``recompute``: its blocks are freed and it is re-prefilled later from prompt + output so
   far; ``swap``: its pages are copied to host memory and copied back later, no recompute).
2. **Waiting** sequences (FIFO; preempted ones in front) are admitted while the per-step
   token budget, ``max_num_seqs`` and free blocks allow. With prefix caching, the cache
   reports how many leading prompt tokens it already holds; those are not recomputed.
3. The model runs one batched forward for all decoding sequences (``[B, 1]``) and one
   forward per prefill chunk; the last position's logits give the next token (greedy or
   temperature sampling with a per-request seed).

The scheduler reaches the cache through one call, :meth:`PagedKVCache.allocate_slots`
(vLLM's ``allocate_slots``): blocks for a sequence's next tokens, or None (then it preempts or
waits); it never counts the pool itself.

**One engine per rank** (a tp x cp group, :mod:`ryzlab.parallel`): every rank holds the model
shard and its cache; the driver (rank 0) schedules and samples, and hands each step's plan
(the cache calls it made, in order, and the forward's inputs) to the other ranks, which replay
the calls on their replica and run the same forward (vLLM's executor pattern). At one rank the
plan is not sent, and the same code runs.

The engine is synchronous and single-threaded; :class:`AsyncEngine` runs it in a
background thread for the HTTP API and the workers.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from ryzlab.config import PREEMPTIONS, Preemption, check_choice
from ryzlab.serve.sampling import INT64, MAX_LOGPROBS, Logprob, SamplingParams, TokenChunk, sample

__all__ = ["EngineConfig", "Engine", "AsyncEngine", "Preemption", "PREEMPTIONS", "SamplingParams",
           "StepOutput", "EngineError", "RequestRejected", "TokenChunk", "MAX_LOGPROBS", "INT64"]

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request could not be served (failed forward, request larger than the whole cache)."""


class RequestRejected(EngineError, ValueError):
    """The engine refused a request's input (checked when it is queued): a client error."""


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


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
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

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.num_computed

    @property
    def done(self) -> bool:
        return len(self.output) >= self.params.max_tokens or (
            bool(self.output) and self.output[-1] in self.params.stop_token_ids)


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_tokens: list[int]
    """A :class:`TokenChunk` (carries the logprobs when the request asked for them)."""
    finished: bool
    error: str | None = None


class Engine:
    """Continuous batching over ``model`` and a paged ``cache`` (see module docstring).

    ``cache`` is a :class:`ryzlab.kv.cache.PagedKVCache` built for the model's config, used
    only through its public API (add_sequence / extend / write / attend / free / read_kv).
    """

    def __init__(self, model: torch.nn.Module, cache: Any, config: EngineConfig = EngineConfig(), *,
                 control: Any = None):
        from ryzlab.serve.runner import ModelRunner

        self.model = model
        self.cache = cache
        self.config = config
        self.runner = ModelRunner(model, cache)
        self.control = control
        """The group's control :class:`ryzlab.parallel.comm.Comm` (None or one rank: no plan is sent)."""
        self.grouped = control is not None and control.world_size > 1
        if self.grouped and config.preemption == "swap":
            raise ValueError("preemption='swap' copies a sequence's K/V through one rank; a tp x cp group "
                             "holds it spread over ranks: use preemption='recompute'")
        self._ops: list[tuple] = []
        self.vocab_size: int = model.config.vocab_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()
        self.counters: collections.Counter = collections.Counter()
        self.last_step_s = time.monotonic()

    # ------------------------------------------------------------------ requests
    def capacity_tokens(self) -> int | None:
        """Tokens the whole cache holds (None = unbounded)."""
        n = self.cache.config.num_blocks
        return None if n is None else n * self.cache.block_size

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ``ValueError`` for bad input (nothing is queued then)."""
        if request_id in self.by_id:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("prompt must have at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        params.check(self.vocab_size)
        total = len(prompt) + params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_model_len={self.config.max_model_len}")
        cap = self.capacity_tokens()
        if cap is not None and total > cap:
            raise ValueError(f"a request of {total} tokens can never fit the KV cache ({cap} tokens)")
        gen = None
        sid = next(self._seq_ids)
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else sid)
        seq = Sequence(request_id, sid, list(prompt), params, time.monotonic(), generator=gen)
        self.by_id[request_id] = seq
        self.waiting.append(seq)
        self.counters["requests"] += 1

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if unknown/finished."""
        seq = self.by_id.get(request_id)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq)
        self.counters["aborted"] += 1
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    # ------------------------------------------------------------------ cache bookkeeping
    def _alloc(self, seq: Sequence, tokens: list[int]) -> bool:
        """The scheduler's one cache call: room for ``tokens`` (registering ``seq`` if new)."""
        if self.cache.allocate_slots(seq.seq_id, tokens) is None:
            return False
        if self.grouped:
            self._ops.append(("alloc", seq.seq_id, list(tokens)))
        seq.in_pool += len(tokens)
        return True

    def _release(self, seq: Sequence) -> None:
        if seq.in_pool:
            self.cache.free(seq.seq_id)
            if self.grouped:
                self._ops.append(("free", seq.seq_id))
        seq.in_pool = 0

    def _swap_out(self, seq: Sequence) -> None:
        """Copy the written K/V to host memory and free the blocks (decoded values: exact for
        ``none``, re-encoded on swap-in for compressed codecs)."""
        n = seq.num_computed
        if n:
            k, v = self.cache.read_kv(seq.seq_id)               # [L, n, Hkv, D]
            seq.swapped = (k.to("cpu", copy=True), v.to("cpu", copy=True))
        self._release(seq)
        self.counters["swapped_out_tokens"] += n

    def _swap_in(self, seq: Sequence) -> bool:
        """Restore a swapped sequence's K/V into fresh blocks; False when there is no room."""
        n = seq.num_computed
        if not n:
            return self._admit(seq)
        if not self._alloc(seq, seq.tokens[:n]):
            return False
        cached = self.cache.num_cached_tokens(seq.seq_id)
        k, v = seq.swapped
        self.cache.extend([seq.seq_id], None, num_write=[n - cached])
        dev = self.cache.device
        for layer in range(self.cache.n_layers):
            self.cache.write(layer, k[layer, cached:n].to(dev), v[layer, cached:n].to(dev))
        seq.swapped = None
        self.counters["swapped_in_tokens"] += n
        return True

    def _admit(self, seq: Sequence) -> bool:
        """Register a waiting sequence's tokens in the cache (prefix hits are not recomputed)."""
        if not self._alloc(seq, seq.tokens):
            return False
        cached = self.cache.num_cached_tokens(seq.seq_id)
        seq.num_computed = cached
        seq.cached_tokens += cached
        self.counters["prefix_hit_tokens"] += cached
        return True

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, victim: Sequence) -> None:
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

    def _schedule_suspect(self) -> list[tuple[Sequence, int]] | None:
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
        new = seq.tokens[seq.in_pool:seq.num_computed + n]
        while new and not self._alloc(seq, new):
            victims = [s for s in self.running if s is not seq]
            if not victims:
                return []
            self._preempt(victims[-1])
        return [(seq, n)]

    def _isolate(self, seqs: list[Sequence]) -> None:
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

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, tokens to write) for this step, preempting when the cache is full."""
        alone = self._schedule_suspect()
        if alone is not None:
            return alone
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted as a victim earlier in this loop
                continue
            n = min(seq.pending, self.config.prefill_chunk, budget)
            if n <= 0:
                continue
            new = seq.tokens[seq.in_pool:seq.num_computed + n]  # decode: the token sampled last step
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
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            ok = self._swap_in(seq) if seq.status is Status.SWAPPED else self._admit(seq)
            if not ok:
                break
            n = min(seq.pending, self.config.prefill_chunk, budget)
            new = seq.tokens[seq.in_pool:seq.num_computed + n]  # a restored swap: its last sampled token
            if new and not self._alloc(seq, new):
                self._swap_out(seq) if seq.status is Status.SWAPPED else self._release(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan

    # ------------------------------------------------------------------ execution
    def _sample(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, Logprob | None]:
        """logits [V] -> (next token id, its logprob and top alternatives or None): :func:`sample`."""
        return sample(logits, seq.params, seq.generator)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduling round + one ragged forward; returns new tokens and finished requests.

        A failing forward fails the requests of this step (error outputs, blocks freed); the
        engine itself keeps going. In a tp x cp group a failed forward is raised instead: the
        other ranks may be mid-collective, so the group must restart.
        """
        plan = self._schedule()
        outputs: list[StepOutput] = []
        if plan:
            seqs = [s for s, _ in plan]
            inputs = [s.tokens[s.num_computed:s.num_computed + n] for s, n in plan]
            try:
                logits = self._forward([s.seq_id for s in seqs], inputs)  # [B, V]
            except Exception as e:  # noqa: BLE001 - fail the culprit alone, keep the engine alive
                if self.grouped:
                    raise
                log.exception("forward failed for %d sequence(s)", len(seqs))
                if len(seqs) > 1:   # whose fault? each reruns alone (recompute) to find out
                    self._isolate(seqs)
                else:
                    self._finish(seqs[0])
                    self.counters["failed"] += 1
                    outputs.append(StepOutput(seqs[0].request_id, TokenChunk(), True, f"{type(e).__name__}: {e}"))
                # extend() registered the prefix hashes of blocks this forward never wrote
                self.cache.pool.evict()
                self.last_step_s = time.monotonic()
                return outputs
            for i, (s, n) in enumerate(plan):
                s.num_computed += n
                if n > 1 or s.pending > 0:
                    self.counters["prefill_tokens"] += n
                else:
                    self.counters["decode_tokens"] += 1
                if s.pending > 0:  # mid-prefill chunk: no token yet
                    continue
                try:
                    tok, lp = self._sample(s, logits[i])
                except Exception as e:  # noqa: BLE001 - this request's sampling failed: it fails alone
                    log.exception("sampling failed for %s", s.request_id)
                    self._finish(s)
                    self.counters["failed"] += 1
                    outputs.append(StepOutput(s.request_id, TokenChunk(), True,
                                              f"sampling failed: {type(e).__name__}: {e}"))
                    continue
                s.suspect = False
                s.output.append(tok)
                self.counters["generated_tokens"] += 1
                done = s.done
                if done:
                    self._finish(s)
                    self.counters["finished"] += 1
                chunk = TokenChunk([tok])
                if lp is not None:
                    chunk.logprobs = [lp]
                outputs.append(StepOutput(s.request_id, chunk, done))
        self.counters["steps"] += 1
        self.counters["batch_size_sum"] += len(plan)
        self.last_step_s = time.monotonic()
        return outputs

    def _forward(self, seq_ids: list[int], inputs: list[list[int]]) -> torch.Tensor:
        """Run the step on every rank of the group: send the plan first (the cache calls made
        since the last plan, then the forward's inputs), then compute here."""
        if self.grouped:
            self.control.broadcast_object(("step", self._ops, seq_ids, inputs))
            self._ops = []
        return self.runner.forward(seq_ids, inputs)

    @torch.inference_mode()
    def follow(self) -> int:
        """A non-driver rank's loop: replay each plan from the driver until it says stop.

        The cache calls must give the same answers as on the driver (the replicas are equal);
        a disagreement is a bug and raises. Returns the number of steps run.
        """
        if not self.grouped or self.control.rank == 0:
            raise ValueError("follow() runs on the non-driver ranks of a tp x cp group")
        steps = 0
        while True:
            msg = self.control.broadcast_object(None)
            if msg[0] == "stop":
                return steps
            _, ops, seq_ids, inputs = msg
            for op in ops:
                if op[0] == "alloc":
                    if self.cache.allocate_slots(op[1], op[2]) is None:
                        raise RuntimeError(f"rank {self.control.rank}: cache replica has no room for sequence "
                                           f"{op[1]} where the driver had (replicas diverged)")
                else:
                    self.cache.free(op[1])
            self.runner.forward(seq_ids, inputs)
            steps += 1

    def close(self) -> None:
        """Driver: tell the other ranks of the group to leave :meth:`follow` (no-op at one rank)."""
        if self.grouped and self.control.rank == 0:
            self.control.broadcast_object(("stop",))

    def _finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.swapped = None
        seq.status = Status.FINISHED
        self.by_id.pop(seq.request_id, None)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run ``prompts`` to completion together (offline batch) -> output token ids per prompt."""
        ids = [f"offline-{next(self._seq_ids)}" for _ in prompts]
        for rid, p in zip(ids, prompts):
            self.add_request(rid, p, params)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.by_id for rid in ids):
            for o in self.step():
                if o.error:
                    raise EngineError(f"request {o.request_id} failed: {o.error}")
                if o.request_id in out:
                    out[o.request_id].extend(o.new_tokens)
        return [out[rid] for rid in ids]

    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics: cache usage, prefix hit rate, preemptions, queue sizes, counters."""
        st = self.cache.stats()
        return {"kv_cache_usage_perc": st["kv_cache_usage_perc"],
                "prefix_cache_hit_rate": st["prefix_cache_hit_rate"],
                "num_free_blocks": st["num_free_blocks"], "num_blocks": st["num_blocks"],
                "num_running": len(self.running), "num_waiting": len(self.waiting),
                "preemptions": self.counters["preemptions"], **dict(self.counters)}


class AsyncEngine:
    """Runs an :class:`Engine` in a background thread; ``generate`` is an async token stream.

    Health is progress, not liveness: unhealthy when the loop thread died, or when work is
    pending and no step has completed for ``stall_timeout_s``.
    """

    def __init__(self, engine: Engine, *, model_name: str = "ryzlab-reference"):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.vocab_size = engine.vocab_size
        self.max_model_len = engine.config.max_model_len
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._busy_since: float | None = None
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="ryzlab-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- engine thread
    def _deliver(self, rid: str, item: Any) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            loop, q = stream
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the client's loop is closed: nobody listens any more
                self._streams.pop(rid, None)

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            with self._lock:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for rid, prompt, params in inbox:  # adds before aborts: an instant disconnect still aborts
                try:
                    eng.add_request(rid, prompt, params)
                except ValueError as e:
                    self._deliver(rid, RequestRejected(str(e)))
            for rid in aborts:
                eng.abort(rid)
            if not eng.has_work():
                self._busy_since = None
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            if self._busy_since is None:
                self._busy_since = time.monotonic()
            try:
                outputs = eng.step()
            except Exception as e:  # noqa: BLE001 - a broken step fails its requests, not the server
                log.exception("engine step failed")
                for rid in list(eng.by_id):
                    eng.abort(rid)
                    self._deliver(rid, EngineError(f"engine step failed: {e}"))
                continue
            for o in outputs:
                if o.error:
                    self._deliver(o.request_id, EngineError(o.error))
                    continue
                if o.new_tokens:
                    self._deliver(o.request_id, o.new_tokens)
                if o.finished:
                    self._deliver(o.request_id, None)

    # -------------------------------------------------------------- client side
    async def generate(self, request_id: str, prompt: list[int], params: Any) -> AsyncIterator[list[int]]:
        """Stream new token ids of one request; raises :class:`EngineError` if it fails."""
        sp = params if isinstance(params, SamplingParams) else SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, seed=params.seed,
            stop_token_ids=tuple(params.stop_token_ids))
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        with self._lock:
            self._inbox.append((request_id, list(prompt), sp))
        self._wake.set()
        try:
            while True:
                item = await q.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def health(self) -> dict[str, Any]:
        eng = self.engine
        now = time.monotonic()
        since = max(eng.last_step_s, self._busy_since or now)
        stalled_s = now - since if (eng.has_work() or self._inbox) else 0.0
        alive = self._thread.is_alive()
        healthy = alive and stalled_s < eng.config.stall_timeout_s
        reason = ("ok" if healthy else "engine thread died" if not alive else
                  f"no engine step finished for {stalled_s:.1f} s with {eng.num_requests} request(s) pending")
        return {"healthy": healthy, "reason": reason, "stalled_s": round(stalled_s, 3),
                "num_requests": eng.num_requests}

    def metrics(self) -> dict[str, Any]:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
