"""``ryzlab serve``: the HTTP API over one in-process engine or a router over worker processes."""
from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from ryzlab.config import CODECS, PREEMPTIONS

__all__ = ["add_parser", "cmd_serve", "make_backend", "serve_limits", "check_exposure", "replica_spec", "max_model_len",
           "served_name"]

if TYPE_CHECKING:
    from ryzlab.serve.spec import ReplicaSpec

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``ryzlab``'s subparsers."""
    from ryzlab.orchestrator.balance import POLICY_NAMES

    s = subparsers.add_parser(
        "serve", help="serve a model over HTTP (OpenAI-compatible /v1/completions, /v1/chat/completions, "
             "/v1/models; /health, Prometheus /metrics)",
        description="Continuous-batching engine(s) over the paged, compressed KV cache behind a FastAPI "
                    "server. --tp/--cp split one model replica over tp x cp ranks (tensor and context "
                    "parallelism); --workers N > 1 starts N replicas behind a load-balancing router "
                    "(data parallelism; one replica per GPU, or per tp x cp GPUs, where there are GPUs).")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--model", default="reference",
                   help="'reference' (the shipped checkpoint; default), 'random' (untrained weights of the reference "
                        "shape: timing only), a Hugging Face folder (config.json + *.safetensors) or a .gguf file")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32 on CPU, the checkpoint's on a GPU)")
    s.add_argument("--codec", default="none", choices=CODECS, help="KV-cache storage format (default none)")
    s.add_argument("--weights", default="float32", metavar="FORMAT",
                   help="weight format: float32 (default), bf16, int8, int8-g<N>, int4-g32/g64/g128/g256, ternary, "
                        "gguf (a GGUF file's own Q8_0/Q4_x blocks); add -f32 for float32 scales")
    s.add_argument("--workers", type=int, default=1, help="engine replicas (default 1: in-process when tp x cp = 1)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica (default 1)")
    s.add_argument("--cp", type=int, default=1, help="context-parallel ranks per replica (default 1)")
    s.add_argument("--policy", default="least_outstanding", choices=POLICY_NAMES,
                   help="load-balancing policy across workers (default least_outstanding)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV page (default 16)")
    s.add_argument("--num-blocks", type=int, default=1024, help="KV pages per engine (default 1024)")
    s.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences batched together (default: from the KV capacity, min(--num-blocks, 256))")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens at most (default: the model's context, e.g. 8192 for SmolLM2)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default ryzlab-reference, ryzlab-random "
                        "or the checkpoint's folder / file name)")
    s.add_argument("--preemption", default="recompute", choices=PREEMPTIONS,
                   help="what a full cache does to a victim sequence (default recompute)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per engine (default: torch's)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward, compiled before the server answers (1-2 min on a "
                        "2-core CPU; off by default for that start-up cost; SmolLM2 int4 single stream 1.5x faster)")
    s.add_argument("--api-key", default=os.environ.get("RYZLAB_API_KEY"),
                   help="clients of /v1/* must send 'Authorization: Bearer KEY' (default: $RYZLAB_API_KEY); "
                        "required to bind beyond loopback unless --no-auth")
    s.add_argument("--metrics-auth", action="store_true",
                   help="/metrics and /stats need the --api-key too (default: open, for Prometheus scrapers "
                        "without a key; /health never needs one)")
    s.add_argument("--no-auth", action="store_true",
                   help="allow binding beyond loopback without an API key (anyone who reaches the port may use it)")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name clients may send in the Host header (repeatable; default: the bound address, "
                        "and localhost names for a loopback bind)")
    s.add_argument("--max-pending", type=int, default=None,
                   help="sequences in flight (running + queued) before new requests get 429 "
                        "(default 4 x --max-num-seqs x --workers)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run before it is aborted (504; default 600)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body, checked before reading it (413; default 1 MiB)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (408; default 30)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds the request line and headers may take to arrive (408 and close; default 10)")
    s.add_argument("--max-connections-per-client", type=int, default=256, metavar="N",
                   help="open connections per client address at most; one more gets 429 and is closed (default 256)")
    s.set_defaults(fn=cmd_serve)
    return s


def parse_weights_flag(value: str) -> str:
    """``--weights``: a valid weight format name (``ValueError`` naming the choices otherwise)."""
    from ryzlab.models.quant import parse_weight_format

    return parse_weight_format(value).name


def replica_spec(args: argparse.Namespace) -> ReplicaSpec:
    """The :class:`~ryzlab.serve.spec.ReplicaSpec` of the flags (raises ``ValueError`` naming the
    valid choices for a bad model / dtype / codec / tp x cp layout / scheduler knob)."""
    import torch

    from ryzlab.config import CacheConfig, ParallelConfig
    from ryzlab.serve.scheduler import EngineConfig
    from ryzlab.serve.spec import ReplicaSpec

    seqs = num_seqs(args)
    engine = EngineConfig(max_num_seqs=seqs, max_model_len=max_model_len(args),
                          preemption=args.preemption, max_num_batched_tokens=max(256, seqs),
                          compile=getattr(args, "compile", False))
    # GPUs where present (one worker per GPU), CPU otherwise
    return ReplicaSpec(model=args.model, dtype=args.dtype, device="cuda" if torch.cuda.is_available() else "cpu",
                       weights=parse_weights_flag(args.weights),
                       cache=CacheConfig(codec=args.codec, block_size=args.block_size, num_blocks=args.num_blocks),
                       parallel=ParallelConfig(tp=args.tp, cp=args.cp), engine=engine)


def make_backend(args: argparse.Namespace) -> Any:
    """An :class:`AsyncEngine` (``--workers 1``) or a started :class:`Router`; validated first."""
    from ryzlab.serve.async_engine import AsyncEngine
    from ryzlab.serve.replica import build_engine
    from ryzlab.serve.router import Router

    for name in ("workers", "tp", "cp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    check_exposure(args)
    serve_limits(args)
    name = served_name(args)
    spec = replica_spec(args)  # bad knobs, model, codec or layout fail here, before any process starts
    if args.workers == 1 and spec.world_size == 1:
        if spec.device == "cuda":
            spec = spec.on_device("cuda:0")
        # built in the thread that steps it: one OpenMP pool (AsyncEngine.build says why)
        return AsyncEngine.build(lambda: build_engine(spec, threads=args.threads), model_name=name)
    return Router(workers=args.workers, policy=args.policy, spec=spec, model_name=name,
                  threads_per_worker=args.threads or 1).start()


def check_exposure(args: argparse.Namespace) -> None:
    """Binding beyond loopback needs ``--api-key`` or an explicit ``--no-auth`` (raises otherwise)."""
    from ryzlab.serve.guard import is_loopback

    if getattr(args, "api_key", None) is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    if getattr(args, "metrics_auth", False) and not getattr(args, "api_key", None):
        raise ValueError("--metrics-auth needs --api-key KEY (or RYZLAB_API_KEY): the key /metrics and /stats ask for")
    if not is_loopback(args.host) and not getattr(args, "api_key", None) and not getattr(args, "no_auth", False):
        raise ValueError(f"--host {args.host} makes the server reachable from other machines: give --api-key KEY "
                         f"(or set RYZLAB_API_KEY), or --no-auth to serve without one")


def serve_limits(args: argparse.Namespace) -> Any:
    """The API's :class:`ServeLimits` from the flags (raises ``ValueError`` for bad values)."""
    from ryzlab.serve.api import ServeLimits

    pending = args.max_pending if args.max_pending is not None else 4 * num_seqs(args) * args.workers
    return ServeLimits(max_pending=pending, request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                       body_timeout_s=args.body_timeout, header_timeout_s=getattr(args, "header_timeout", 10.0),
                       max_connections_per_client=getattr(args, "max_connections_per_client", 256))


def num_seqs(args: argparse.Namespace) -> int:
    """``--max-num-seqs``, else derived from the KV capacity (:func:`ryzlab.serve.scheduler.max_num_seqs_for`)."""
    from ryzlab.serve.scheduler import max_num_seqs_for

    if getattr(args, "max_num_seqs", None) is not None:
        if args.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
        return args.max_num_seqs
    if args.num_blocks < 1:
        raise ValueError(f"--num-blocks must be >= 1, got {args.num_blocks}")
    return max_num_seqs_for(args.num_blocks)


def max_model_len(args: argparse.Namespace) -> int:
    """``--max-model-len``, else the model's context (read from its metadata: no weight is loaded)."""
    from ryzlab.models import check_model

    return args.max_model_len if args.max_model_len is not None else check_model(args.model).config.max_seq_len


def served_name(args: argparse.Namespace) -> str:
    """``--served-model-name``, else :func:`model_name` of ``--model``."""
    name = getattr(args, "served_model_name", None)
    if name is not None and not name.strip():
        raise ValueError("--served-model-name is empty")
    return name or model_name(args.model)


def model_name(model: str) -> str:
    """The ``model`` id the API reports: ryzlab-reference, ryzlab-random, or the checkpoint's name."""
    from pathlib import Path

    return f"ryzlab-{model}" if model in ("reference", "random") else Path(model).expanduser().resolve().stem


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ryzlab.serve.api import create_app

    import sys

    print(f"ryzlab serve: loading {args.model} ({args.workers} worker(s), tp {args.tp} x cp {args.cp}) ...",
          file=sys.stderr, flush=True)  # a checkpoint and worker processes take seconds to minutes
    backend = make_backend(args)
    limits = serve_limits(args)
    app = create_app(backend, host=args.host, allowed_hosts=tuple(args.allowed_host), api_key=args.api_key,
                     limits=limits, metrics_auth=args.metrics_auth)
    print(f"ryzlab serve: http://{args.host}:{args.port}/v1  model={served_name(args)} codec={args.codec} "
          f"workers={args.workers} tp={args.tp} cp={args.cp}" + (f" policy={args.policy}" if args.workers > 1 else "")
          + (" auth=api-key" if args.api_key else " auth=none") + (" metrics-auth" if args.metrics_auth else ""))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=limits.protocol())
    finally:
        backend.shutdown()
    return 0
