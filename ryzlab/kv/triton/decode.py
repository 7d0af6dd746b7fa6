"""Paged attention over compressed pages, dequantized in registers (flash-decoding).

One program per (query token, KV head, key split): it loads the ``G`` query heads that share the
KV head (GQA: K/V are read once for the group), walks its share of the sequence's keys
``BLOCK_N`` at a time through the block table, dequantizes each K/V tile in registers
(payload bytes -> integer or fp8 bits -> times scale (+ zero point) -> model dtype, exactly the
values :meth:`ryzlab.kv.codecs.KVFormat.decode` produces) and keeps an online softmax. Split 0
also reads the sequence's full-precision tail rows (residual window, block whose token-spanning
scales are not fixed yet). A second kernel merges the splits by log-sum-exp.

Precision: scores and softmax in float32. With a bf16/fp16 model the dot products take
model-dtype operands (the same rounding of K/V the torch path applies when it decodes pages to
the model dtype) with float32 accumulation; probabilities are split into a high and a low
model-dtype part (two tensor-core products) so ``P @ V`` keeps ~16 more mantissa bits than one
cast. A float32 model uses IEEE float32 products. Triton's interpreter cannot multiply bf16
matrices, so there everything is float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ryzlab.kv.pages import PagedTensor
from ryzlab.kv.triton import format_constants, interpreting

__all__ = ["PagePlan", "plan_from_gather", "paged_attention"]

_FAR = 1 << 30  # position of padding keys: beyond every query
_LOWP = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class PagePlan:
    """Where every query's keys are; built once per step and shared by all layers (int32, on device).

    Key ``n`` of row ``b`` is token ``n % bs`` of page ``tables[b, n // bs]`` at position
    ``kstart[b, n // bs] + n % bs``; a query at ``q_pos`` sees the keys at positions ``<= q_pos``,
    from the pages below ``pend[b]`` and from the tail rows ``tail_row[tail_ptr[b]:tail_ptr[b+1]]``
    (positions ``tail_pos``) at or above it. Under context parallelism the tables hold this rank's
    pages only, so positions skip the other ranks' blocks; they never fall below ``n``.
    """

    q_row: torch.Tensor     # [N] row of each query in tables
    q_pos: torch.Tensor     # [N]
    tables: torch.Tensor    # [B, nb] page slots
    kstart: torch.Tensor    # [B, nb] position of each page's first token (_FAR for padding)
    pend: torch.Tensor      # [B]
    tail_ptr: torch.Tensor  # [B + 1]
    tail_row: torch.Tensor  # [M]
    tail_pos: torch.Tensor  # [M]
    block_size: int


def plan_from_gather(q_row: torch.Tensor, q_pos: torch.Tensor, tables: torch.Tensor, kpos: torch.Tensor,
                     block_size: int, ov_b: torch.Tensor, ov_idx: torch.Tensor, ov_row: torch.Tensor) -> PagePlan:
    """Build a :class:`PagePlan` from the cache's gather plan.

    ``tables [B, nb]``, ``kpos [B or 1, nb * bs]`` (position of every gathered key), and the tail
    overlay ``(ov_b, ov_idx, ov_row)``: gathered key ``ov_idx`` of row ``ov_b`` is read from tail
    row ``ov_row`` (rows sorted by ``ov_b``; every position of a row at or above its first
    overlaid one that this rank holds is overlaid).
    """
    b, nb = tables.shape
    dev = tables.device
    kpos = kpos.expand(b, -1)
    kstart = kpos[:, ::block_size].clamp(max=_FAR)
    tail_pos = kpos[ov_b, ov_idx]
    pend = torch.full((b,), _FAR, dtype=torch.long, device=dev)
    if ov_b.numel():
        pend = pend.scatter_reduce(0, ov_b, tail_pos, reduce="amin")
    counts = torch.bincount(ov_b, minlength=b) if ov_b.numel() else torch.zeros(b, dtype=torch.long, device=dev)
    tail_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return PagePlan(i32(q_row), i32(q_pos), i32(tables), i32(kstart), i32(pend), i32(tail_ptr), i32(ov_row),
                    i32(tail_pos), block_size)


@triton.jit
def _load_dequant(P, S, Z, page, tok, h, offs_d, valid, sp_b, sp_t, sp_h, ss_b, ss_t, ss_h,
                  CODEC: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                  D: tl.constexpr):
    """Tile ``[BLOCK_N, D_PAD]`` of keys or values in float32, as KVFormat.decode computes them
    (0 where ``valid [BLOCK_N]`` is false or beyond head_dim)."""
    mask = valid[:, None] & (offs_d < D)[None, :]
    base = page[:, None] * sp_b + tok[:, None] * sp_t + h * sp_h
    if CODEC == 4:  # packed integers, 8 / BITS per byte: element per*i + j in bits [j*BITS, (j+1)*BITS) of byte i
        byte = tl.load(P + base + offs_d[None, :] // (8 // BITS), mask=mask, other=0).to(tl.int32)
        x = ((byte >> ((offs_d[None, :] % (8 // BITS)) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        if not HAS_ZERO:
            x = x - (1 << (BITS - 1))  # symmetric values are stored as q + 2**(BITS-1) (int4: q + 8)
    elif CODEC == 1 or CODEC == 2:  # fp8 bytes -> fp16 bits (as codecs._fp8_as_half): exact
        hbits = tl.load(P + base + offs_d[None, :], mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int16)
        if CODEC == 2:
            x = (hbits << 8).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            x = ((hbits << 7) & -16385).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    else:  # none (model dtype), int8 (int8 symmetric, uint8 with a zero point)
        x = tl.load(P + base + offs_d[None, :], mask=mask, other=0).to(tl.float32)
    if CODEC != 0:
        if GROUP >= D:  # one scale per (token, head): one load per key, broadcast over head_dim
            sidx = (page * ss_b + tok * ss_t + h * ss_h)[:, None]
            s = tl.load(S + sidx, mask=valid[:, None], other=0)
        else:
            sidx = page[:, None] * ss_b + tok[:, None] * ss_t + h * ss_h + offs_d[None, :] // GROUP
            s = tl.load(S + sidx, mask=mask, other=0)
        if CODEC == 1 or CODEC == 2:  # E8M0 byte e -> 2 ** (e - 127), built from its bits (exact)
            e = s.to(tl.int32)
            s = tl.where(e == 0, (1 << 22), e << 23).to(tl.float32, bitcast=True)
        else:
            s = s.to(tl.float32)
        x = x * s
        if HAS_ZERO:
            x = x + tl.load(Z + sidx, mask=valid[:, None] if GROUP >= D else mask, other=0).to(tl.float32)
    return x


@triton.jit
def _softmax_update(q, k, v, valid, m_i, l_i, acc, qk_scale, LOWP: tl.constexpr):
    """One online-softmax step (log2 domain) of ``q [G_PAD, D_PAD]`` over a K/V tile."""
    if LOWP == 0:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    elif LOWP == 1:
        qk = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))
    else:
        qk = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)))
    s = tl.where(valid[None, :], qk * qk_scale, float("-inf"))  # [G_PAD, BLOCK_N]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp2 finite
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if LOWP == 0:
        pv = tl.dot(p, v, input_precision="ieee")
    elif LOWP == 1:
        p_hi = p.to(tl.float16)
        vl = v.to(tl.float16)
        pv = tl.dot(p_hi, vl) + tl.dot((p - p_hi.to(tl.float32)).to(tl.float16), vl)
    else:
        p_hi = p.to(tl.bfloat16)
        vl = v.to(tl.bfloat16)
        pv = tl.dot(p_hi, vl) + tl.dot((p - p_hi.to(tl.float32)).to(tl.bfloat16), vl)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
        Q, O_PART, L_PART, KP, KS, KZ, VP, VS, VZ, TAIL_K, TAIL_V,
        Q_ROW, Q_POS, TABLES, KSTART, PEND, TAIL_PTR, TAIL_ROW, TAIL_POS,
        qk_scale, keys_per_split,
        stride_qn, stride_qh, stride_on, stride_oh, stride_os, stride_ln, stride_lh,
        kp_b, kp_t, kp_h, ks_b, ks_t, ks_h, vp_b, vp_t, vp_h, vs_b, vs_t, vs_h,
        stride_tail_r, stride_tail_h, stride_tab, nb,
        BS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, LOWP: tl.constexpr,
        K_CODEC: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_ZERO: tl.constexpr,
        V_CODEC: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_ZERO: tl.constexpr):
    i = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(Q_ROW + i)
    qpos = tl.load(Q_POS + i)
    pend = tl.load(PEND + b)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    g_ok = offs_g < G
    q = tl.load(Q + i * stride_qn + (hk * G + offs_g[:, None]) * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0).to(tl.float32)  # [G_PAD, D_PAD]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    # key n sits at position >= n, so keys past the query position are never needed
    n_end = tl.minimum(nb * BS, qpos + 1)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, n_end)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < stop
        j = n // BS
        tok = n % BS
        page = tl.load(TABLES + b * stride_tab + j, mask=n_ok, other=0).to(tl.int64)
        kpos = tl.load(KSTART + b * stride_tab + j, mask=n_ok, other=0) + tok
        valid = n_ok & (kpos <= qpos) & (kpos < pend)
        k = _load_dequant(KP, KS, KZ, page, tok, hk, offs_d, valid, kp_b, kp_t, kp_h, ks_b, ks_t, ks_h,
                          K_CODEC, K_BITS, K_GROUP, K_ZERO, D)
        v = _load_dequant(VP, VS, VZ, page, tok, hk, offs_d, valid, vp_b, vp_t, vp_h, vs_b, vs_t, vs_h,
                          V_CODEC, V_BITS, V_GROUP, V_ZERO, D)
        m_i, l_i, acc = _softmax_update(q, k, v, valid, m_i, l_i, acc, qk_scale, LOWP)
    if split == 0:  # the full-precision tail rows of this sequence (at most the tail length)
        t_lo = tl.load(TAIL_PTR + b)
        t_hi = tl.load(TAIL_PTR + b + 1)
        for e0 in range(t_lo, t_hi, BLOCK_N):
            e = e0 + offs_n
            e_ok = e < t_hi
            row = tl.load(TAIL_ROW + e, mask=e_ok, other=0).to(tl.int64)
            valid = e_ok & (tl.load(TAIL_POS + e, mask=e_ok, other=0) <= qpos)
            mask = valid[:, None] & d_ok[None, :]
            off = row[:, None] * stride_tail_r + hk * stride_tail_h + offs_d[None, :]
            k = tl.load(TAIL_K + off, mask=mask, other=0).to(tl.float32)
            v = tl.load(TAIL_V + off, mask=mask, other=0).to(tl.float32)
            m_i, l_i, acc = _softmax_update(q, k, v, valid, m_i, l_i, acc, qk_scale, LOWP)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    heads = hk * G + offs_g
    tl.store(O_PART + i * stride_on + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :], out,
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(L_PART + i * stride_ln + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(O_PART, L_PART, OUT, LSE, stride_on, stride_oh, stride_os, stride_ln, stride_lh,
                         stride_n, stride_h, stride_lse, SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr,
                         D_PAD: tl.constexpr):
    """Exact log-sum-exp merge of the splits (as :func:`ryzlab.kv.merge.merge_partials`)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < SPLITS
    lse = tl.load(L_PART + i * stride_ln + h * stride_lh + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # exp(-inf) = 0: empty splits weigh nothing
    denom = tl.sum(w, 0)
    o = tl.load(O_PART + i * stride_on + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d < D)[None, :], other=0)
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(denom, 1e-38)
    tl.store(OUT + i * stride_n + h * stride_h + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < D)
    lse_out = tl.where(denom > 0, m_safe + tl.log(tl.maximum(denom, 1e-38)), float("-inf"))
    tl.store(LSE + i * stride_lse + h, lse_out)


def _strides(pages: PagedTensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Element strides (page, token, head) of one layer's payload and of its scales (0 where shared)."""
    h, dp = pages.heads, pages.dp
    s_t, s_h, n_g = pages.scale_shape
    payload = (pages.bs * h * dp, h * dp, dp)
    scale = (s_t * s_h * n_g, s_h * n_g if s_t > 1 else 0, n_g if s_h > 1 else 0)
    return payload, scale


def _operands(pages: PagedTensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = pages.payload[layer]
    if pages.fmt.codec.startswith("fp8"):
        p = p.view(torch.uint8)  # read as bytes: the kernel decodes fp8 bits itself
    s = pages.scale[layer] if pages.scale is not None else p  # unused placeholder pointers
    z = pages.zero[layer] if pages.zero is not None else s
    return p, s, z


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def default_splits(n_queries: int, kv_heads: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Enough key splits for ~2 programs per streaming multiprocessor (1 in the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, n_queries * kv_heads))
    return max(1, min(want, -(-max_keys // block_n)))


def paged_attention(q: torch.Tensor, k: PagedTensor, v: PagedTensor, layer: int, plan: PagePlan,
                    tail_k: torch.Tensor, tail_v: torch.Tensor, *, scale: float | None = None,
                    splits: int | None = None, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [N, Hq, D]`` over layer ``layer`` of the pages ``k``/``v`` and the tail.

    ``tail_k``/``tail_v [R, H, D]`` are this layer's full-precision tail rows (model dtype).
    Returns ``out [N, Hq, D]`` in ``q.dtype`` (0 for a query that sees no key) and
    ``lse [N, Hq]`` float32 natural-log log-sum-exp of the scaled scores (-inf there).
    ``splits`` (key splits per query and head) defaults to filling the GPU.
    """
    n, hq, d = q.shape
    h = k.heads
    if hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of {h} KV heads")
    if d != k.head_dim or k.bs != plan.block_size or (k.bs, k.heads, k.head_dim) != (v.bs, v.heads, v.head_dim):
        raise ValueError(f"q head_dim {d}, K pages (bs {k.bs}, H {k.heads}, D {k.head_dim}), V pages "
                         f"(bs {v.bs}, H {v.heads}, D {v.head_dim}) and plan block size {plan.block_size} disagree")
    if not interpreting() and q.device.type != "cuda":
        raise ValueError("paged_attention runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
    g = hq // h
    nb = plan.tables.shape[1]
    q = q.contiguous()
    block_n = min(block_n, _pow2(nb * k.bs))
    lowp = 0 if interpreting() else _LOWP.get(q.dtype, 0)
    splits = splits or default_splits(n, h, nb * k.bs, block_n, q.device)
    per_split = -(-(nb * k.bs) // splits)
    per_split = -(-per_split // block_n) * block_n
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    o_part = torch.empty(n, hq, splits, d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(n, hq, splits, dtype=torch.float32, device=q.device)
    (kp, ks, kz), (vp, vs, vz) = _operands(k, layer), _operands(v, layer)
    (kpb, ksb), (vpb, vsb) = _strides(k), _strides(v)
    kc, vc = format_constants(k.fmt, d), format_constants(v.fmt, d)
    tail_k = tail_k.contiguous()
    tail_v = tail_v.contiguous()
    if n:
        _paged_attention_kernel[(n, h, splits)](
            q, o_part, l_part, kp, ks, kz, vp, vs, vz, tail_k, tail_v,
            plan.q_row, plan.q_pos, plan.tables, plan.kstart, plan.pend, plan.tail_ptr, plan.tail_row,
            plan.tail_pos, sm_scale * 1.4426950408889634, per_split,
            q.stride(0), q.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
            l_part.stride(0), l_part.stride(1), *kpb, *ksb, *vpb, *vsb,
            tail_k.stride(0), tail_k.stride(1), plan.tables.stride(0), nb,
            BS=k.bs, G=g, G_PAD=_pow2(g), D=d, D_PAD=_pow2(d), BLOCK_N=block_n, LOWP=lowp,
            K_CODEC=kc[0], K_BITS=kc[1], K_GROUP=kc[2], K_ZERO=kc[3],
            V_CODEC=vc[0], V_BITS=vc[1], V_GROUP=vc[2], V_ZERO=vc[3])
    if splits == 1:
        return o_part[:, :, 0].to(q.dtype), l_part[:, :, 0]
    out = torch.empty_like(q)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    if n:
        _merge_splits_kernel[(n, hq)](
            o_part, l_part, out, lse, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            l_part.stride(0), l_part.stride(1), out.stride(0), out.stride(1), lse.stride(0),
            SPLITS=splits, S_PAD=_pow2(splits, 2), D=d, D_PAD=_pow2(d))
    return out, lse
