"""One model replica: a tp x cp group of ranks, each with its model shard, its cache and an engine.

* :func:`build_engine` builds the engine of one rank (the whole replica at tp = cp = 1);
* :func:`start_replica` is what a serving worker process runs: at one rank it builds the engine
  in-process; for a group it starts ranks ``1..world-1`` (they build theirs and :meth:`Engine.follow`
  the plans), joins the group as rank 0 (the driver) and watches the other ranks: a replica with a
  dead rank cannot serve, so the driver exits and the router restarts the whole replica.

Data parallelism is several replicas behind :class:`ryzlab.serve.router.Router`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..config import CODECS, CacheConfig, ConfigError, ModelConfig, ParallelConfig, check_choice
from .engine import Engine, EngineConfig

__all__ = ["check_engine_args", "build_engine", "start_replica", "replica_rank_main", "load_net", "tokenizer_for"]

log = logging.getLogger(__name__)

MODEL_HELP = "'reference' (the shipped checkpoint), 'random' (untrained, reference shape: timing only) or a checkpoint path"


def check_engine_args(*, model: str = "reference", codec: str = "none", device: str = "cpu", tp: int = 1,
                      cp: int = 1, num_blocks: int | None = None, model_config: ModelConfig | None = None,
                      **_: Any) -> ModelConfig:
    """Raise ``ValueError`` naming the valid choices for a bad model / codec / device / layout.

    Reads no weights; returns the model's shape (for callers that size things from it).
    """
    from ..model import REFERENCE_CHECKPOINT
    from ..parallel.layout import validate_parallel

    check_choice("codec", codec, CODECS)
    if not (device == "cpu" or str(device).startswith("cuda")):
        raise ValueError(f"device={device!r} is not valid; choose 'cpu' or 'cuda[:N]'")
    if model == "random":
        shape = model_config or ModelConfig()
    elif model == "reference":
        if not REFERENCE_CHECKPOINT.exists():
            raise ValueError(f"model='reference' needs the shipped checkpoint {REFERENCE_CHECKPOINT}, which is "
                             f"missing; train it (python -m ryzlab.train) or choose 'random' or a checkpoint path")
        shape = _checkpoint_config(REFERENCE_CHECKPOINT)
    elif Path(model).is_file():
        shape = _checkpoint_config(Path(model))
    else:
        raise ValueError(f"model={model!r} is not valid; choose {MODEL_HELP}")
    try:
        validate_parallel(shape, ParallelConfig(tp=tp, cp=cp), CacheConfig(codec=codec, num_blocks=num_blocks))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return shape


def _checkpoint_config(path: Path) -> ModelConfig:
    import json

    from ..config import from_dict

    meta = path.with_suffix(".json")
    if not meta.exists():
        raise ValueError(f"model={str(path)!r}: no {meta.name} beside it (ryzlab checkpoints carry their config)")
    return from_dict(ModelConfig, json.loads(meta.read_text())["config"], where=str(path))


class _Bytes:
    """UTF-8 bytes: the reference model's (and random models') tokenizer."""

    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        return bytes(t for t in ids if 0 <= t < 256).decode("utf-8", errors="replace")


def tokenizer_for(model: str) -> Any:
    """The tokenizer of ``model`` (``encode``, ``decode``, ``eos_token_ids``)."""
    return _Bytes()


def load_net(model: str, *, device: str | torch.device = "cpu", seed: int = 0,
             model_config: ModelConfig | None = None, tp: Any = None) -> torch.nn.Module:
    """The model of one rank: loaded (or random), then sharded over ``tp`` (a Comm) if given."""
    from ..model import Transformer, load_checkpoint, load_reference_model
    from ..parallel.tp import apply_tp

    if model == "reference":
        net, _ = load_reference_model(device=device)
    elif model == "random":
        torch.manual_seed(seed)
        net = Transformer(model_config or ModelConfig()).to(device).eval()
    else:
        net, _ = load_checkpoint(model, device=device)
    if tp is not None:
        apply_tp(net, tp)
    return net


def build_engine(*, model: str = "reference", codec: str = "none", block_size: int = 16,
                 num_blocks: int | None = 512, config: EngineConfig = EngineConfig(),
                 model_config: ModelConfig | None = None, seed: int = 0, threads: int | None = None,
                 device: str = "cpu", groups: Any = None, tp: int = 1, cp: int = 1) -> Engine:
    """The engine of one rank over ``model`` (see :data:`MODEL_HELP`); bad choices raise before
    anything loads. ``groups``: this rank's :class:`ryzlab.parallel.ParallelGroups` in a tp x cp
    replica (None: one rank; ``tp``/``cp`` must then be 1)."""
    check_engine_args(model=model, codec=codec, device=device, tp=tp, cp=cp, num_blocks=num_blocks,
                      model_config=model_config)
    if groups is None and tp * cp != 1:
        raise ValueError(f"tp={tp} x cp={cp} needs the replica's process groups (start_replica / launch)")
    from ..kv.cache import PagedKVCache

    cache_config = CacheConfig(codec=codec, block_size=block_size, num_blocks=num_blocks,
                               enable_prefix_caching=config.enable_prefix_caching)
    if threads:
        torch.set_num_threads(threads)
    if groups is not None:
        device = str(groups.device)
    net = load_net(model, device=device, seed=seed, model_config=model_config,
                   tp=groups.tp if groups is not None else None)
    local = getattr(net, "local_config", net.config)
    cache = PagedKVCache(local, cache_config, dtype=next(net.parameters()).dtype, device=device,
                         cp=groups.cp if groups is not None else None)
    return Engine(net, cache, config, control=groups.control if groups is not None else None)


def _engine_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kw)
    kw["config"] = EngineConfig(**kw.get("config", {}))
    return kw


def replica_rank_main(rank: int, world_size: int, engine_kwargs: dict[str, Any]) -> int:
    """A non-driver rank of a replica: build its shard and engine, follow the driver's plans."""
    from ..parallel.mesh import init_parallel

    kw = _engine_kwargs(engine_kwargs)
    groups = init_parallel(ParallelConfig(tp=kw.get("tp", 1), cp=kw.get("cp", 1)))
    return build_engine(groups=groups, **kw).follow()


def start_replica(engine_kwargs: dict[str, Any], *, threads: int | None = None,
                  watch_interval_s: float = 0.2) -> Engine:
    """Build this process's engine: the whole replica at one rank, else the driver of a group.

    For a group, ranks ``1..world-1`` start as processes (they exit with this one), this
    process joins as rank 0, and a watcher thread ends this process if any other rank dies.
    """
    kw = _engine_kwargs(engine_kwargs)
    tp, cp = kw.get("tp", 1), kw.get("cp", 1)
    check_engine_args(**kw)
    if tp * cp == 1:
        return build_engine(threads=threads, **kw)
    from ..orchestrator.launch import join_group, start_ranks
    from ..parallel.mesh import init_parallel

    world = tp * cp
    ranks = start_ranks(replica_rank_main, world, range(1, world), args=(engine_kwargs,),
                        threads_per_rank=threads or 1)
    join_group(0, world, ranks.port, ranks.backend)
    if threads:
        torch.set_num_threads(threads)
    engine = build_engine(groups=init_parallel(ParallelConfig(tp=tp, cp=cp)), **kw)

    def watch() -> None:
        while True:
            time.sleep(watch_interval_s)
            if dead := ranks.dead():
                log.error("replica rank(s) %s died; the driver exits so the replica is restarted whole", dead)
                os._exit(1)

    threading.Thread(target=watch, name="ryzlab-replica-watch", daemon=True).start()
    engine.ranks = ranks
    return engine
