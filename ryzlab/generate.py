"""``ryzlab generate``: one prompt through a model split over tp x cp ranks, printed.

It starts its own ranks (:func:`ryzlab.orchestrator.launch`), or, started by torchrun
(``torchrun --nproc-per-node 2 -m ryzlab generate --tp 2 ...``, the path to several machines),
runs as the rank torchrun made it. Every rank builds its model shard and cache and runs the same
continuous-batching engine as ``ryzlab serve``: rank 0 schedules and samples, the others follow
its plans. At tp = cp = 1 the same code runs in this process, every collective a no-op.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from .config import CODECS

__all__ = ["GenerateRequest", "generate", "generate_rank", "add_parser"]

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
    block_size: int = 16
    threads: int | None = None
    backend: str = "auto"

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
    from .serve.replica import tokenizer_for

    return tokenizer_for(model)


def generate_rank(rank: int, world_size: int, req: GenerateRequest) -> dict[str, Any] | None:
    """One rank's part: rank 0 returns ``{"text", "token_ids", ...}``, the others None."""
    from .config import ParallelConfig
    from .parallel.mesh import init_parallel
    from .serve.engine import EngineConfig, SamplingParams
    from .serve.replica import build_engine

    groups = init_parallel(ParallelConfig(tp=req.tp, cp=req.cp))
    tok = _tokenizer(req.model)
    ids = tok.encode(req.prompt)  # special tokens as the tokenizer adds them (a BOS for Llama models)
    cfg = EngineConfig(max_model_len=len(ids) + req.max_tokens, max_num_seqs=1)
    engine = build_engine(model=req.model, codec=req.codec, block_size=req.block_size, num_blocks=None,
                          config=cfg, groups=groups, tp=req.tp, cp=req.cp, threads=req.threads, dtype=req.dtype)
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
    from .serve.replica import check_engine_args

    check_engine_args(model=req.model, codec=req.codec, tp=req.tp, cp=req.cp, dtype=req.dtype)  # before any process
    world = req.tp * req.cp
    if _under_torchrun():
        from .orchestrator.launch import init_from_env

        import torch.distributed as dist

        ctx = init_from_env(req.backend)
        try:
            if ctx.world_size != world:
                raise ValueError(f"torchrun started {ctx.world_size} ranks but --tp {req.tp} x --cp {req.cp} = {world}")
            out = generate_rank(ctx.rank, ctx.world_size, req) or {}
            dist.barrier()
            return out
        finally:  # tear the groups down before exit: gloo's threads must not outlive the interpreter
            dist.destroy_process_group()
    if world == 1:
        return generate_rank(0, 1, req) or {}
    from .orchestrator import launch

    return launch(generate_rank, world, args=(req,), backend=req.backend,
                  threads_per_rank=req.threads)[0]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                  and "MASTER_ADDR" in os.environ)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    g = subparsers.add_parser(
        "generate", help="complete one prompt with a model split over tp x cp ranks",
        description="Greedy (or sampled) completion of --prompt. Starts tp x cp ranks itself, or runs as the "
                    "rank torchrun made it: torchrun --nproc-per-node 2 -m ryzlab generate --tp 2 --prompt ...")
    g.add_argument("--prompt", required=True, help="text to complete")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    g.add_argument("--cp", type=int, default=1, help="context-parallel ranks (default 1)")
    g.add_argument("--codec", default="none", choices=CODECS, help="KV-cache storage format (default none)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--model", default="reference",
                   help="'reference' (default), 'random', a Hugging Face folder or a .gguf file")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32 on CPU, the checkpoint's on a GPU)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    g.add_argument("--json", action="store_true", help="print one JSON line with text and token_ids")
    g.set_defaults(fn=cmd_generate)
    return g


def cmd_generate(args: argparse.Namespace) -> int:
    req = GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens, tp=args.tp, cp=args.cp, codec=args.codec,
                          temperature=args.temperature, seed=args.seed, model=args.model, threads=args.threads,
                          dtype=args.dtype)
    out = generate(req)
    if not out:  # a torchrun rank other than 0
        return 0
    if args.json:
        print(json.dumps({"text": out["text"], "token_ids": out["token_ids"], "request": asdict(req)}))
    else:
        print(out["text"])
    return 0
