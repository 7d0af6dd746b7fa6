"""Continuous-batching engine over the paged, compressed KV cache and the reference model.

One :meth:`Engine.step` is one scheduling round (:class:`ryzlab.serve.scheduler.Scheduler`:
running sequences first, chunked prefill, preemption by recompute or swap, admission of
waiting ones), then **one ragged forward** of the model for every scheduled sequence: the
model's own forward (:meth:`ryzlab.models.transformer.Transformer.forward`) over the flat
``[1, N]`` token list with a :class:`~ryzlab.models.transformer.PagedContext` (K/V written
into the pages, attention over them), logits only at the last token of each sequence; the
next token is sampled from them (greedy or temperature sampling with a per-request seed).

**One engine per rank** (a tp x cp group, :mod:`ryzlab.parallel`): every rank holds the model
shard and its cache; the driver (rank 0) schedules and samples, and hands each step's plan
(the cache calls it made, in order, and the forward's inputs) to the other ranks, which replay
the calls on their replica and run the same forward (vLLM's executor pattern). At one rank the
plan is not sent, and the same code runs.

The engine is synchronous and single-threaded; :class:`ryzlab.serve.async_engine.AsyncEngine`
runs it in a background thread for the HTTP API.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ryzlab.models.transformer import PagedContext
from ryzlab.serve.sampling import INT64, MAX_LOGPROBS, Logprob, SamplingParams, TokenChunk, fused_greedy, sample
from ryzlab.serve.scheduler import (FINISH_REASONS, PREEMPTIONS, EngineConfig, EngineSequence, FinishReason,
                                    Preemption, Scheduler)

__all__ = ["EngineConfig", "Engine", "ragged_forward", "EngineSequence", "Preemption", "PREEMPTIONS", "SamplingParams",
           "StepOutput", "EngineError", "RequestRejected", "TokenChunk", "MAX_LOGPROBS", "INT64",
           "FinishReason", "FINISH_REASONS"]

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request could not be served (failed forward, request larger than the whole cache)."""


class NoWorkerAvailable(EngineError):
    """No worker can take the request now (every one is down or restarting): the server is
    temporarily unavailable (HTTP 503 with Retry-After), not broken (500)."""


class RequestRejected(EngineError, ValueError):
    """The engine refused a request's input (checked when it is queued): a client error."""


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_tokens: list[int]
    """A :class:`TokenChunk` (carries the logprobs when the request asked for them, and the
    ``finish_reason`` on the last chunk)."""
    finish_reason: FinishReason | None = None
    """Set when the request ended in this step: ``stop``, ``length``, or ``error``."""
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def ragged_forward(model: torch.nn.Module, cache: Any, seq_ids: Sequence[Hashable],
                   inputs: Sequence[Sequence[int]], *, graphs: Any = None) -> torch.Tensor:
    """One ragged forward of ``model`` over ``cache`` -> logits ``[B, vocab]`` (float32) at the
    last input token of each sequence.

    ``inputs[b]``: the ids whose K/V this step writes for ``seq_ids[b]``, in order, ending at the
    newest one; they already hold slots (:meth:`PagedKVCache.allocate_slots`), so planning the step
    cannot fail. The B sequences go through the model's forward as one row ``[1, N]``.
    ``graphs``: a :class:`ryzlab.serve.graphs.DecodeGraphs` that may replay the step instead.
    """
    device = cache.device
    step = cache.extend(list(seq_ids), None, num_write=[len(x) for x in inputs])
    assert step is not None, "extend() of tokens that already hold slots allocates nothing"
    flat = torch.tensor([t for x in inputs for t in x], dtype=torch.long, device=device)  # [N]
    if graphs is not None and (logits := graphs.forward(step, flat)) is not None:
        return logits
    ctx = PagedContext(cache, step, compiled=hasattr(model, "_orig_mod"))   # torch.compile's module
    if step.is_decode:  # one token per sequence: every position is a last one, no gather of rows
        return model(flat[None], step.positions[None].to(device), ctx)[0]                  # [B, V]
    last = torch.tensor([len(t) for t in inputs], device=device).cumsum(0) - 1             # [B]
    return model(flat[None], step.positions[None].to(device), ctx, logits_at=last)


_TRACE_CONFIG = {"install_free_tensors": True, "specialize_int": True, "specialize_float": True}
"""Dynamo settings a serving step's forward is traced under (:func:`compile_forward`)."""


def compile_forward(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """``model`` through ``torch.compile`` as a serving step runs it (``EngineConfig.compile``).

    Dynamic shapes: the tokens per step change every step; a few graphs serve them all
    (:meth:`Engine.warm_up` builds them). No guards on the modules' attributes: they are fixed once
    the engine holds the model, and checking them cost ~1.3 ms a step on a CPU core (SmolLM2's 30
    layers). Dynamo keeps its compiled code on the forward's code object, shared by every model
    of the class, so without those guards another model in the process could run this one's
    graph: ``model`` gets a forward of its own (a copy of the code object), hence a cache of its
    own. No duck shapes (a process-wide switch, read when a graph is traced): sizes equal by chance
    in the warm-up (a context of 16 keys, RoPE's 16 frequencies) must not become one symbol that
    the first step where they differ recompiles. ``backend``: tests trace with ``aot_eager``.

    Traced under :data:`_TRACE_CONFIG` (set around each call, read when a graph is traced; other
    ``torch.compile`` users in the process keep the defaults): the weights are installed in the
    graph rather than passed in (Dynamo's generated code fetched ~300 of them by attribute chains
    before every call: ~0.65 ms a SmolLM2 step on a CPU core), and the Python ints and floats the
    forward reads (the cache's page map, its id, the norms' eps) are constants rather than 120
    symbolic inputs (a serving step's ints are fixed per engine: warm-up and mixed workloads compile
    nothing new, tested). Inductor's wrapper skips its per-buffer size asserts (~430 calls a step).
    """
    import types

    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    shared = type(model).forward
    own = types.FunctionType(shared.__code__.replace(), shared.__globals__, shared.__name__, shared.__defaults__,
                             shared.__closure__)
    own.__kwdefaults__ = shared.__kwdefaults__
    model.forward = types.MethodType(own, model)  # type: ignore[method-assign]
    compiled = torch.compile(model, dynamic=True, backend=backend,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                      **({"size_asserts": False} if backend == "inductor" else {})})
    run = compiled.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        old = {k: getattr(dynamo_config, k) for k in _TRACE_CONFIG}
        for k, v in _TRACE_CONFIG.items():
            setattr(dynamo_config, k, v)
        try:
            return run(*args, **kwargs)
        finally:
            for k, v in old.items():
                setattr(dynamo_config, k, v)

    compiled.forward = forward  # type: ignore[method-assign]
    return compiled


class Engine:
    """Continuous batching over ``model`` and a paged ``cache`` (see module docstring).

    ``cache`` is a :class:`ryzlab.kv.cache.PagedKVCache` built for the model's config, used
    only through its public API (add_sequence / extend / write / attend / free / read_kv).
    """

    def __init__(self, model: torch.nn.Module, cache: Any, config: EngineConfig = EngineConfig(), *,
                 control: Any = None):
        self.model = model
        self.cache = cache
        self.config = config
        self.control = control
        """The group's control :class:`ryzlab.parallel.comm.Comm` (None or one rank: no plan is sent)."""
        self.grouped = control is not None and control.world_size > 1
        if self.grouped and config.preemption == "swap":
            raise ValueError("preemption='swap' copies a sequence's K/V through one rank; a tp x cp group "
                             "holds it spread over ranks: use preemption='recompute'")
        if config.split_prefill is None:  # split only where the attention pads a step to its longest query
            config = dataclasses.replace(config, split_prefill=getattr(cache, "kernel", "torch") != "triton")
            self.config = config
        self.scheduler = Scheduler(cache, config, grouped=self.grouped)
        self.net: torch.nn.Module = model
        """What a step runs: ``model``, or its ``torch.compile`` d forward (``config.compile``)."""
        if config.compile:
            self.net = compile_forward(model)
        self.graphs: Any = None
        """A :class:`ryzlab.serve.graphs.DecodeGraphs` when ``config.cuda_graphs`` can hold here."""
        if config.cuda_graphs:
            from ryzlab.serve.graphs import DecodeGraphs, graphs_unavailable_reason

            why = graphs_unavailable_reason(cache, grouped=self.grouped)
            if why:
                log.warning("cuda_graphs=True but decode steps run eagerly: %s", why)
            else:
                self.graphs = DecodeGraphs(model, cache, max_batch=config.max_num_seqs,
                                           max_model_len=config.max_model_len)
        self.vocab_size: int = model.config.vocab_size
        self._seq_ids = itertools.count()
        self.last_step_s = time.monotonic()

    # the scheduler's state, read by the API's health and metrics and by tests
    @property
    def waiting(self) -> collections.deque[EngineSequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[EngineSequence]:
        return self.scheduler.running

    @property
    def by_id(self) -> dict[str, EngineSequence]:
        return self.scheduler.by_id

    @property
    def counters(self) -> collections.Counter:
        return self.scheduler.counters

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile before the first request: the graphs a serving step runs, on scratch sequences
        freed after; seconds taken. A dimension of size 1 gets a graph of its own, and so does a
        step of :data:`ryzlab.models.quant.linear.DENSE_ROWS` tokens or more (packed weights unpack
        to one dense GEMM there): a prefill of one sequence, of several, and of the step's token
        budget; a decode of one sequence and of several. (A decode of ``DENSE_ROWS`` sequences or
        more compiles when it first happens.)

        A no-op (0.0) without ``config.compile``, and in a tp x cp group (the other ranks would
        have to run the same forwards: there the first steps compile). Counters are untouched.
        """
        from ryzlab.models.quant.linear import DENSE_ROWS

        if self.net is self.model or self.grouped:
            return 0.0
        t0, cache, cfg = time.monotonic(), self.cache, self.config
        big = min(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
        a, b, c, d = (("__warm_up__", i) for i in range(4))
        try:
            for sid, n in ((a, 3), (b, 1), (c, 2)):  # prompts by count: no prefix-cache entry is made
                if cache.add_sequence(sid, n) is None:
                    raise RuntimeError("the KV cache has no room for the compile warm-up's 8 tokens")
            self.execute([a], [[1, 2, 3]])              # prefill of one sequence
            self.execute([b], [[1]])                    # decode of one
            cache.allocate_slots(a, [1])
            self.execute([c, a], [[1, 1], [1]])         # prefill of several (and a decode beside)
            for sid in (a, b):
                cache.allocate_slots(sid, [1])
            self.execute([a, b], [[1], [1]])            # decode of several
            if big >= DENSE_ROWS:
                if cache.add_sequence(d, 2 * big) is None:
                    log.warning("compile warm-up: no room in the KV cache for two %d-token prefills; the first "
                                "such steps compile", big)
                else:
                    self.execute([d], [[1] * big])      # prefills of the whole token budget: one sequence,
                    cache.free(a)
                    cache.add_sequence(a, 1)
                    self.execute([d, a], [[1] * (big - 1), [1]])  # and several
        finally:
            for sid in (a, b, c, d):
                if sid in cache:
                    cache.free(sid)
        took = time.monotonic() - t0
        log.info("torch.compile warm-up: %.1f s (prefill and decode, of one and of several sequences)", took)
        return took

    # ------------------------------------------------------------------ requests
    def capacity_tokens(self) -> int | None:
        """Tokens the whole cache holds (None = unbounded)."""
        return self.cache.capacity_tokens

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
        self.scheduler.add(EngineSequence(request_id, sid, list(prompt), params, time.monotonic(), generator=gen))
        self.counters["requests"] += 1

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if unknown/finished."""
        if not self.scheduler.abort(request_id):
            return False
        self.counters["aborted"] += 1
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    # ------------------------------------------------------------------ execution
    def _sample(self, seq: EngineSequence, logits: torch.Tensor) -> tuple[int, Logprob | None]:
        """logits [V] -> (next token id, its logprob and top alternatives or None): :func:`sample`."""
        return sample(logits, seq.params, seq.generator)

    def _sample_batch(self, seqs: list[EngineSequence], logits: torch.Tensor
                      ) -> list[tuple[int, Logprob | None] | Exception]:
        """logits [B, V] -> per sequence (token, logprob) or the exception its sampling raised.

        Greedy rows share one argmax (:func:`fused_greedy`); the others go through :meth:`_sample`
        one by one, and a failure there is returned for that sequence alone."""
        fused = fused_greedy(logits, [s.params for s in seqs])
        out: list[tuple[int, Logprob | None] | Exception] = []
        for i, s in enumerate(seqs):
            if i in fused:
                out.append((fused[i], None))
                continue
            try:
                out.append(self._sample(s, logits[i]))
            except Exception as e:  # noqa: BLE001 - this request's sampling failed: it fails alone
                out.append(e)
        return out

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduling round + one ragged forward; returns new tokens and finished requests.

        A failing forward fails the requests of this step (error outputs, blocks freed); the
        engine itself keeps going. In a tp x cp group a failed forward is raised instead: the
        other ranks may be mid-collective, so the group must restart.
        """
        sched = self.scheduler
        plan = sched.schedule()
        outputs: list[StepOutput] = []
        if plan:
            seqs = [s for s, _ in plan]
            inputs = [s.token_range(s.num_computed, s.num_computed + n) for s, n in plan]
            try:
                logits = self._forward([s.seq_id for s in seqs], inputs)  # [B, V]
            except Exception as e:  # noqa: BLE001 - fail the culprit alone, keep the engine alive
                if self.grouped:
                    raise
                log.exception("forward failed for %d sequence(s)", len(seqs))
                if len(seqs) > 1:   # whose fault? each reruns alone (recompute) to find out
                    sched.isolate(seqs)
                else:
                    sched.finish(seqs[0])
                    self.counters["failed"] += 1
                    outputs.append(StepOutput(seqs[0].request_id, TokenChunk(), "error", f"{type(e).__name__}: {e}"))
                # extend() registered the prefix hashes of blocks this forward never wrote
                self.cache.evict_cached()
                self.last_step_s = time.monotonic()
                return outputs
            ready: list[int] = []  # rows of the plan that sample a token in this step
            for i, (s, n) in enumerate(plan):
                s.num_computed += n
                if n > 1 or s.pending > 0:
                    self.counters["prefill_tokens"] += n
                else:
                    self.counters["decode_tokens"] += 1
                if s.pending == 0:  # a mid-prefill chunk (pending > 0) has no token yet
                    ready.append(i)
            rows = logits if len(ready) == len(plan) else logits[torch.tensor(ready, dtype=torch.long, device=logits.device)]
            picks = self._sample_batch([plan[i][0] for i in ready], rows)
            for i, pick in zip(ready, picks):
                s = plan[i][0]
                if isinstance(pick, Exception):  # this request's sampling failed: it fails alone
                    log.error("sampling failed for %s", s.request_id, exc_info=pick)
                    sched.finish(s)
                    self.counters["failed"] += 1
                    outputs.append(StepOutput(s.request_id, TokenChunk(), "error",
                                              f"sampling failed: {type(pick).__name__}: {pick}"))
                    continue
                tok, lp = pick
                s.suspect = False
                s.output.append(tok)
                self.counters["generated_tokens"] += 1
                reason = s.finish_reason
                if reason is not None:
                    sched.finish(s)
                    self.counters["finished"] += 1
                chunk = TokenChunk([tok])
                if lp is not None:
                    chunk.logprobs = [lp]
                chunk.finish_reason = reason
                outputs.append(StepOutput(s.request_id, chunk, reason))
        self.counters["steps"] += 1
        self.counters["batch_size_sum"] += len(plan)
        self.last_step_s = time.monotonic()
        return outputs

    def _forward(self, seq_ids: list[int], inputs: list[list[int]]) -> torch.Tensor:
        """Run the step on every rank of the group: send the plan first (the cache calls made
        since the last plan, then the forward's inputs), then compute here."""
        if self.grouped:
            self.control.broadcast_object(("step", self.scheduler.take_ops(), seq_ids, inputs))
        return self.execute(seq_ids, inputs)

    def execute(self, seq_ids: list[int], inputs: list[list[int]]) -> torch.Tensor:
        """This rank's forward of one step: :func:`ragged_forward` -> logits ``[B, vocab]``."""
        return ragged_forward(self.net, self.cache, seq_ids, inputs, graphs=self.graphs)

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
            self.execute(seq_ids, inputs)
            steps += 1

    def close(self) -> None:
        """Driver: tell the other ranks of the group to leave :meth:`follow` (no-op at one rank)."""
        if self.grouped and self.control.rank == 0:
            self.control.broadcast_object(("stop",))

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
