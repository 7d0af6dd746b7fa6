"""Distributed inference of one model replica: tensor parallelism (``apply_tp``) and context
parallelism over a ``cp x tp`` device mesh, with every collective counted.

* :mod:`.layout` — which heads / MLP columns / KV blocks each rank holds; validation before any
  process group exists; closed-form communication formulas.
* :mod:`.tp` — ``apply_tp(model, comm)`` (gpt-fast's ``tp.py``) and the shard spec loaders read.
* :mod:`.mesh` — ``init_parallel``: torch ``DeviceMesh`` and a :class:`Comm` per dimension.
* :mod:`.comm` — collectives that record bytes at the call site and on the wire.

Context parallelism itself lives in the one KV stack: :class:`ryzlab.kv.cache.PagedKVCache`
built with ``cp=`` stores its rank's share of every sequence's blocks and merges attention
partials exactly.
"""
from ryzlab.parallel.comm import Comm, CommLedger, CommRecord
from ryzlab.parallel.layout import (TPLayout, cp_comm_bytes_formula, tp_comm_bytes_formula, tp_layout, valid_tp_sizes,
                     validate_parallel, wire_bytes_formula)
from ryzlab.parallel.mesh import ParallelGroups, init_parallel
from ryzlab.parallel.tp import apply_tp, local_config, shard_spec, weight_bytes

__all__ = ["Comm", "CommLedger", "CommRecord", "TPLayout", "tp_layout", "valid_tp_sizes", "validate_parallel",
           "tp_comm_bytes_formula", "cp_comm_bytes_formula", "wire_bytes_formula", "ParallelGroups",
           "init_parallel", "apply_tp", "local_config", "shard_spec", "weight_bytes"]
