"""Quantize new K/V tokens straight into their page slots (token-local scales).

One program per (16 tokens, KV head): it loads each token's ``D`` values as ``[groups, group_size]``,
computes each group's scale (fp16, or an E8M0 exponent byte for fp8) and zero point, rounds and
stores payload bytes and scales, as :meth:`ryzlab.kv.codecs.KVFormat.encode` does. Rounding
follows torch: scales are rounded to fp16 before dividing by them, divisions are correctly
rounded (``div_rn``), integers round half to even, fp8 values round to nearest even on the fp8
grid (done with integer/power-of-two arithmetic, so it needs no fp8 hardware and behaves the
same in the interpreter). One known difference: the fp8 exponent is ``ceil(log2(amax / fmax))``
taken from the float's bits (exact); torch's float32 ``log2`` can round a ratio a few ulps above
a power of two down onto it, choosing the exponent one lower (then the largest value saturates
at fmax instead). Both are valid encodings; it happens for ~1e-6 of random scales.

Token-spanning granularities (``head``, ``tensor``, ``channel``) are committed a whole block at
a time by the torch path (once per ``block_size`` tokens); this kernel does not write them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzlab.kv.pages import PagedTensor
from ryzlab.kv.triton import format_constants, interpreting, supports_write

__all__ = ["write_slots"]

_FP8 = {1: (448.0, -6, 3), 2: (57344.0, -14, 2)}  # codec id -> (max, min normal exponent, mantissa bits)


@triton.jit
def _rint(y):
    """Round half to even (torch.round)."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _exp2i(e):
    """2 ** e for integer e in [-127, 127] (int32 tensor), exact."""
    return tl.where(e == -127, 1 << 22, (e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(x):
    """floor(log2(|x|)) of a normal float32 from its exponent bits (-127 for zero and subnormals)."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 255) - 127


@triton.jit
def _write_slots_kernel(X, SLOTS, P, S, Z, n_tok, stride_xn, stride_xh, p_slot, p_h, s_slot, s_h,
                        BLOCK_T: tl.constexpr, D: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr,
                        NG_PAD: tl.constexpr,
                        GS_PAD: tl.constexpr, CODEC: tl.constexpr, HAS_ZERO: tl.constexpr,
                        QMAX: tl.constexpr, FMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr):
    h = tl.program_id(1)
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T] tokens of this program
    t_ok = i < n_tok
    slot = tl.load(SLOTS + i, mask=t_ok, other=0).to(tl.int64)
    offs_g = tl.arange(0, NG_PAD)
    offs_e = tl.arange(0, GS_PAD)
    d = (offs_g[:, None] * GS + offs_e[None, :])[None, :, :]  # [1, NG_PAD, GS_PAD] element index
    ok = t_ok[:, None, None] & ((offs_g < NG)[:, None] & (offs_e < GS)[None, :])[None, :, :]
    x = tl.load(X + i[:, None, None] * stride_xn + h * stride_xh + d, mask=ok, other=0).to(tl.float32)
    sidx = slot[:, None] * s_slot + h * s_h + offs_g[None, :]  # [T, NG_PAD]
    g_ok = t_ok[:, None] & (offs_g < NG)[None, :]
    pbase = slot[:, None, None] * p_slot + h * p_h  # [T, 1, 1]
    if CODEC == 1 or CODEC == 2:
        amax = tl.max(tl.where(ok, tl.abs(x), 0.0), 2)
        r = tl.math.div_rn(amax, FMAX)
        e = _floor_log2(r)
        e = tl.where((r.to(tl.int32, bitcast=True) & 0x7FFFFF) != 0, e + 1, e)  # ceil for non powers of 2
        e = tl.where(r == 0.0, -127, tl.minimum(tl.maximum(e, -127), 127))
        tl.store(S + sidx, (e + 127).to(tl.uint8), mask=g_ok)
        y = x * _exp2i(-e)[:, :, None]
        y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
        ulp_e = tl.maximum(_floor_log2(y), EMIN) - MBITS  # spacing of the fp8 grid around y
        v = _rint(y * _exp2i(-ulp_e)) * _exp2i(ulp_e)    # exact power-of-two scalings
        sign = (y.to(tl.int32, bitcast=True) >> 24) & 128  # from y: a tiny negative rounds to -0, as in torch
        if CODEC == 2:  # e5m2 is the top byte of the fp16 with the same value
            bits = v.to(tl.float16).to(tl.int16, bitcast=True)
            q = ((bits >> 8) & 127) | sign
        else:  # e4m3: value / 256 as fp16 holds the e4m3 bits at 7..13 (inverse of codecs._fp8_as_half)
            bits = (v * 0.00390625).to(tl.float16).to(tl.int16, bitcast=True)
            q = ((bits >> 7) & 127) | sign
        tl.store(P + pbase + d, q.to(tl.uint8), mask=ok)
    else:
        if HAS_ZERO:
            lo = tl.min(tl.where(ok, x, float("inf")), 2)
            hi = tl.max(tl.where(ok, x, float("-inf")), 2)
            lo = tl.where(g_ok, lo, 0.0)  # padding rows: keep the arithmetic finite (never stored)
            hi = tl.where(g_ok, hi, 0.0)
            zero = lo.to(tl.float16)
            s = tl.math.div_rn(hi - zero.to(tl.float32), QMAX)
            s = tl.minimum(tl.maximum(s, 6.103515625e-05), 65504.0).to(tl.float16)  # codecs' scale range
            tl.store(Z + sidx, zero, mask=g_ok)
            q = _rint(tl.math.div_rn(x - zero.to(tl.float32)[:, :, None], s.to(tl.float32)[:, :, None]))
            q = tl.minimum(tl.maximum(q, 0.0), QMAX)
        else:
            amax = tl.max(tl.where(ok, tl.abs(x), 0.0), 2)
            s = tl.math.div_rn(amax, QMAX)
            s = tl.minimum(tl.maximum(s, 6.103515625e-05), 65504.0).to(tl.float16)  # codecs' scale range
            q = _rint(tl.math.div_rn(x, s.to(tl.float32)[:, :, None]))
            q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
            if CODEC == 4:
                q = q + 8.0
        tl.store(S + sidx, s, mask=g_ok)
        if CODEC == 4:  # pairs (2i, 2i+1) lie in one group (even group size): one byte each
            lo_q, hi_q = tl.split(tl.reshape(q.to(tl.int32), (BLOCK_T, NG_PAD, GS_PAD // 2, 2)))
            byte = (lo_q | (hi_q << 4)).to(tl.uint8)  # [T, NG_PAD, GS_PAD / 2]
            offs_b = tl.arange(0, GS_PAD // 2)
            pidx = (offs_g[:, None] * (GS // 2) + offs_b[None, :])[None, :, :]
            pok = t_ok[:, None, None] & ((offs_g < NG)[:, None] & (offs_b < GS // 2)[None, :])[None, :, :]
            tl.store(P + pbase + pidx, byte, mask=pok)
        elif HAS_ZERO:
            tl.store(P + pbase + d, q.to(tl.uint8), mask=ok)
        else:
            tl.store(P + pbase + d, q.to(tl.int8), mask=ok)


def write_slots(pages: PagedTensor, layer: int, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Encode ``x [N, H, D]`` into page slots ``slots [N]`` of ``layer`` (token-local formats only)."""
    fmt, d = pages.fmt, pages.head_dim
    if not supports_write(fmt, d):
        raise ValueError(f"write_slots encodes token-local quantized formats (int4 groups of even size); "
                         f"got codec {fmt.codec!r} granularity {fmt.granularity!r}")
    if not interpreting() and x.device.type != "cuda":
        raise ValueError("write_slots runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
    n, h, _ = x.shape
    if not n:
        return
    codec, _, gs, has_zero = format_constants(fmt, d)
    ng = d // gs
    x = x.contiguous()
    p = pages.payload[layer]
    if codec in _FP8:
        p = p.view(torch.uint8)
    s = pages.scale[layer]
    z = pages.zero[layer] if pages.zero is not None else s
    fmax, emin, mbits = _FP8.get(codec, (0.0, 0, 0))
    # integer range: symmetric [-qmax, qmax], with a zero point [0, qmax] (as ryzlab.kv.codecs)
    qmax = {(3, False): 127.0, (4, False): 7.0, (3, True): 255.0, (4, True): 15.0}.get((codec, has_zero), 0.0)
    block_t = 16  # tokens per program: one program per (16 tokens, KV head)
    _write_slots_kernel[(triton.cdiv(n, block_t), h)](
        x, slots.contiguous(), p, s, z, n, x.stride(0), x.stride(1),
        h * pages.dp, pages.dp, h * ng, ng,
        BLOCK_T=block_t, D=d, GS=gs, NG=ng, NG_PAD=triton.next_power_of_2(ng),
        GS_PAD=max(2, triton.next_power_of_2(gs)),
        CODEC=codec, HAS_ZERO=has_zero, QMAX=qmax, FMAX=fmax, EMIN=emin, MBITS=mbits)
