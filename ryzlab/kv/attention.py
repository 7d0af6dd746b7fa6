"""Attention over the paged cache: the torch reference and the Triton kernels, as two small backends.

A backend reads one rank's :class:`ryzlab.kv.store.PageStore` for one layer and one planned
:class:`ryzlab.kv.step.Step`, and also owns the token-slot write (the Triton backend quantises
new tokens in its write kernel where it supports the format). It returns the output per new
token and, when asked (context parallelism), the log-sum-exp, so that partials over disjoint
key sets merge exactly (:func:`ryzlab.kv.merge.merge_over_ranks`, applied around the backend by
:class:`ryzlab.kv.cache.PagedKVCache`).

* :class:`TorchAttention` decodes the pages, then runs two batched matmuls (short chunks, and
  always when the log-sum-exp is needed: :func:`attention_with_lse`) or SDPA; CPU and CUDA.
* :class:`TritonAttention` reads the compressed pages in registers (:mod:`ryzlab.kv.triton`).

:func:`pick_backend` chooses one for ``kernel="auto" | "torch" | "triton"`` and says why Triton
cannot run when it cannot.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ryzlab.kv import triton as kv_triton
from ryzlab.kv.codecs import KVFormat
from ryzlab.kv.pages import PagedTensor
from ryzlab.kv.step import Step
from ryzlab.kv.store import PageStore

__all__ = ["Kernel", "KERNELS", "MATH_SCORES", "attention_with_lse", "decode_attention", "pad_queries", "TorchAttention",
           "TritonAttention", "Backend", "pick_backend"]

log = logging.getLogger(__name__)

Kernel = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernel)

MATH_SCORES = 1 << 24
"""Score elements per query chunk of :func:`attention_with_lse` (64 MB in float32)."""


def attention_with_lse(qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float | None, *, blocked: torch.Tensor | None = None, need_lse: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked GQA attention with log-sum-exp, in float32, chunked over queries.

    ``qp [B, Tq, Hq, D]``, ``k, v [B, H, S, D]``, ``mask [B, Tq, S]`` (True = attend) ->
    ``out [B, Tq, Hq, D]`` (0 where a query sees no key) and ``lse [B, Tq, Hq]`` (-inf there).
    Query heads are grouped onto their KV head by a reshape, so K/V are never repeated.
    ``blocked``: ``~mask`` when the caller has it already (a step builds it once for every layer).
    ``need_lse=False`` (decode, one rank): one fused softmax instead of log-sum-exp, subtract and
    exp (the same products up to float rounding, ~20 us less per layer on a CPU core); the
    log-sum-exp comes back None. Every decode query sees at least its own key, so no row is empty.
    """
    B, tq, hq, D = qp.shape
    if tq == 1 and not need_lse:
        return decode_attention(qp.view(B, hq, D), k, v, mask[:, 0], scale).view(B, 1, hq, D), None
    blocked = ~mask if blocked is None else blocked
    H, S = k.shape[1], k.shape[2]
    g = hq // H
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    kt = k.to(torch.float32).transpose(-1, -2)  # [B, H, D, S]
    vf = v.to(torch.float32)
    if tq == 1:
        # decode: the chunk loop below with c = 1, its reshapes being views -- the same
        # products in the same order, half the operators (each costs microseconds on a CPU)
        qg = qp.to(torch.float32).view(B, H, g, D)
        sc = (qg @ kt).mul_(scale).masked_fill_(blocked[:, None], float("-inf"))     # [B, H, g, S]
        lse = torch.logsumexp(sc, dim=-1)                                             # [B, H, g]
        p = sc.sub_(lse.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)[..., None]).exp_()
        return (p @ vf).view(B, 1, hq, D), lse.view(B, 1, hq)
    outs, lses = [], []
    chunk = max(1, MATH_SCORES // max(1, B * hq * S))  # bound the score tensor (~64 MB)
    for c0 in range(0, tq, chunk):
        qc = qp[:, c0:c0 + chunk].to(torch.float32)  # [B, c, Hq, D]
        c = qc.shape[1]
        qg = qc.view(B, c, H, g, D).permute(0, 2, 3, 1, 4).reshape(B, H, g * c, D)
        sc = (qg @ kt).view(B, H, g, c, S).mul_(scale)
        sc = sc.masked_fill_(blocked[:, None, None, c0:c0 + c], float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)  # [B, H, g, c]
        # a query that sees no key has lse -inf: subtract 0 there instead (its row stays -inf -> 0)
        p = sc.sub_(lse.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)[..., None]).exp_()
        o = (p.view(B, H, g * c, S) @ vf).view(B, H, g, c, D)
        outs.append(o.permute(0, 3, 1, 2, 4).reshape(B, c, hq, D))
        lses.append(lse.permute(0, 3, 1, 2).reshape(B, c, hq))
    if len(outs) == 1:  # decode and short chunks: no copy through cat
        return outs[0], lses[0]
    return torch.cat(outs, 1), torch.cat(lses, 1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One query per sequence over its keys, GQA: ``q [B, Hq, D]``, ``keys, values [B, Hkv, S, D]``,
    ``visible [B, S]`` -> ``[B, Hq, D]`` in q's dtype.

    :func:`attention_with_lse`'s decode without the log-sum-exp, op for op (float32 scores, a
    masked fused softmax, the weighted sum): the same bits. Pure tensor code: a compiled forward
    traces it into its graph (:class:`ryzlab.models.transformer.PagedContext`), where the compiler
    fuses what it can. Every decode query sees its own key at least: no row is empty.
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    f32 = torch.float32
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    sc = (q.to(f32).view(b, hkv, hq // hkv, d) @ keys.to(f32).transpose(-1, -2)).mul_(scale)  # [B, Hkv, g, S]
    sc = sc.masked_fill_(~visible[:, None, None, :], float("-inf"))
    return (torch.softmax(sc, dim=-1) @ values.to(f32)).view(b, hq, d).to(q.dtype)


def pad_queries(q: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``q [N, Hq, D]`` -> padded ``[B, Tq, Hq, D]`` and the causal mask ``[B, Tq, S]``.

    A decode step (one token per sequence) is already that layout: a view, no copy. The mask is
    built once per step (:attr:`Step.causal_mask`), not once per layer."""
    if step.is_decode:
        return q[:, None], step.causal_mask
    qp = q.new_zeros(len(step.seq_ids), step._q_pos.shape[1], *q.shape[1:])  # [B, Tq, Hq, D]
    qp[step._q_b, step._q_t] = q
    return qp, step.causal_mask  # [B, Tq, S] causal = in-context


def unpad(x: torch.Tensor, step: Step) -> torch.Tensor:
    """Padded ``[B, Tq, ...]`` -> the ragged token list ``[N, ...]`` (inverse of :func:`pad_queries`)."""
    return x[:, 0] if step.is_decode else x[step._q_b, step._q_t]


class TorchAttention:
    """The reference: decode this rank's pages to ``[B, H, S, D]``, attend in torch."""

    name = "torch"

    def write_slots(self, pages: PagedTensor, layer: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        pages.write_slots(layer, slots, x)

    def attend(self, store: PageStore, layer: int, q: torch.Tensor, step: Step, scale: float | None, *,
               with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q [N, Hq, D]`` (stored basis) -> ``out [N, Hq, D]`` and, ``with_lse``, ``lse [N, Hq]``."""
        k, v = store.gather_heads(layer, step)  # [B, H, S, D]
        qp, mask = pad_queries(q, step)
        b, tq, hq, d = qp.shape
        if with_lse:
            out, lse = attention_with_lse(qp, k, v, mask, scale, blocked=step.blocked)
            return unpad(out, step), unpad(lse, step)
        if b * hq * tq * k.shape[2] <= MATH_SCORES:
            # decode and short chunks: two batched matmuls beat SDPA's CPU kernel here
            out = attention_with_lse(qp, k, v, mask, scale, blocked=step.blocked, need_lse=False)[0]
        else:
            out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.to(q.dtype), v.to(q.dtype),
                                                 attn_mask=mask[:, None], scale=scale,
                                                 enable_gqa=True).transpose(1, 2)  # [B, Tq, Hq, D]
        return unpad(out, step), None


class TritonAttention:
    """The kernels of :mod:`ryzlab.kv.triton`: compressed pages read (and token slots written) in registers."""

    name = "triton"

    def __init__(self) -> None:
        self._plan: tuple[Step, object] | None = None  # the kernel's plan of the current step

    def write_slots(self, pages: PagedTensor, layer: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        if kv_triton.supports_write(pages.fmt, pages.head_dim):
            kv_triton.write_slots(pages, layer, slots, x)
        else:  # token-local formats the write kernel does not pack yet
            pages.write_slots(layer, slots, x)

    def attend(self, store: PageStore, layer: int, q: torch.Tensor, step: Step, scale: float | None, *,
               with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q [N, Hq, D]`` -> ``out [N, Hq, D]``, ``lse [N, Hq]`` (the kernel always has it)."""
        from ryzlab.kv.triton.decode import paged_attention, plan_from_gather
        if self._plan is None or self._plan[0] is not step:  # once per step, not per layer
            plan = plan_from_gather(step._q_b, step.positions, step._tables, step._kpos, store.block_size,
                                    step._ov_b, step._ov_idx, step._ov_row)
            self._plan = (step, plan)
        (kp, kl), (vp, vl) = store.k.where(layer), store.v.where(layer)  # a layer's pages and index in its group
        return paged_attention(q, kp, vp, kl, self._plan[1], store.tail(layer, "k"), store.tail(layer, "v"),
                               scale=scale)


Backend = TorchAttention | TritonAttention


def pick_backend(kernel: Kernel, device: torch.device, formats: Sequence[KVFormat], *, pre_rope: bool) -> Backend:
    """The backend for ``kernel``; ``auto`` is Triton on CUDA when it can read every format, else torch.

    Raises ``ValueError`` for an unknown kernel, or ``triton`` where it cannot run (with the reason).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not valid; choose one of {', '.join(KERNELS)}")
    why = kv_triton.unavailable_reason(device) or next(
        (r for f in formats if (r := kv_triton.unreadable_reason(f))), None)
    if not why and pre_rope:
        why = "keys stored before RoPE (pre_rope_keys) need RoPE applied on read, which the kernel does not do"
    if kernel == "triton" and why:
        raise ValueError(f"kernel='triton' cannot run here: {why}; choose 'torch' or 'auto'")
    if kernel == "auto":
        if device.type == "cuda" and why:
            log.warning("PagedKVCache on %s falls back to the torch attention path: %s", device, why)
        kernel = "triton" if device.type == "cuda" and not why else "torch"
    return TritonAttention() if kernel == "triton" else TorchAttention()
