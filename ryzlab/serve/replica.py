"""One model replica: a tp x cp group of ranks, each with its model shard, its cache and an engine.

* :func:`build_engine` builds the engine of one rank (the whole replica at tp = cp = 1) from a
  :class:`~ryzlab.serve.spec.ReplicaSpec`;
* :func:`start_replica` is what a serving worker process runs: at one rank it builds the engine
  in-process; for a group it starts ranks ``1..world-1`` (they build theirs from the same spec and
  :meth:`Engine.follow` the plans), joins the group as rank 0 (the driver) and watches the other
  ranks: a replica with a dead rank cannot serve, so the driver exits and the router restarts the
  whole replica.

Data parallelism is several replicas behind :class:`ryzlab.serve.router.Router`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch

from ryzlab.config import ModelConfig
from ryzlab.serve.engine import Engine
from ryzlab.serve.spec import ReplicaSpec

__all__ = ["build_engine", "start_replica", "replica_rank_main", "load_net", "tokenizer_for", "ReplicaSpec"]

log = logging.getLogger(__name__)


def tokenizer_for(model: str) -> Any:
    """The tokenizer of ``model`` (tokenizer files or GGUF metadata only; the reference model's bytes)."""
    from ryzlab.models import load_tokenizer

    return load_tokenizer(model)


def load_net(model: str, *, device: str | torch.device = "cpu", seed: int = 0,
             model_config: ModelConfig | None = None, tp: Any = None, dtype: str | None = None,
             weights: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The model of one rank and its tokenizer: loaded (only this rank's shard under ``tp``, a
    Comm) or random. See :func:`ryzlab.models.load_model`."""
    from ryzlab.models import load_model

    return load_model(model, dtype=dtype, device=device, tp=tp, model_config=model_config, seed=seed, weights=weights)


def build_engine(spec: ReplicaSpec, *, groups: Any = None, threads: int | None = None) -> Engine:
    """The engine of one rank of ``spec``. ``groups``: this rank's :class:`ryzlab.parallel.ParallelGroups`
    in a tp x cp replica; it must be the spec's layout (None: one rank, and the spec's layout must be
    1 x 1). The engine's ``tokenizer`` is the model's."""
    from ryzlab.kv.cache import PagedKVCache

    if not isinstance(spec, ReplicaSpec):
        raise TypeError(f"build_engine takes a ReplicaSpec, got {type(spec).__name__}")
    tp, cp = spec.parallel.tp, spec.parallel.cp
    if groups is None and tp * cp != 1:
        raise ValueError(f"tp={tp} x cp={cp} needs the replica's process groups (start_replica / launch)")
    if groups is not None and (groups.tp.world_size, groups.cp.world_size) != (tp, cp):
        raise ValueError(f"the process groups are tp={groups.tp.world_size} x cp={groups.cp.world_size} "
                         f"but the spec says tp={tp} x cp={cp}")
    if threads:
        torch.set_num_threads(threads)
    device = str(groups.device) if groups is not None else spec.device
    net, tok = load_net(spec.model, device=device, seed=spec.seed, model_config=spec.model_config,
                        tp=groups.tp if groups is not None else None, dtype=spec.dtype, weights=spec.weights)
    fuse = getattr(net, "fuse_projections", None)
    if fuse is not None and fuse():
        log.info("fused the q/k/v and gate/up projections of the packed weights (one kernel call per group)")
    local = getattr(net, "local_config", net.config)
    cache = PagedKVCache(local, spec.cache_config(), dtype=next(net.parameters()).dtype, device=device,
                         cp=groups.cp if groups is not None else None)
    engine = Engine(net, cache, spec.engine, control=groups.control if groups is not None else None)
    engine.tokenizer = tok
    engine.warm_up()  # config.compile: compile now, not in the first requests
    return engine


def replica_rank_main(rank: int, world_size: int, spec: ReplicaSpec) -> int:
    """A non-driver rank of a replica: build its shard and engine, follow the driver's plans."""
    from ryzlab.parallel.mesh import init_parallel

    return build_engine(spec, groups=init_parallel(spec.parallel)).follow()


def start_replica(spec: ReplicaSpec, *, threads: int | None = None, watch_interval_s: float = 0.2) -> Engine:
    """Build this process's engine: the whole replica at one rank, else the driver of a group.

    For a group, ranks ``1..world-1`` start as processes (they exit with this one), this
    process joins as rank 0, and a watcher thread ends this process if any other rank dies.
    """
    if spec.world_size == 1:
        return build_engine(spec, threads=threads)
    from ryzlab.orchestrator.launch import join_group, start_ranks
    from ryzlab.parallel.mesh import init_parallel

    world = spec.world_size
    ranks = start_ranks(replica_rank_main, world, range(1, world), args=(spec,), threads_per_rank=threads or 1)
    join_group(0, world, ranks.port, ranks.backend)
    engine = build_engine(spec, groups=init_parallel(spec.parallel), threads=threads)

    def watch() -> None:
        while True:
            time.sleep(watch_interval_s)
            if dead := ranks.dead():
                log.error("replica rank(s) %s died; the driver exits so the replica is restarted whole", dead)
                os._exit(1)

    threading.Thread(target=watch, name="ryzlab-replica-watch", daemon=True).start()
    return engine
