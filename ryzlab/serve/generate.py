"""``ryzlab generate``: one prompt through a model split over tp x cp ranks, printed.

It starts its own ranks (:func:`ryzlab.orchestrator.launch`), or, started by torchrun
(``torchrun --nproc-per-node 2 -m ryzlab generate --tp 2 ...``, the path to several machines),
runs as the rank torchrun made it. Every rank builds its model shard and cache and runs the same
continuous-batching engine as ``ryzlab serve``: rank 0 schedules and samples, the others follow
its plans. At tp = cp = 1 the same code runs in this process, every collective a no-op.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

__all__ = ["GenerateRequest", "generate", "generate_rank"]

if TYPE_CHECKING:
    from ryzlab.serve.spec import ReplicaSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    prompt: str
    max_tokens: int = 32
    tp: int = 1
    cp: int = 1
    codec: str = "none"
    temperature: float = 0.0
    """0 = greedy."""
    seed: int = 0
    model: str = "reference"
    """'reference', 'random', a Hugging Face folder or a .gguf file (:data:`ryzlab.models.MODEL_CHOICES`)."""
    dtype: str | None = None
    """float32 / bfloat16 / float16 (default: float32 on CPU, the checkpoint's on a GPU)."""
    weights: str = "float32"
    """Weight format (:data:`ryzlab.models.quant.WEIGHT_FORMAT_CHOICES`)."""
    block_size: int = 16
    threads: int | None = None
    backend: str = "auto"

    def spec(self, max_model_len: int = 1024) -> ReplicaSpec:
        """The :class:`~ryzlab.serve.spec.ReplicaSpec` that runs this request (validates model, dtype,
        codec and the tp x cp layout): an unbounded cache, one sequence."""
        from ryzlab.config import CacheConfig, ParallelConfig
        from ryzlab.serve.scheduler import EngineConfig
        from ryzlab.serve.spec import ReplicaSpec

        return ReplicaSpec(model=self.model, dtype=self.dtype, weights=self.weights,
                           cache=CacheConfig(codec=self.codec, block_size=self.block_size, num_blocks=None),
                           parallel=ParallelConfig(tp=self.tp, cp=self.cp),
                           engine=EngineConfig(max_model_len=max_model_len, max_num_seqs=1))

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def _tokenizer(model: str) -> Any:
    from ryzlab.serve.replica import tokenizer_for

    return tokenizer_for(model)


def generate_rank(rank: int, world_size: int, req: GenerateRequest,
                  progress: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One rank's part: rank 0 returns ``{"text", "token_ids", ...}``, the others None.

    ``progress`` (optional) gets ``"counters"``: the driver engine's live counters, read after a
    failure to tell where it happened (decode tokens so far)."""
    from ryzlab.parallel.mesh import init_parallel
    from ryzlab.serve.replica import build_engine
    from ryzlab.serve.sampling import SamplingParams

    tok = _tokenizer(req.model)
    ids = tok.encode(req.prompt)  # special tokens as the tokenizer adds them (a BOS for Llama models)
    spec = req.spec(max_model_len=len(ids) + req.max_tokens)
    groups = init_parallel(spec.parallel)
    engine = build_engine(spec, groups=groups, threads=req.threads)
    if progress is not None:
        progress["counters"] = engine.counters
    if not groups.is_driver:
        engine.follow()
        return None
    try:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                                stop_token_ids=tuple(tok.eos_token_ids))
        out = engine.generate([ids], params)[0]
    finally:
        engine.close()
    return {"text": tok.decode(out), "token_ids": out, "prompt_tokens": len(ids), "tp": req.tp, "cp": req.cp,
            "device": str(groups.device)}


def generate(req: GenerateRequest) -> dict[str, Any]:
    """Validate, then run on ``tp * cp`` ranks (in this process at one rank, or under torchrun)."""
    shape = req.spec().shape
    n_prompt = len(_tokenizer(req.model).encode(req.prompt))
    if n_prompt + req.max_tokens > shape.max_seq_len:  # before any process starts
        raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds the model's maximum "
                         f"length {shape.max_seq_len}; lower --max-tokens to at most {max(0, shape.max_seq_len - n_prompt)}")
    world = req.tp * req.cp
    if _under_torchrun():
        from ryzlab.orchestrator.launch import init_from_env

        import torch.distributed as dist

        from ryzlab.orchestrator.nodes import NodeWatch

        ctx = init_from_env(req.backend)
        progress: dict[str, Any] = {}
        watch = None
        try:
            if ctx.world_size != world:
                raise ValueError(f"torchrun started {ctx.world_size} ranks but --tp {req.tp} x --cp {req.cp} = {world}")
            watch = NodeWatch()
            try:
                out = generate_rank(ctx.rank, ctx.world_size, req, progress) or {}
                dist.barrier()
            except Exception as e:  # noqa: BLE001 - a collective broke: say which node went away, if one did
                where = (f"after {progress['counters']['decode_tokens']} decode token(s)"
                         if ctx.rank == 0 and "counters" in progress else "during generate")
                lost = watch.describe(e, where)
                if lost is None:
                    raise
                raise lost from e
            return {**out, "nodes": len(watch.nodes)} if out else out
        finally:  # tear the groups down before exit: gloo's threads must not outlive the interpreter
            if watch is not None:
                watch.close()
            with contextlib.suppress(Exception):  # a broken group may refuse; the process exits anyway
                dist.destroy_process_group()
    if world == 1:
        return generate_rank(0, 1, req) or {}
    from ryzlab.orchestrator import launch

    return launch(generate_rank, world, args=(req,), backend=req.backend,
                  threads_per_rank=req.threads)[0]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                  and "MASTER_ADDR" in os.environ)
