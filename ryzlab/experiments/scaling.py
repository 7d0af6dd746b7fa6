"""Distributed inference of the model itself: tp x cp layout x codec x context x batch on real ranks.

One point launches ``tp * cp`` ranks (gloo CPU processes here, nccl on GPUs; the same code at one
rank). Every rank loads its shard of the model (:func:`ryzlab.parallel.apply_tp`) and its share
of the KV cache (:class:`ryzlab.kv.cache.PagedKVCache` with ``cp=``), then:

1. **prefill**: ``batch`` sequences of ``context`` held-out tokens, in chunks of ``prefill_chunk``
   (``prefill_ms``, ``prefill_tokens_per_s``, communication per prefill token);
2. **decode**: ``warmup`` then ``decode_steps`` timed steps, teacher-forced on the next held-out
   tokens (the same inputs at every layout), one row per step: ``step_ms`` / ``tpot_ms`` (slowest
   rank), ``tokens_per_s`` (batch / step);
3. **largest context**: a fresh cache bounded to ``budget_mib`` of KV pages per rank, one sequence
   prefilled chunk by chunk through the model until the cache says no room (found by allocating
   and running, not computed): ``largest_context``.

Communication per decode step is measured at the call sites (:class:`ryzlab.parallel.comm.Comm`)
and on the wire (bytes the rank wrote to its sockets), beside the formulas
(:mod:`ryzlab.parallel.layout`): tp = two all-reduces of ``batch x dim`` per layer, cp = one
all-gather of ``[batch, heads / tp, head_dim + 1]`` per layer. Weights and KV bytes are read off
each rank (``weight_bytes_per_rank`` = 1/tp of the sharded weights + the replicated ones, named
in ``weights_replicated``). ``weights`` (a format of :mod:`ryzlab.models.quant`): every rank packs
only its own shard after ``apply_tp``; with a packed format the byte columns are read off the weight
ledger (:func:`~ryzlab.models.quant.weight_ledger`: codes, scales, zeros and padding), and
``weight_bytes_formula_per_rank`` is the same ledger from shapes alone
(:func:`~ryzlab.models.quant.model_weight_bytes`). ``logits_rel_err_vs_ws1``: the decode logits against the same codec
on one rank, computed in this process. Prefill under cp: every cp rank computes the chunk's
q/k/v (the linear layers are replicated across cp, as in vLLM's decode context parallelism),
stores its own blocks, and the attention partials of the chunk's queries are all-gathered and
merged exactly -- the same collective as decode, ``chunk x heads x (head_dim + 1)`` per layer.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Iterator, Literal

import pandas as pd
import torch

from ryzlab.config import CacheConfig, CodecFields, DecodeFields, Granularity, ParallelConfig, check_counts, from_dict
from ryzlab.models.quant import WEIGHT_FORMAT_CHOICES, model_weight_bytes, parse_weight_format
from ryzlab.orchestrator import launch
from ryzlab.parallel.layout import cp_comm_bytes_formula, tp_comm_bytes_formula, tp_layout, wire_bytes_formula
from ryzlab.provenance import cpu_model

__all__ = ["Config", "run", "run_torchrun", "make_config", "scaling_efficiency"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(DecodeFields, CodecFields, ParallelConfig):
    """One layout (:class:`~ryzlab.config.ParallelConfig`: tp, cp, backend) and one page format
    (:class:`~ryzlab.config.CodecFields`) on one model, context and batch
    (:class:`~ryzlab.config.DecodeFields`)."""

    key_granularity: Granularity = "token_head"
    """No ``auto`` here: one layout for every codec, so layouts compare on the same scales."""
    context: int = 1024
    batch: int = 1
    prefill_chunk: int = 512
    """Tokens per prefill forward (bounds the activations of a long prompt)."""
    decode_steps: int = 8
    budget_mib: float = 1.0
    """Per-rank KV page budget for ``largest_context`` (0 = skip that phase)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    weights: str = "float32"
    """Weight format (:data:`ryzlab.models.quant.WEIGHT_FORMAT_CHOICES`): each rank packs its own
    shard; checked against the shard shapes at this tp before any process starts."""
    check_error: bool = True
    """Compare the decode logits with one rank (computed in the launching process)."""
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        # threads per rank: > 0 here (1 keeps layouts comparable on a shared CPU; the report says when
        # ranks beyond the core count oversubscribe it)
        check_counts(self, positive=("tp", "cp", "context", "batch", "block_size", "prefill_chunk", "decode_steps",
                                     "threads", "timeout_s"), non_negative=("warmup", "budget_mib"))
        super().__post_init__()  # ParallelConfig: the backend is one of its choices

    def cache(self, num_blocks: int | None = None) -> CacheConfig:
        return CacheConfig(codec=self.codec, key_granularity=self.key_granularity,
                           value_granularity=self.value_granularity, block_size=self.block_size,
                           num_blocks=num_blocks, enable_prefix_caching=False)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, cp=self.cp, backend=self.backend, cpu_comm=self.cpu_comm)


def make_config(values: dict) -> Config:
    """Build a :class:`Config` from plain values; every problem in one :class:`ConfigError`."""
    return from_dict(Config, values, where="scaling")


def _tokens(model: str, n: int, length: int) -> torch.Tensor:
    """``n`` rows of ``length`` held-out stdlib tokens of ``model``'s tokenizer (wrapping): the
    same inputs at every layout."""
    from ryzlab.models.corpus import token_stream
    from ryzlab.serve.replica import tokenizer_for

    ids = token_stream(tokenizer_for(model), n * length)
    return ids[torch.arange(n * length) % ids.numel()].view(n, length)


def _net(cfg: Config, groups) -> torch.nn.Module:
    from ryzlab.serve.replica import load_net

    return load_net(cfg.model, device=groups.device, seed=cfg.seed, tp=groups.tp, dtype=cfg.dtype,
                    weights=cfg.weights)[0]


def _weight_bytes(net: torch.nn.Module) -> dict:
    """This rank's weight bytes. Float weights: parameters x element size (:func:`weight_bytes`); packed
    weights: the weight ledger's total (codes + scales + zeros + padding), sharded = the packed
    projections + the sharded biases, replicated = the packed tables + norms + replicated biases."""
    from ryzlab.models.quant import weight_ledger
    from ryzlab.parallel.tp import weight_bytes

    wb = weight_bytes(net)   # float parameters only once the projections and tables are packed
    fmt = getattr(net, "weight_format", None)
    if fmt is None or not fmt.quantized:
        return wb
    led = weight_ledger(net)
    sharded, replicated = led["linears"] + wb["sharded"], led["tables"] + wb["replicated"]
    assert sharded + replicated == led["total"], (led, wb)   # the ledger's float part is these parameters
    names = ", ".join(x for x in ([f"tok_embeddings/output ({fmt.name} tables)"] + [wb["replicated_names"]]) if x)
    return {**wb, "sharded": float(sharded), "replicated": float(replicated), "total": float(led["total"]),
            "replicated_names": names, "kernels": ", ".join(led["kernels"])}


def _cache(cfg: Config, net: torch.nn.Module, groups, num_blocks: int | None = None):
    from ryzlab.kv.cache import PagedKVCache

    return PagedKVCache(net.local_config, cfg.cache(num_blocks), dtype=getattr(torch, cfg.dtype),
                        device=groups.device, cp=groups.cp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _decode(net, cache, tokens: torch.Tensor, cfg: Config, groups=None, barrier=None
            ) -> tuple[torch.Tensor, list[float], float, dict]:
    """Prefill ``tokens[:, :context]`` then teacher-forced decode.

    Returns (logits [B, steps, V], decode step seconds, prefill seconds, prefill communication
    per chunk {"tp": ..., "cp": ...})."""
    seqs = list(range(cfg.batch))
    dev = groups.device if groups is not None else torch.device("cpu")
    x = tokens.to(dev)
    barrier and barrier()
    _sync(dev)
    t0 = time.perf_counter()
    for a in range(0, cfg.context, cfg.prefill_chunk):
        with _label(groups, "prefill"):
            net(x[:, a:min(cfg.context, a + cfg.prefill_chunk)], cache=cache, seq_ids=seqs)
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    pre = {} if groups is None else {n: c.ledger.per_step("prefill") for n, c in (("tp", groups.tp), ("cp", groups.cp))}
    logits, times = [], []
    for i in range(cfg.warmup + cfg.decode_steps):
        tok = x[:, cfg.context + i:cfg.context + i + 1]
        timed = i >= cfg.warmup
        if timed and i == cfg.warmup and groups is not None:
            groups.reset_ledgers()
        barrier and barrier()
        _sync(dev)
        t0 = time.perf_counter()
        with _label(groups if timed else None, "decode"):
            out = net(tok, cache=cache, seq_ids=seqs)
        _sync(dev)
        if timed:
            times.append(time.perf_counter() - t0)
            logits.append(out[:, -1].float().cpu())
    return torch.stack(logits, 1), times, prefill_s, pre


@contextlib.contextmanager
def _label(groups, label: str) -> Iterator[None]:
    """Attribute the collectives inside to one step of ``label`` on the tp and cp communicators."""
    if groups is None:
        yield
        return
    with groups.tp.step(label), groups.cp.step(label):
        yield


@torch.inference_mode()
def _largest_context(cfg: Config, net: torch.nn.Module, groups) -> tuple[int, float]:
    """Grow one sequence through the model until the per-rank page budget is full.

    The pool gets as many pages per rank as ``budget_mib`` holds (a page weighed on a real one-page
    cache); then prefill chunks run until ``allocate_slots`` says no room, halving the chunk down to
    one token. Returns (tokens held, bytes of this rank's pages)."""
    from ryzlab.serve.engine import ragged_forward

    probe = _cache(cfg, net, groups, num_blocks=cfg.cp)   # one page per rank
    page = (probe.k.nbytes() + probe.v.nbytes()) / probe.k.capacity
    per_rank = int(cfg.budget_mib * 2**20 // page)
    if per_rank < 1:
        return 0, 0.0
    cache = _cache(cfg, net, groups, num_blocks=per_rank * cfg.cp)
    src = _tokens(cfg.model, 1, per_rank * cfg.cp * cfg.block_size + 1)[0].tolist()
    held, chunk = 0, cfg.prefill_chunk
    while chunk:
        toks = src[held:held + chunk]
        if cache.allocate_slots(0, toks) is None:   # no room for this chunk: try a smaller one
            chunk //= 2
            continue
        ragged_forward(net, cache, [0], [toks])
        held += len(toks)
    return held, float(cache.k.nbytes() + cache.v.nbytes())


def _rank_main(rank: int, world_size: int, cfg: Config, tokens: torch.Tensor) -> dict:
    from ryzlab.parallel.mesh import init_parallel

    groups = init_parallel(cfg.parallel())
    net = _net(cfg, groups)
    cache = _cache(cfg, net, groups)
    # every rank of the replica starts a step together, through the same transport as its collectives
    barrier = groups.control.barrier if world_size > 1 else None
    logits, times, prefill_s, pre = _decode(net, cache, tokens, cfg, groups, barrier)
    per = {n: c.ledger.per_step("decode") for n, c in (("tp", groups.tp), ("cp", groups.cp))}
    led = cache.ledger()
    kernel = cache.kernel
    del cache
    fits, fit_bytes = _largest_context(cfg, net, groups) if cfg.budget_mib > 0 else (0, 0.0)
    dev = groups.device
    return {"times": times, "prefill_s": prefill_s, "logits": logits if rank == 0 else None,
            "kv": led["total"], "weights": _weight_bytes(net), "comm": per, "prefill_comm": pre,
            "largest_context": fits, "largest_context_page_bytes": fit_bytes,
            "threads": torch.get_num_threads(), "kernel": kernel, "backend": torch.distributed.get_backend(),
            "transport": {n: c.transport for n, c in (("tp", groups.tp), ("cp", groups.cp))},
            "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()}


def _reference_logits(cfg: Config, tokens: torch.Tensor) -> torch.Tensor:
    """The same decode at one rank, in this process (no process group: every collective a no-op)."""
    from ryzlab.parallel.mesh import init_parallel

    one = Config(**{**cfg.__dict__, "tp": 1, "cp": 1})
    groups = init_parallel(ParallelConfig())
    net = _net(one, groups)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _decode(net, _cache(one, net, groups), tokens, one)[0]
    finally:
        torch.set_num_threads(threads)


def run(cfg: Config) -> pd.DataFrame:
    """Launch the ranks, measure prefill, decode, memory and communication; one row per decode step."""
    from ryzlab.serve.spec import ReplicaSpec

    # a bad model, dtype, codec, layout or weight format (a group or a packed ternary byte split by tp)
    # fails here, before any process starts
    ReplicaSpec(model=cfg.model, dtype=cfg.dtype, cache=cfg.cache(), parallel=cfg.parallel(), weights=cfg.weights)
    fmt = parse_weight_format(cfg.weights)
    if fmt.kind == "gguf" and not cfg.model.endswith(".gguf"):
        raise ValueError(f"weights='gguf' keeps a GGUF file's own blocks; model={cfg.model!r} is not a .gguf file: "
                         f"choose one of {', '.join(c for c in WEIGHT_FORMAT_CHOICES if c != 'gguf')}")
    if fmt.quantized and cfg.backend == "nccl":
        raise ValueError(f"weights={cfg.weights!r}: packed weight kernels run on CPU ranks in this version; "
                         f"use backend='gloo' (or 'auto' on a CPU machine) or weights='float32'")
    tokens = _tokens(cfg.model, cfg.batch, cfg.context + cfg.warmup + cfg.decode_steps)
    t0 = time.perf_counter()
    # world size 1 too: one launched rank, the same code path and thread count as every layout
    res = launch(_rank_main, cfg.world_size, args=(cfg, tokens), backend=cfg.backend, timeout_s=cfg.timeout_s,
                 threads_per_rank=cfg.threads)
    log.info("scaling point %s ran in %.1f s", cfg, time.perf_counter() - t0)
    return _rows(cfg, res, tokens, nodes=1, interconnect="loopback")


def run_torchrun(cfg: Config) -> pd.DataFrame | None:
    """One point as a rank of a ``torchrun`` job (one or several machines): every rank measures,
    rank 0 gathers and returns the rows (the others None). ``nodes`` counts the distinct node
    addresses of the ranks, ``interconnect`` names the interface gloo used between them."""
    import os

    import torch.distributed as dist

    from ryzlab.orchestrator import init_from_env
    from ryzlab.orchestrator.nodes import NodeWatch

    ctx = init_from_env(cfg.backend)
    torch.set_num_threads(cfg.threads)
    watch = NodeWatch()
    try:
        if ctx.world_size != cfg.world_size:
            raise ValueError(f"torchrun started {ctx.world_size} ranks but tp {cfg.tp} x cp {cfg.cp} = "
                             f"{cfg.world_size}")
        tokens = _tokens(cfg.model, cfg.batch, cfg.context + cfg.warmup + cfg.decode_steps)
        mine = _rank_main(ctx.rank, ctx.world_size, cfg, tokens)
        res: list[dict | None] = [None] * ctx.world_size
        dist.gather_object(mine, res if ctx.rank == 0 else None, dst=0)
        nodes = len(watch.nodes)
    finally:
        watch.close()
        dist.destroy_process_group()
    if ctx.rank != 0:
        return None
    # after the group is gone: the one-rank reference logits run without a process group
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    link = "loopback" if nodes == 1 and not ifname else f"tcp over {ifname or 'default route'}"
    return _rows(cfg, [r for r in res if r is not None], tokens, nodes=nodes, interconnect=link)


def _rows(cfg: Config, res: list[dict], tokens: torch.Tensor, *, nodes: int, interconnect: str) -> pd.DataFrame:
    """The rows of one point from every rank's measurements (rank order)."""
    from ryzlab.serve.spec import ReplicaSpec

    shape = ReplicaSpec(model=cfg.model, dtype=cfg.dtype, cache=cfg.cache(), parallel=cfg.parallel(),
                        weights=cfg.weights).shape
    fmt = parse_weight_format(cfg.weights)
    err = float("nan")
    if cfg.check_error:
        ref = _reference_logits(cfg, tokens) if cfg.world_size > 1 else res[0]["logits"]
        err = ((res[0]["logits"] - ref).norm() / ref.norm()).item()
    steps = [max(r["times"][i] for r in res) for i in range(cfg.decode_steps)]
    B, L, esz = cfg.batch, shape.n_layers, torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    tp_f = L * tp_comm_bytes_formula(shape, tp=cfg.tp, tokens=B, element_size=esz)
    cp_f = L * cp_comm_bytes_formula(shape, cp=cfg.cp, tp=cfg.tp, tokens=B)
    comm = {k: max(r["comm"][k]["bytes_sent"] for r in res) for k in ("tp", "cp")}
    wire = {k: max(r["comm"][k]["wire_bytes_sent"] for r in res) for k in ("tp", "cp")}
    colls = {k: max(r["comm"][k]["collectives"] for r in res) for k in ("tp", "cp")}
    prefill_tokens = B * cfg.context
    n_chunks = -(-cfg.context // cfg.prefill_chunk)
    pre_bytes = sum(max(r["prefill_comm"][k]["bytes_sent"] for r in res) for k in ("tp", "cp")) * n_chunks
    w = [r["weights"] for r in res]
    prefill_s = max(r["prefill_s"] for r in res)
    return pd.DataFrame({
        "sample": range(cfg.decode_steps),
        "world_size": cfg.world_size,
        "layout": f"tp{cfg.tp}xcp{cfg.cp}",
        "nodes": nodes,
        "interconnect": interconnect,
        "step_ms": [t * 1e3 for t in steps],
        "tpot_ms": [t * 1e3 for t in steps],
        "tokens_per_s": [B / t for t in steps],
        "median_step_ms": statistics.median(steps) * 1e3,
        "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": prefill_tokens / prefill_s,
        "weight_bytes_per_rank": max(x["total"] for x in w),
        "weight_bytes_sharded_per_rank": max(x["sharded"] for x in w),
        "weight_bytes_replicated_per_rank": max(x["replicated"] for x in w),
        "weight_bytes_total": sum(x["total"] for x in w),
        "weights_replicated": w[0]["replicated_names"],
        "weights": fmt.name,
        "weight_kernels": w[0].get("kernels", ""),
        "weight_bytes_formula_per_rank": _formula(shape, fmt, cfg),
        "kv_bytes_per_rank": max(r["kv"] for r in res),
        "kv_bytes_total": sum(r["kv"] for r in res),
        "kv_replication": tp_layout(shape, cfg.tp, 0).kv_replication,
        "comm_bytes_per_step_tp": comm["tp"],
        "comm_bytes_per_step_cp": comm["cp"],
        "comm_bytes_per_step": comm["tp"] + comm["cp"],
        "comm_formula_per_step_tp": tp_f,
        "comm_formula_per_step_cp": cp_f,
        "comm_formula_per_step": tp_f + cp_f,
        "comm_wire_bytes_per_step": wire["tp"] + wire["cp"],
        "comm_wire_formula_per_step": (wire_bytes_formula(tp_f, cfg.tp, "all_reduce")
                                       + wire_bytes_formula(cp_f, cfg.cp, "all_gather")),
        "collectives_per_step": colls["tp"] + colls["cp"],
        "prefill_comm_bytes_per_token": pre_bytes / prefill_tokens,
        "largest_context": res[0]["largest_context"],
        "largest_context_page_bytes_per_rank": max(r["largest_context_page_bytes"] for r in res),
        "logits_rel_err_vs_ws1": err,
        "kernel": res[0]["kernel"],
        "device": res[0]["device"],
        "device_name": res[0]["device_name"],
        "backend": res[0]["backend"],
        "comm_transport": ",".join(sorted({t for r in res for t in r["transport"].values() if t != "none"})) or "none",
        "torch_threads": res[0]["threads"],
    })


def _formula(shape, fmt, cfg: Config) -> float:
    """The largest rank's weight bytes from shapes alone (the weight ledger's formula); NaN for gguf
    (its bytes depend on the file's tensor types)."""
    if fmt.kind == "gguf":
        return float("nan")
    esz = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    f = fmt if fmt.quantized else ("bf16" if esz == 2 else "float32")   # unpacked: the model dtype throughout
    return float(max(model_weight_bytes(shape, f, tp=cfg.tp, rank=r, dtype_bytes=esz)["total"]
                     for r in range(cfg.tp)))


def scaling_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Per point (layout, codec, context, batch, model, threads per rank, transport): median tokens/s, and
    speedup and efficiency against the world size 1 point of the same sweep that ran on the same
    total threads (world size x threads per rank). Why equal threads: a 2-rank point with 1 thread
    each against a 1-rank point with 1 thread measures the added core as much as the layout. NaN,
    with ``speedup_note`` saying why, where no such point exists. ``context_gain`` (largest context
    over world size 1's, same budget) does not depend on threads and uses any world size 1 point."""
    keys = [c for c in ("device", "model", "codec", "key_granularity", "context", "batch", "budget_mib")
            if c in df.columns]
    thr = "threads" if "threads" in df.columns else "torch_threads" if "torch_threads" in df.columns else None
    d = df.assign(threads_per_rank=df[thr].astype(float) if thr else float("nan"),
                  comm_transport=df["comm_transport"].fillna("") if "comm_transport" in df.columns else "")
    # gloo and shared-memory points of one layout stay apart (the 1-rank baseline is the same for both)
    med = (d.groupby(keys + ["layout", "tp", "cp", "world_size", "threads_per_rank", "comm_transport"], dropna=False)
           .agg(tokens_per_s=("tokens_per_s", "median"), step_ms=("step_ms", "median"),
                prefill_ms=("prefill_ms", "first"), largest_context=("largest_context", "first"),
                kv_bytes_per_rank=("kv_bytes_per_rank", "first"),
                weight_bytes_per_rank=("weight_bytes_per_rank", "first"),
                comm_bytes_per_step=("comm_bytes_per_step", "first"),
                comm_formula_per_step=("comm_formula_per_step", "first"),
                logits_rel_err_vs_ws1=("logits_rel_err_vs_ws1", "first"))
           .reset_index())
    med["total_threads"] = med["world_size"] * med["threads_per_rank"]
    # NaN never equals NaN: a column a point did not record is None in the key, so it still pairs
    key = lambda r, extra=(): tuple(None if pd.isna(r[k]) else r[k] for k in keys + list(extra))
    ws1 = med[med["world_size"] == 1]
    by_threads = {key(r, ["threads_per_rank"]): r["tokens_per_s"] for _, r in ws1.iterrows()}
    any_ws1 = {key(r): r for _, r in ws1.iterrows()}
    base, notes = [], []
    for _, r in med.iterrows():
        b = by_threads.get(key(r) + (r["total_threads"],), float("nan"))
        base.append(b)
        if b == b:  # not NaN
            notes.append("")
        elif key(r) in any_ws1:
            t = any_ws1[key(r)]["threads_per_rank"]
            notes.append(f"no 1-rank point with {_threads_word(r['total_threads'])} threads (the 1-rank point "
                         f"ran {_threads_word(t)}): not compared at unequal threads")
        else:
            notes.append("no 1-rank point in this sweep")
    med["tokens_per_s_ws1"] = base
    med["speedup"] = med["tokens_per_s"] / med["tokens_per_s_ws1"]
    med["scaling_efficiency"] = med["speedup"] / med["world_size"]
    med["speedup_note"] = notes
    gain = [any_ws1[key(r)]["largest_context"] if key(r) in any_ws1 else float("nan") for _, r in med.iterrows()]
    med["context_gain"] = med["largest_context"] / pd.Series(gain, index=med.index, dtype=float)
    return med


def _threads_word(x: float) -> str:
    """A thread count for a sentence: an integer, or 'unknown' when it was not recorded."""
    return "unknown" if pd.isna(x) else str(int(x))


if __name__ == "__main__":  # torchrun [...] -m ryzlab.experiments.scaling CONFIG_JSON OUT.parquet
    import json
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: torchrun [...] -m ryzlab.experiments.scaling CONFIG_JSON OUT.parquet")
    rows = run_torchrun(make_config(json.loads(sys.argv[1])))
    if rows is not None:
        rows.to_parquet(sys.argv[2])
