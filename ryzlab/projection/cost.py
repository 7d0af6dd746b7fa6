"""One step of ryzlab's model graph on a named device: the cost model every projection calls.

:func:`step_cost` prices one engine step (any mix of decoding sequences and prefill chunks) per
layer and rank, as ryzlab's graph runs it (:mod:`ryzlab.models.transformer`, sharded by
:func:`ryzlab.parallel.apply_tp`):

* **GEMMs** (wq, wk, wv, wo, w1, w3, w2 on the rank's heads and MLP columns, from
  :func:`ryzlab.parallel.layout.tp_layout`): roofline, ``max(flops / achieved peak, bytes /
  achieved bandwidth)``; weight bytes from :func:`matrix_bytes`, the one formula per format.
* **attention** over the pages: KV bytes per token from the cache ledger's formula
  (:func:`ryzlab.kv.ledger.codec_bytes_per_token`) for the codec, the rank's KV heads and 1/cp of
  the context; prefill and decode priced apart (two kernels).
* **norms, RoPE, residuals, SwiGLU** as activation traffic; **logits and sampling** at the last
  token of every sequence in the step (the engine's ``logits_at``); the output head and
  embeddings replicated on every tp rank, as ryzlab's ``apply_tp`` leaves them.
* **collectives** from the comm ledger's formulas (:func:`ryzlab.parallel.layout.tp_comm_bytes_formula`,
  ``cp_comm_bytes_formula``, ``wire_bytes_formula``) on an alpha-beta model of the device's link
  (ring or tree all-reduce, whichever is faster; ring all-gather), the network past one node;
  plus the wait for the slowest rank (``coll_skew_frac`` of the layer's work: ranks drift apart
  while they compute). A cp rank's attention runs the general path and returns its log-sum-exp
  (``attn_lse_cost`` on its attention, plus ``cp_attn_us`` per layer for the path's fixed work);
  packing and merging the partials are the calibration's ``cp_merge_kernels`` kernel boundaries
  (``CP_MERGE_KERNELS`` for a fused engine; on CPU the profiled ``cp_attn_us`` holds ryzlab's merge).
* a **host overhead** per step plus a gap per kernel (a captured graph by default; the
  calibration or ``--host-overhead-ms`` models an eager engine). On a shared host (``cpu``) more
  ranks than cores share them, host time included, and the replica's ranks together slow each
  rank's compute and streams by the calibration's ``corun_factor`` (their working sets share the
  last-level cache; measured per layout by ``probe_corun``).

Nothing here knows about requests or time: the serving projection asks this function for each
step the real scheduler plans.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from ryzlab.config import CODECS, CacheConfig, ModelConfig, check_choice
from ryzlab.parallel.layout import cp_comm_bytes_formula, tp_comm_bytes_formula, tp_layout, wire_bytes_formula
from ryzlab.projection.calibration import Calibration
from ryzlab.projection.formats import WEIGHT_FORMATS, WeightFormat, matrix_bytes
from ryzlab.projection.hardware import Device

__all__ = ["WeightFormat", "WEIGHT_FORMATS", "Deployment", "StepShape", "StepCost", "matrix_bytes", "weight_bytes",
           "kv_bytes_per_token", "collective_ms", "gemm_ms", "step_cost", "memory_bytes_per_device", "kv_capacity_tokens",
           "KERNELS_PER_LAYER", "CP_MERGE_KERNELS", "weights_problem"]

KERNELS_PER_LAYER = 12
"""Kernels of one decoder layer of ryzlab's graph after the usual fusions (2 norms, q/k/v, RoPE,
KV write, attention, wo, 2 residual adds, w1+w3, SwiGLU, w2); collectives are counted apart."""
CP_MERGE_KERNELS = 2
"""Kernels a layer adds under context parallelism, besides its all-gather: packing the partial
(output + log-sum-exp) and the exact merge (:mod:`ryzlab.kv.merge`). A fused engine runs them as
~2 kernels (FlashInfer's ``merge_state`` is one); ryzlab's eager merge dispatches 24 torch ops
against ~125 for the rest of a decode layer, the same share of its 12 fused kernels."""
WORKSPACE_TOKENS = 2048
"""Tokens of activations the memory estimate reserves (vLLM's default chunked-prefill budget)."""


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """How one replica runs: its tp x cp layout, weight format and KV codec."""

    tp: int = 1
    cp: int = 1
    weights: WeightFormat = "bf16"
    """Weight storage: fp32 (ryzlab on CPU), bf16, weight-only int8 / int4 (activations bf16), or
    fp8 (projection only: e4m3 weights and activations on fp8 tensor cores, as TensorRT-LLM and
    vLLM run an fp8 checkpoint; the output head stays bf16)."""
    int4_group: int = 128
    """Input columns sharing one int4 scale + zero (GPTQ / AWQ default 128; gpt-fast uses 32)."""
    codec: str = "none"
    """KV-cache codec (:data:`ryzlab.config.CODECS`); ``none`` stores the activation dtype."""
    block_size: int = 16

    def __post_init__(self) -> None:
        check_choice("weights", self.weights, WEIGHT_FORMATS)
        check_choice("codec", self.codec, CODECS)
        for f in ("tp", "cp", "int4_group", "block_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")

    @property
    def act_bytes(self) -> int:
        """Activations and uncompressed KV: float32 with fp32 weights (ryzlab on CPU), else bf16."""
        return 4 if self.weights == "fp32" else 2


@dataclass(frozen=True)
class StepShape:
    """What one step computes, aggregated over its sequences (all the cost depends on)."""

    decode_seqs: int = 0
    decode_context: int = 0
    """Sum over decoding sequences of the tokens each attends to (its new token included)."""
    prefill_seqs: int = 0
    prefill_tokens: int = 0
    """New prompt tokens written this step (all chunks)."""
    prefill_context: int = 0
    """Sum over chunks of the KV tokens read (past + chunk)."""
    prefill_pairs: float = 0.0
    """Sum over chunks of causal query-key pairs: ``n * past + n (n + 1) / 2``."""

    @staticmethod
    def decode(batch: int, context: int) -> "StepShape":
        """``batch`` sequences decoding one token each over ``context`` tokens (new one included)."""
        return StepShape(decode_seqs=batch, decode_context=batch * context)

    @staticmethod
    def prefill(chunk: int, past: int = 0, seqs: int = 1) -> "StepShape":
        """``seqs`` sequences each writing ``chunk`` prompt tokens after ``past`` ones."""
        return StepShape(prefill_seqs=seqs, prefill_tokens=seqs * chunk, prefill_context=seqs * (past + chunk),
                         prefill_pairs=seqs * (chunk * past + chunk * (chunk + 1) / 2))

    def __add__(self, o: "StepShape") -> "StepShape":
        return StepShape(*(a + b for a, b in zip(self.__dict__.values(), o.__dict__.values())))

    @property
    def tokens(self) -> int:
        return self.decode_seqs + self.prefill_tokens


@dataclass(frozen=True)
class StepCost:
    """Milliseconds of one step by part (all layers), and the bytes and flops behind them (per rank)."""

    total_ms: float
    gemm_ms: float
    attention_ms: float
    other_ms: float
    """Norms, RoPE, residuals, SwiGLU, logits, sampling."""
    comm_ms: float
    overhead_ms: float
    weight_bytes: float
    kv_bytes: float
    flops: float
    parts: dict[str, float] = field(default_factory=dict)


def weights_problem(dev: Device | str, weights: str, fp8_tflops: float | None = None) -> str | None:
    """Why ``dev`` cannot run ``weights`` (None when it can): fp8 weights need fp8 tensor cores.
    ``dev`` may be a catalog name with its raw ``fp8_tflops`` (a spec's check, no device probe)."""
    key, fp8 = (dev, fp8_tflops) if isinstance(dev, str) else (dev.key, dev.fp8_tflops)
    if weights == "fp8" and not fp8:
        return (f"weights fp8 needs fp8 tensor cores and {key} has none (fp8_tflops is null); "
                f"use bf16, int8 or int4 there, or a device with fp8 (fp8_tflops set in the catalog)")
    return None


def _gemm_tflops(dev: Device, dep: Deployment) -> float:
    """The dense peak a layer's GEMMs run at: fp8 tensor cores for fp8 weights (W8A8), else bf16
    (weight-only int8 / int4 dequantise to bf16; fp32 on CPU is measured as ``bf16_tflops``)."""
    if dep.weights == "fp8":
        if problem := weights_problem(dev, dep.weights):
            raise ValueError(problem)
        return float(dev.fp8_tflops)   # type: ignore[arg-type]
    return dev.bf16_tflops


@functools.lru_cache(maxsize=512)
def _layer_matrices(model: ModelConfig, tp: int) -> list[tuple[int, int]]:
    """``[rows, cols]`` (out, in) of one layer's linear weights on tp rank 0."""
    lay = tp_layout(model, tp, 0)
    q, kv, d, hd, f = len(lay.q_heads), len(lay.kv_heads), model.dim, model.head_dim, model.ffn_dim // tp
    return [(q * hd, d), (kv * hd, d), (kv * hd, d), (d, q * hd), (f, d), (f, d), (d, f)]


@functools.lru_cache(maxsize=512)
def weight_bytes(model: ModelConfig, dep: Deployment) -> dict[str, float]:
    """Weight bytes one rank holds: ``sharded`` (layers), ``replicated`` (embeddings, head, norms), ``total``.

    Embeddings stay in the activation dtype (a lookup reads a row); the head is a GEMM and takes
    the weight format unless tied to the embeddings (fp8 checkpoints keep it bf16, as TensorRT-LLM's
    and vLLM's do).
    """
    sharded = model.n_layers * sum(matrix_bytes(dep.weights, r, c, dep.int4_group) for r, c in
                                   _layer_matrices(model, dep.tp))
    emb = float(model.vocab_size * model.dim * dep.act_bytes)
    head_fmt = "bf16" if dep.weights == "fp8" else dep.weights
    head = 0.0 if model.tie_embeddings else matrix_bytes(head_fmt, model.vocab_size, model.dim, dep.int4_group)
    norms = float((2 * model.n_layers + 1) * model.dim * dep.act_bytes)
    return {"sharded": sharded, "replicated": emb + head + norms, "total": sharded + emb + head + norms,
            "head": head if head else emb}


@functools.lru_cache(maxsize=512)
def kv_bytes_per_token(model: ModelConfig, dep: Deployment) -> float:
    """KV bytes one rank stores per token per layer (K + V, scales amortised over a block), for
    the rank's KV heads: the cache ledger's formula (:func:`ryzlab.kv.ledger.codec_bytes_per_token`)."""
    import torch

    from ryzlab.kv.codecs import KVFormat
    from ryzlab.kv.ledger import codec_bytes_per_token

    cc = CacheConfig(codec=dep.codec, block_size=dep.block_size)
    dt = torch.float32 if dep.act_bytes == 4 else torch.bfloat16
    kv = len(tp_layout(model, dep.tp, 0).kv_heads)
    kf = KVFormat(cc.codec, cc.key_granularity, cc.group_size, cc.symmetric, dt)
    vf = KVFormat(cc.codec, cc.value_granularity, cc.group_size, cc.symmetric, dt)
    return codec_bytes_per_token([kf], [vf], kv, model.head_dim, dep.block_size)


def collective_ms(kind: str, nbytes: float, n: int, dev: Device, cal: Calibration) -> float:
    """One collective of ``nbytes`` per rank over ``n`` ranks: alpha-beta on the device's link.

    all_reduce: the faster of ring (``2 (n-1)`` hops, ``2 (n-1)/n`` of the tensor on the wire) and
    tree (``2 ceil(log2 n)`` hops, twice the tensor); all_gather: ring, ``n - 1`` hops and chunks.
    Wire bytes come from :func:`ryzlab.parallel.layout.wire_bytes_formula`. A group larger than
    ``devices_per_node`` runs at the network's bandwidth and latency. 0 for one rank.
    """
    if n <= 1:
        return 0.0
    cross = n > dev.devices_per_node
    bw = (dev.net_gbps if cross else dev.link_gbps) * cal.link_frac * 1e9   # bytes/s
    hop = dev.net_latency_us if cross else dev.link_latency_us
    b = int(nbytes)
    if kind == "all_reduce":
        ring = 2 * (n - 1) * hop + wire_bytes_formula(b, n, "all_reduce") / bw * 1e6
        tree = 2 * math.ceil(math.log2(n)) * hop + 2 * b / bw * 1e6
        us = min(ring, tree)
    elif kind == "all_gather":
        us = (n - 1) * hop + wire_bytes_formula(b, n, "all_gather") / bw * 1e6
    else:
        raise ValueError(f"kind={kind!r} is not valid; choose one of 'all_reduce', 'all_gather'")
    return (cal.coll_base_us + us) / 1e3


@functools.lru_cache(maxsize=512)
def _heads(model: ModelConfig, tp: int) -> tuple[int, int]:
    lay = tp_layout(model, tp, 0)
    return len(lay.q_heads), len(lay.kv_heads)


def _roof_ms(flops: float, nbytes: float, peak: float, bw: float) -> float:
    return max(flops / peak, nbytes / bw) * 1e3 if (flops or nbytes) else 0.0


def row_efficiency(table: tuple[tuple[int, float], ...], rows: int) -> float:
    """``Calibration.gemm_row_eff`` at ``rows``: linear in log(rows) between the measured points,
    flat past the ends; 1 for an empty table."""
    if not table:
        return 1.0
    if rows <= table[0][0]:
        return table[0][1]
    for (r0, e0), (r1, e1) in zip(table, table[1:]):
        if rows <= r1:
            w = math.log(rows / r0) / math.log(r1 / r0)
            return e0 + w * (e1 - e0)
    return table[-1][1]


def _gemm(model: ModelConfig, dep: Deployment, tokens: int, peak: float, bw: float, eff: float,
          row_eff: tuple[tuple[int, float], ...] = ()) -> tuple[float, float, float]:
    """One layer's GEMMs on a rank: (ms, weight bytes, flops) -- roofline per layer, over the
    measured efficiency at ``tokens`` rows (``Calibration.gemm_row_eff``) when there is one."""
    mats = _layer_matrices(model, dep.tp)
    w_layer = sum(matrix_bytes(dep.weights, r, c, dep.int4_group) for r, c in mats)
    flops = 2.0 * tokens * sum(r * c for r, c in mats)
    act_io = dep.act_bytes * tokens * sum(r + c for r, c in mats)   # each GEMM reads its input, writes its output
    roof = max(flops / peak, w_layer / (bw * eff) + act_io / bw) * 1e3
    return roof / row_efficiency(row_eff, tokens), w_layer, flops


def _weight_eff(cal: Calibration, dep: Deployment) -> float:
    """Bandwidth of the deployment's weight format's GEMMs relative to bf16 ones (fp8: as bf16, an
    assumption -- both stream dense weights through tensor cores; no published fp8 row calibrates it)."""
    return {"int8": cal.int8_weight_eff, "int4": cal.int4_weight_eff}.get(dep.weights, 1.0)


def gemm_ms(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment, tokens: int) -> float:
    """Milliseconds of every layer's GEMMs (wq .. w2, all layers; no head) for ``tokens`` rows on one
    rank running alone: the part of :func:`step_cost` an operator profile of the GEMMs measures."""
    eff = _weight_eff(cal, dep)
    return model.n_layers * _gemm(model, dep, tokens, _gemm_tflops(dev, dep) * 1e12 * cal.flops_frac,
                                  dev.hbm_gbps * 1e9 * cal.bw_frac, eff, cal.gemm_row_eff)[0]


def step_cost(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment, shape: StepShape,
              *, host_overhead_ms: float | None = None) -> StepCost:
    """Milliseconds of one engine step of ``shape`` on ``dep`` (the slowest rank; all ranks alike).

    ``host_overhead_ms`` replaces the calibration's per-step host time (an eager engine).
    """
    T = shape.tokens
    if T == 0:
        return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    L, hd, act = model.n_layers, model.head_dim, dep.act_bytes
    hq, hkv = _heads(model, dep.tp)
    # ranks sharing one host's cores (cpu) slow each other down in proportion
    share = max(1.0, dep.tp * dep.cp / dev.devices_per_node) if dev.shared_host else 1.0
    # ... and beyond the cores, their caches (the calibration's co-run factor for the layout)
    co = cal.corun_factor if dev.shared_host and dep.tp * dep.cp > 1 else 1.0
    peak = dev.bf16_tflops * 1e12 * cal.flops_frac / (share * co)   # attention, logits
    gemm_peak = _gemm_tflops(dev, dep) * 1e12 * cal.flops_frac / (share * co)
    bw = dev.hbm_gbps * 1e9 * cal.bw_frac / (share * co)
    eff = _weight_eff(cal, dep)

    gemm, w_layer, gemm_flops = _gemm(model, dep, T, gemm_peak, bw, eff, cal.gemm_row_eff)

    kvt = kv_bytes_per_token(model, dep)
    dec_bytes = shape.decode_context / dep.cp * kvt
    pre_bytes = (shape.prefill_context / dep.cp + shape.prefill_tokens) * kvt   # read the past, write the chunk
    # a cp rank's partial needs its log-sum-exp too (for the exact merge)
    lse = cal.attn_lse_cost if dep.cp > 1 else 1.0
    attn = lse * (_roof_ms(4.0 * hq * hd * shape.decode_context / dep.cp, dec_bytes + act * shape.decode_seqs * hq * hd * 2,
                     peak, bw * cal.attn_frac)
            + _roof_ms(4.0 * hq * hd * shape.prefill_pairs / dep.cp, pre_bytes + act * shape.prefill_tokens * hq * hd * 2,
                       peak, bw * cal.attn_frac))
    if dep.cp > 1:   # the cp rank's general write / attend path (shares the host's cores too)
        attn += share * cal.cp_attn_us / 1e3
    if shape.prefill_tokens:   # prompt tokens take the engine's general write / attend path
        attn += share * cal.prefill_layer_us / 1e3
    elem_bytes = act * T * (8 * model.dim + 3 * model.ffn_dim // dep.tp + 2 * (hq + 2 * hkv) * hd)
    elem = elem_bytes / bw * 1e3

    ar_bytes = tp_comm_bytes_formula(model, tp=dep.tp, tokens=T, element_size=act) / 2   # per all-reduce
    ag_bytes = cp_comm_bytes_formula(model, cp=dep.cp, tp=dep.tp, tokens=T)            # float32 partials
    # on a shared host a collective waits for every rank to get a core: it slows like compute does
    comm = share * (2 * collective_ms("all_reduce", ar_bytes, dep.tp, dev, cal)
                    + collective_ms("all_gather", ag_bytes, dep.cp, dev, cal))
    if dep.tp * dep.cp > 1:
        # each collective also waits for the slowest rank: a share of the work since the last one
        # (the layer's work, however many collectives split it)
        comm += cal.coll_skew_frac * (gemm + attn + elem)
    n_out = shape.decode_seqs + shape.prefill_seqs
    wb = weight_bytes(model, dep)
    head_eff = eff if not model.tie_embeddings else 1.0
    logits = _roof_ms(2.0 * n_out * model.vocab_size * model.dim, 0.0, peak, bw) + wb["head"] / (bw * head_eff) * 1e3
    sampling = 2.0 * n_out * model.vocab_size * 4 / bw * 1e3
    kernels = L * (KERNELS_PER_LAYER + cal.cp_merge_kernels * (dep.cp > 1)) + 4
    collectives = L * (2 * (dep.tp > 1) + (dep.cp > 1))
    host = cal.host_ms if host_overhead_ms is None else host_overhead_ms
    host += (shape.decode_seqs + shape.prefill_seqs) * cal.host_seq_us / 1e3   # the engine's work per sequence
    if dep.cp > 1:   # planning a cp rank's step (its shard's tokens and pages) costs more than one rank's
        host += cal.cp_step_us / 1e3
    # Python and launches need a core too: ranks sharing a host's cores wait for them in turn
    overhead = share * (host + (kernels + collectives) * cal.kernel_us / 1e3)
    other = L * elem + logits + sampling
    total = L * (gemm + attn + comm) + other + overhead
    return StepCost(total_ms=total, gemm_ms=L * gemm, attention_ms=L * attn, other_ms=other, comm_ms=L * comm,
                    overhead_ms=overhead, weight_bytes=L * w_layer + wb["head"], kv_bytes=L * (dec_bytes + pre_bytes),
                    flops=L * gemm_flops, parts={"elementwise_ms": L * elem, "logits_ms": logits,
                                                 "sampling_ms": sampling})


def memory_bytes_per_device(model: ModelConfig, dep: Deployment, kv_tokens: float) -> float:
    """Bytes one device holds: its weights, its share of ``kv_tokens`` tokens of KV (1/cp of
    them, the rank's KV heads) and a workspace of activations and logits."""
    return (weight_bytes(model, dep)["total"] + kv_tokens / dep.cp * model.n_layers * kv_bytes_per_token(model, dep)
            + _workspace(model, dep))


def _workspace(model: ModelConfig, dep: Deployment) -> float:
    return float(dep.act_bytes * WORKSPACE_TOKENS * (4 * model.dim + 3 * model.ffn_dim // dep.tp)
                 + 4 * 256 * model.vocab_size)   # float32 logits of up to 256 sequences


def kv_capacity_tokens(model: ModelConfig, dev: Device, cal: Calibration, dep: Deployment) -> int:
    """Tokens of KV the replica holds once weights and workspace are placed (0 = the weights do
    not fit); bookkeeping from the ledger's bytes per token, not a measurement."""
    free = dev.memory_gb * 1e9 * cal.mem_util - weight_bytes(model, dep)["total"] - _workspace(model, dep)
    if free <= 0:
        return 0
    per_token_rank = model.n_layers * kv_bytes_per_token(model, dep)
    return int(free / per_token_rank) * dep.cp
