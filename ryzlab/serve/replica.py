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
from typing import Any

import torch

from ryzlab.config import CODECS, CacheConfig, ConfigError, ModelConfig, ParallelConfig, check_choice
from ryzlab.serve.engine import Engine, EngineConfig

__all__ = ["check_engine_args", "build_engine", "start_replica", "replica_rank_main", "load_net", "tokenizer_for"]

log = logging.getLogger(__name__)

def check_engine_args(*, model: str = "reference", codec: str = "none", device: str = "cpu", tp: int = 1,
                      cp: int = 1, num_blocks: int | None = None, model_config: ModelConfig | None = None,
                      dtype: str | None = None, **_: Any) -> ModelConfig:
    """Raise ``ValueError`` naming the valid choices for a bad model / codec / device / layout.

    Reads no weights (a checkpoint's metadata only); returns the model's shape.
    """
    from ryzlab.models import DTYPES, check_model
    from ryzlab.parallel.layout import validate_parallel

    check_choice("codec", codec, CODECS)
    if not (device == "cpu" or str(device).startswith("cuda")):
        raise ValueError(f"device={device!r} is not valid; choose 'cpu' or 'cuda[:N]'")
    if dtype is not None:
        check_choice("dtype", dtype, tuple(DTYPES))
    src = check_model(model)
    shape = model_config if (src.kind == "random" and model_config is not None) else src.config
    try:
        validate_parallel(shape, ParallelConfig(tp=tp, cp=cp), CacheConfig(codec=codec, num_blocks=num_blocks))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return shape


def tokenizer_for(model: str) -> Any:
    """The tokenizer of ``model`` (tokenizer files or GGUF metadata only; the reference model's bytes)."""
    from ryzlab.models import load_tokenizer

    return load_tokenizer(model)


def load_net(model: str, *, device: str | torch.device = "cpu", seed: int = 0,
             model_config: ModelConfig | None = None, tp: Any = None, dtype: str | None = None
             ) -> tuple[torch.nn.Module, Any]:
    """The model of one rank and its tokenizer: loaded (only this rank's shard under ``tp``, a
    Comm) or random. See :func:`ryzlab.models.load_model`."""
    from ryzlab.models import load_model

    return load_model(model, dtype=dtype, device=device, tp=tp, model_config=model_config, seed=seed)


def build_engine(*, model: str = "reference", codec: str = "none", block_size: int = 16,
                 num_blocks: int | None = 512, config: EngineConfig = EngineConfig(),
                 model_config: ModelConfig | None = None, seed: int = 0, threads: int | None = None,
                 device: str = "cpu", groups: Any = None, tp: int = 1, cp: int = 1,
                 dtype: str | None = None) -> Engine:
    """The engine of one rank over ``model`` (:data:`ryzlab.models.MODEL_CHOICES`); bad choices
    raise before anything loads. ``groups``: this rank's :class:`ryzlab.parallel.ParallelGroups`
    in a tp x cp replica (None: one rank; ``tp``/``cp`` must then be 1). The engine's
    ``tokenizer`` is the model's."""
    check_engine_args(model=model, codec=codec, device=device, tp=tp, cp=cp, num_blocks=num_blocks,
                      model_config=model_config, dtype=dtype)
    if groups is None and tp * cp != 1:
        raise ValueError(f"tp={tp} x cp={cp} needs the replica's process groups (start_replica / launch)")
    from ryzlab.kv.cache import PagedKVCache

    cache_config = CacheConfig(codec=codec, block_size=block_size, num_blocks=num_blocks,
                               enable_prefix_caching=config.enable_prefix_caching)
    if threads:
        torch.set_num_threads(threads)
    if groups is not None:
        device = str(groups.device)
    net, tok = load_net(model, device=device, seed=seed, model_config=model_config,
                        tp=groups.tp if groups is not None else None, dtype=dtype)
    local = getattr(net, "local_config", net.config)
    cache = PagedKVCache(local, cache_config, dtype=next(net.parameters()).dtype, device=device,
                         cp=groups.cp if groups is not None else None)
    engine = Engine(net, cache, config, control=groups.control if groups is not None else None)
    engine.tokenizer = tok
    return engine


def _engine_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kw)
    kw["config"] = EngineConfig(**kw.get("config", {}))
    return kw


def replica_rank_main(rank: int, world_size: int, engine_kwargs: dict[str, Any]) -> int:
    """A non-driver rank of a replica: build its shard and engine, follow the driver's plans."""
    from ryzlab.parallel.mesh import init_parallel

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
    from ryzlab.orchestrator.launch import join_group, start_ranks
    from ryzlab.parallel.mesh import init_parallel

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
    return engine
