"""Quantize / pack / unpack weight matrices ``[rows, cols]`` (pure tensor functions, no modules).

Every quantizer rounds its scale to the storage dtype *before* it rounds the values, and rounds
the scale up, so no value is clamped by a scale that rounding made too small: the error bounds
below hold for the stored (not the ideal) scales.

* int8 (symmetric, absmax): ``|w - q s| <= s / 2`` per element, ``s`` the row's (or group's) scale.
* int4 (asymmetric, min/max per group, torch's convention ``w = (q - 8) s + z``):
  ``|w - deq| <= s / 2 + |z_exact - z_stored|``; the second term is the rounding of the zero to
  the storage dtype (0 in float32 up to one ulp).
* ternary (BitNet b1.58 absmean): ``s = mean |w|`` of the row, ``q = clamp(round(w / s), -1, 1)``;
  ``|w - q s| <= max(s / 2, |w| - s)`` (values beyond 1.5 s are clipped: ternary is lossy by design).
"""
from __future__ import annotations

import torch

from ryzlab.weights import INT4_ROW_BLOCK, TERNARY_PER_BYTE, int4_padded_rows

__all__ = ["round_up_to", "quantize_int8", "dequantize_int8", "quantize_int4", "pack_int4", "unpack_int4",
           "dequantize_int4", "int4_layout_block", "quantize_ternary", "pack_ternary", "unpack_ternary", "int4_padded_rows"]


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32, positive) in ``dtype``, never smaller than ``x`` (the next representable value up)."""
    r = x.to(dtype)
    low = r.float() < x
    if low.any():
        r = torch.where(low, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    return r


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    g = group_size or cols
    if cols % g:
        raise ValueError(f"group size {g} does not divide the row of {cols} values")
    return w.float().reshape(rows, cols // g, g)                                   # [N, G, g]


def quantize_int8(w: torch.Tensor, group_size: int = 0, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q`` int8 ``[N, K]``, scales ``[N, K / g]`` in ``scale_dtype``); ``group_size`` 0 = whole row."""
    wg = _groups(w, group_size)
    s = round_up_to((wg.abs().amax(-1) / 127).clamp_min(1e-12), scale_dtype)     # [N, G]
    q = torch.round(wg / s.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), s


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` and scales ``[N, G]`` -> float32 ``[N, K]``."""
    n, k = q.shape
    g = k // scales.shape[1]
    return (q.float().reshape(n, -1, g) * scales.float()[..., None]).reshape(n, k)


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q`` int32 in 0..15 ``[N, K]``, scales ``[N, G]``, zeros ``[N, G]``), ``w ~ (q - 8) s + z``."""
    wg = _groups(w, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = round_up_to(((hi - lo) / 15).clamp_min(1e-12), scale_dtype)              # [N, G]
    z = (lo + 8 * s.float()).to(scale_dtype)                                       # [N, G]
    q = torch.round((wg - z.float()[..., None]) / s.float()[..., None] + 8).clamp_(0, 15).to(torch.int32)
    return q.reshape(w.shape), s, z


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes ``[N, K]`` (0..15) + scales / zeros ``[N, G]`` -> torch's CPU kernel operands.

    Returns (packed uint8 ``[Np, K / 2]``, scales_and_zeros ``[G, Np, 2]``), ``Np`` =
    :func:`int4_padded_rows` (padding rows are zero codes with zero scale: they compute 0).
    """
    n, k = q.shape
    npad = int4_padded_rows(n)
    if npad != n:
        q = torch.cat([q, torch.zeros(npad - n, k, dtype=q.dtype)])
        scales = torch.cat([scales, torch.zeros(npad - n, scales.shape[1], dtype=scales.dtype)])
        zeros = torch.cat([zeros, torch.zeros(npad - n, zeros.shape[1], dtype=zeros.dtype)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    int4_layout_block()   # known before any compiled forward unpacks (it cannot trace the probe)
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()       # [G, Np, 2]
    return packed, sz


_LAYOUT_BLOCK: list[int] = []
"""int4_layout_block's answer once found (a plain global: a compiled forward reads it as a constant)."""


def int4_layout_block() -> int:
    """Rows per block of torch's CPU int4 layout on this machine.

    ``_convert_weight_to_int4pack_for_cpu`` packs for the kernel this CPU runs: blocks of 64 rows
    with AVX-512, of 32 with AVX2 (a block of ``n`` rows stored ``[K, n / 2]``, a byte's low nibble
    row ``d``, its high nibble row ``n / 2 + d``). Found once by packing a probe and reading it
    back with each candidate; every block divides :data:`INT4_ROW_BLOCK`, so rows padded to it
    are whole blocks everywhere. Raises if no candidate reads the probe back (a torch whose layout
    ryzlab does not know: unpacking would return wrong codes). :func:`pack_int4` finds it first."""
    if _LAYOUT_BLOCK:
        return _LAYOUT_BLOCK[0]
    probe = (torch.arange(INT4_ROW_BLOCK * 64) * 7 % 16).view(INT4_ROW_BLOCK, 64).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (INT4_ROW_BLOCK, INT4_ROW_BLOCK // 2, INT4_ROW_BLOCK // 4):
        if torch.equal(_unpack_int4(packed, torch.arange(INT4_ROW_BLOCK), block).to(torch.int32), probe):
            _LAYOUT_BLOCK.append(block)
            return block
    raise RuntimeError(f"torch {torch.__version__}'s CPU int4 layout is none ryzlab reads (blocks of "
                       f"{INT4_ROW_BLOCK}, {INT4_ROW_BLOCK // 2} or {INT4_ROW_BLOCK // 4} rows); int4 weights cannot be unpacked")


def _unpack_int4(packed: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
    npad, half = packed.shape
    blocks = packed.view(npad // block, half * 2, block // 2)                      # [Np / n, K, n / 2]
    d = rows % block
    bytes_ = blocks[rows // block, :, d % (block // 2)]                            # [R, K]
    return torch.where((d >= block // 2)[:, None], bytes_ >> 4, bytes_ & 15)


def unpack_int4(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (uint8, 0..15) of ``rows`` (default: all) from torch's CPU int4 layout ``[Np, K / 2]``.

    The layout (checked against ``_convert_weight_to_int4pack_for_cpu`` in the tests): blocks of
    :func:`int4_layout_block` rows (64 on AVX-512, 32 on AVX2), each stored ``[K, n / 2]``; a
    byte's low nibble is row ``d``, its high nibble row ``n / 2 + d``.
    """
    rows = torch.arange(packed.shape[0]) if rows is None else rows.reshape(-1).long()
    return _unpack_int4(packed, rows, int4_layout_block())


def dequantize_int4(codes: torch.Tensor, scales_zeros: torch.Tensor, rows: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Codes ``[R, K]`` (rows ``rows`` of the layout) and ``scales_zeros [G, Np, 2]`` -> float32 ``[R, K]``."""
    r, k = codes.shape
    sz = scales_zeros if rows is None else scales_zeros[:, rows.reshape(-1).long()]
    sz = sz.float().transpose(0, 1)                                                # [R, G, 2]
    g = k // sz.shape[1]
    deq = (codes.float().reshape(r, -1, g) - 8) * sz[..., :1] + sz[..., 1:]
    return deq.reshape(r, k)


def dequantize_int4_all(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Every row of torch's CPU int4 layout at once -> ``[Np, K]`` in ``dtype``: the same values as
    :func:`dequantize_int4` of :func:`unpack_int4` (computed in float32, rounded once to ``dtype``),
    in a few whole-tensor passes (no per-row gather): cheap enough to run per call."""
    npad, half = packed.shape
    k, groups, block = half * 2, scales_zeros.shape[0], int4_layout_block()
    blocks = packed.view(npad // block, k, block // 2)                             # [Np / n, K, n / 2]
    # low nibbles are rows 0 .. n/2 - 1 of a block, high nibbles the rest
    q = torch.cat((blocks & 15, blocks >> 4), dim=2).transpose(1, 2).reshape(npad, groups, k // groups)
    s = scales_zeros[..., 0].t().float().unsqueeze(-1)                                # [Np, G, 1]
    z = scales_zeros[..., 1].t().float().unsqueeze(-1)
    return q.float().sub_(8).mul_(s).add_(z).to(dtype).view(npad, k)


def quantize_ternary(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q`` int8 in {-1, 0, 1} ``[N, K]``, absmean scales ``[N]``)."""
    wf = w.float()
    s = wf.abs().mean(-1).clamp_min(1e-8).to(scale_dtype)                          # [N]
    q = torch.round(wf / s.float()[:, None]).clamp_(-1, 1).to(torch.int8)
    return q, s


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} int8 ``[N, K]`` -> uint8 ``[N, K / 4]``: value ``4j + i`` in bits ``2i .. 2i+1`` of byte ``j``."""
    n, k = q.shape
    if k % TERNARY_PER_BYTE:
        raise ValueError(f"ternary packing needs rows of a multiple of {TERNARY_PER_BYTE} values, got {k}")
    codes = (q.to(torch.int16) + 1).to(torch.uint8).view(n, k // TERNARY_PER_BYTE, TERNARY_PER_BYTE)
    out = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return out.contiguous()


_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K / 4]`` -> int8 ``[N, K]`` in {-1, 0, 1} (inverse of :func:`pack_ternary`)."""
    n, kb = packed.shape
    codes = (packed[..., None] >> _SHIFTS.to(packed.device)) & 3                   # [N, K/4, 4]
    return (codes.view(torch.int8) - 1).reshape(n, kb * TERNARY_PER_BYTE)
