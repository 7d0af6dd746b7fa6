"""KV codecs: encode ``[..., T, H, D]`` tensors into a payload plus scales, decode them back.

Formats (``Codec``): ``none`` keeps the model dtype; ``fp8_e4m3`` / ``fp8_e5m2`` store
``torch.float8`` values of ``x / scale``; ``int8`` stores round(x / scale) in int8; ``int4``,
``int3`` and ``int2`` pack unsigned codes ``u`` (below) into ``uint8`` bytes along head_dim.

Packing layouts (what a kernel reading the pages must follow; payload last dim ``Dp``):

=========  ==============  ==========================================================
codec      Dp              element ``i`` of a head vector
=========  ==============  ==========================================================
``int4``   D / 2           byte ``i // 2``, bits ``4 * (i % 2)`` .. +3 (``2i`` low nibble)
``int2``   D / 4           byte ``i // 4``, bits ``2 * (i % 4)`` .. +1
``int3``   3 * D / 8       24-bit little-endian word ``w`` in bytes ``3j .. 3j+2``,
                           ``j = i // 8``; bits ``3 * (i % 8)`` .. +2 of ``w``
=========  ==============  ==========================================================

Codes: symmetric ``u = q + 2**(bits-1)`` with ``q = round(x / s)`` in ``[-qmax, qmax]``,
``qmax = 2**(bits-1) - 1`` (int4 [-7, 7], int3 [-3, 3], int2 [-1, 1]: three levels, so int2 is
meant to be used asymmetric); asymmetric ``u = round((x - min) / s)`` in ``[0, 2**bits - 1]``
and ``x = u * s + min``. int8 symmetric stores ``q`` as int8, asymmetric ``u`` as uint8.
head_dim must be a multiple of the packing unit (2, 8, 4 values).

Scale granularity (``Granularity``) decides which elements share one scale:

=============  =====================================  ==================
granularity    one scale per                           spans tokens?
=============  =====================================  ==================
``token_head`` (token, head)                           no
``group``      (token, head, group of group_size dims) no
``head``       (head) over the T tokens passed in      yes
``tensor``     everything passed in                    yes
``channel``    (head, head_dim column) over the T tok. yes (KIVI keys)
=============  =====================================  ==================

The codec knows nothing about blocks: a token-spanning scale is computed over exactly the
``T`` tokens of the tensor it is given. The paged cache passes one *full block* at a time, so
those scales are fixed once written and amortised over ``block_size`` tokens (KIVI keeps the
not-yet-full group in full precision; so does the cache). :func:`bytes_per_token` takes that
``span`` to give the exact amortised cost.

Integer scales (and zero points) are stored as float16: 2 bytes, enough range for K/V
activations, and the quantisation uses the *rounded* fp16 scale so decode(encode(x)) is exactly
what a reader sees. fp8 scales are powers of two stored as one biased-exponent byte (E8M0, as in
the OCP Microscaling formats): in a floating format the scale only sets the *range*, relative
precision is the mantissa's wherever the value lands, so rounding the scale up to a power of
two costs no precision, halves the scale bytes and makes fp8 ``token_head`` 0.508 of bf16 at
head_dim 64 instead of 0.516. Multiplying by a power of two is exact.

Integer codecs are symmetric by default; ``symmetric=False`` stores a float16 minimum per
scale as well, at 2 more bytes per scale. fp8 is always symmetric (a float format gains little
from an offset).

Bytes per token at head_dim 64 vs bf16 (scales included): fp8 ``token_head`` 0.508, int8
``token_head`` 0.516, int4 ``token_head`` or ``group`` 64 0.266 (asymmetric: 0.281); the
paged cache adds padding, residual rows and block tables on top (see its ``ledger``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ryzlab.config import (CODEC_BITS, CODECS, GRANULARITIES, PACK_UNIT, Codec, Granularity, check_choice,
                           check_head_dim)

__all__ = ["KVFormat", "Encoded", "TokenBytes", "SCALE_DTYPE", "E8M0_DTYPE", "TOKEN_SPANNING", "bytes_per_token",
           "encode", "decode"]

log = logging.getLogger(__name__)

SCALE_DTYPE = torch.float16
"""Storage dtype of integer-codec scales and zero points (2 bytes)."""
E8M0_DTYPE = torch.uint8
"""fp8 scales: biased exponent e, scale = 2 ** (e - 127) (1 byte)."""
TOKEN_SPANNING: frozenset[str] = frozenset({"tensor", "head", "channel"})
"""Granularities whose scale covers several tokens (fixed per block in the paged cache)."""
# Smallest scale: the fp16 normal minimum. A zero (or denormal) scale would divide by zero or
# lose precision on decode; flooring it only matters for |x| < ~4e-4 (int4), where the absolute
# error stays below half a step (3e-5).
_MIN_SCALE = 2.0 ** -14
_MAX_SCALE = 65504.0
_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_INT_MAX = {c: 2 ** (b - 1) - 1 for c, b in CODEC_BITS.items()}  # symmetric range [-qmax, qmax]
_UINT_MAX = {c: 2 ** b - 1 for c, b in CODEC_BITS.items()}  # asymmetric range [0, umax]


@dataclass(frozen=True)
class Encoded:
    """Payload ``[..., T, H, Dp]`` plus scales/zero points ``[..., sT, sH, nG]``.

    Scales are float16 for int codecs and E8M0 exponent bytes (uint8) for fp8; zero points
    float16.

    ``sT`` is 1 for token-spanning granularities, else T; ``sH`` is 1 for ``tensor``, else H;
    ``nG`` is the number of head_dim groups sharing a scale (1, D / group_size or D).
    ``scale`` and ``zero`` are None for codec ``none``; ``zero`` is None when symmetric.
    """

    payload: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None


@dataclass(frozen=True)
class TokenBytes:
    """Bytes one token costs for one tensor (K or V) of one layer, amortised."""

    payload: float
    scales: float
    """Scales plus zero points."""

    @property
    def total(self) -> float:
        return self.payload + self.scales


@dataclass(frozen=True)
class KVFormat:
    """One storage format: codec + scale granularity (+ group size, symmetry).

    ``model_dtype`` is what ``none`` stores and what :meth:`decode` returns by default.
    """

    codec: Codec = "none"
    granularity: Granularity = "token_head"
    group_size: int = 32
    symmetric: bool = True
    model_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_choice("codec", self.codec, CODECS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        if self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")

    # ------------------------------------------------------------------ layout
    @property
    def quantized(self) -> bool:
        return self.codec != "none"

    @property
    def spans_tokens(self) -> bool:
        return self.quantized and self.granularity in TOKEN_SPANNING

    @property
    def has_zero(self) -> bool:
        return self.codec in _INT_MAX and not self.symmetric

    @property
    def scale_dtype(self) -> torch.dtype:
        return E8M0_DTYPE if self.codec in _FP8 else SCALE_DTYPE

    @property
    def storage_dtype(self) -> torch.dtype:
        if self.codec == "none":
            return self.model_dtype
        if self.codec in _FP8:
            return _FP8[self.codec]
        return torch.int8 if self.codec == "int8" and self.symmetric else torch.uint8

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` if this format cannot store vectors of ``head_dim`` values."""
        check_head_dim(head_dim, [self.codec], self.group_size if self.quantized and self.granularity == "group"
                       else None)

    @property
    def packed(self) -> bool:
        """Sub-byte codec: several values per byte (see the packing table in the module doc)."""
        return self.codec in PACK_UNIT

    def packed_dim(self, head_dim: int) -> int:
        """Last payload dim: head_dim bytes, or head_dim * bits / 8 for the sub-byte codecs."""
        return head_dim * CODEC_BITS[self.codec] // 8 if self.packed else head_dim

    def groups(self, head_dim: int) -> int:
        """``nG``: how many scales along head_dim."""
        if self.granularity == "channel":
            return head_dim
        if self.granularity == "group":
            return head_dim // self.group_size
        return 1

    def scale_shape(self, tokens: int, heads: int, head_dim: int) -> tuple[int, int, int]:
        """``(sT, sH, nG)`` of the scales for ``tokens`` tokens of ``heads`` x ``head_dim``."""
        s_t = 1 if self.granularity in TOKEN_SPANNING else tokens
        s_h = 1 if self.granularity == "tensor" else heads
        return s_t, s_h, self.groups(head_dim)

    def bytes_per_token(self, heads: int, head_dim: int, span: int = 1) -> TokenBytes:
        """Exact bytes per token for one tensor; token-spanning scales are divided by ``span``."""
        if not self.quantized:
            return TokenBytes(heads * head_dim * self.model_dtype.itemsize, 0.0)
        if span <= 0:
            raise ValueError(f"span must be >= 1 token, got {span}")
        payload = heads * self.packed_dim(head_dim)  # 1-byte storage dtypes
        s_t, s_h, n_g = self.scale_shape(1, heads, head_dim)
        per_scale = self.scale_dtype.itemsize * (2 if self.has_zero else 1)
        scales = s_h * n_g * per_scale / (span if self.spans_tokens else 1)
        return TokenBytes(float(payload), float(scales))

    # ------------------------------------------------------------------ codec
    def encode(self, x: torch.Tensor) -> Encoded:
        """Encode ``x [..., T, H, D]``; token-spanning scales cover all T tokens of each leading index."""
        if x.dim() < 3:
            raise ValueError(f"expected [..., T, H, D], got shape {tuple(x.shape)}")
        if not self.quantized:
            return Encoded(x.to(self.model_dtype), None, None)
        *lead, t, h, d = x.shape
        self.check_head_dim(d)
        n_g = self.groups(d)
        xg = x.float().reshape(*lead, t, h, n_g, d // n_g)  # [..., T, H, nG, g]
        red = {"token_head": (-1,), "group": (-1,), "channel": (-4, -1),
               "head": (-4, -1), "tensor": (-4, -3, -1)}[self.granularity]
        if self.codec in _FP8:
            fmax = torch.finfo(_FP8[self.codec]).max
            amax = xg.abs().amax(dim=red, keepdim=True)
            # smallest power of two with amax / 2**e <= fmax; all-zero input -> 2**-127
            e = torch.ceil(torch.log2(amax / fmax)).clamp(-127, 127).nan_to_num(-127.0)
            y = xg * torch.exp2(-e)
            q = y.clamp(-fmax, fmax).to(_FP8[self.codec]).reshape(*lead, t, h, d)
            return Encoded(q, (e + 127).to(E8M0_DTYPE).squeeze(-1), None)
        if self.symmetric:
            qmax = _INT_MAX[self.codec]
            amax = xg.abs().amax(dim=red, keepdim=True)
            scale = (amax / qmax).clamp(_MIN_SCALE, _MAX_SCALE).to(SCALE_DTYPE)
            y = xg / scale.float()
            q = y.round().clamp(-qmax, qmax).reshape(*lead, t, h, d)
            zero = None
            if self.packed:
                q = q + (qmax + 1)  # unsigned code 1 .. 2 * qmax + 1
        else:
            umax = _UINT_MAX[self.codec]
            lo = xg.amin(dim=red, keepdim=True)
            hi = xg.amax(dim=red, keepdim=True)
            zero = lo.to(SCALE_DTYPE)
            scale = ((hi - zero.float()) / umax).clamp(_MIN_SCALE, _MAX_SCALE).to(SCALE_DTYPE)
            q = ((xg - zero.float()) / scale.float()).round().clamp(0, umax).reshape(*lead, t, h, d)
            zero = zero.squeeze(-1)
        q = _pack(q.to(torch.uint8), self.codec) if self.packed else q.to(self.storage_dtype)
        return Encoded(q, scale.squeeze(-1), zero)

    def unpack(self, payload: torch.Tensor) -> torch.Tensor:
        """Sub-byte codecs only: ``[..., Dp]`` bytes -> ``[..., D]`` integers (int8 ``q`` when
        symmetric, uint8 codes ``u`` otherwise), in the packing layout of the module doc.
        Layout-preserving per element, and fastest on a contiguous payload (do it before any
        permute, then decode with ``unpacked=True``)."""
        if not self.packed:
            raise ValueError(f"unpack is for {', '.join(PACK_UNIT)} payloads, not codec {self.codec!r}")
        x = payload.to(torch.int16, memory_format=torch.contiguous_format)
        if self.codec == "int4":
            # Both nibbles in one int16 pass: x | x << 4 puts the low nibble in byte 0 and the high
            # nibble in byte 1 (little-endian), so viewing the int16s as bytes interleaves them in
            # order. About 1.8x faster on CPU than masking, shifting and stacking two tensors.
            v = ((x | (x << 4)) & 0x0F0F).view(torch.uint8)
        elif self.codec == "int2":
            v = ((x.unsqueeze(-1) >> _SHIFTS2.to(x.device)) & 3).to(torch.uint8).flatten(-2)
        else:  # int3: three bytes -> one 24-bit word -> eight 3-bit fields
            b = x.to(torch.int32).unflatten(-1, (-1, 3))
            w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
            v = ((w.unsqueeze(-1) >> _SHIFTS3.to(x.device)) & 7).to(torch.uint8).flatten(-2)
        if self.symmetric:  # stored q + 2**(bits-1): subtract in uint8 (wraps) and read back as
            return (v - (_INT_MAX[self.codec] + 1)).view(torch.int8)  # int8, saving a float pass (~15% on CPU)
        return v

    def decode(self, enc: Encoded, dtype: torch.dtype | None = None, *, unpacked: bool = False) -> torch.Tensor:
        """Decode to ``[..., T, H, D]`` in ``dtype`` (default ``model_dtype``): a few vectorised ops.

        Layout-agnostic: the payload may be any (e.g. permuted) view ``[..., Dp]`` as long as
        ``enc.scale`` / ``enc.zero`` ``[..., nG]`` broadcast against its leading dims; the result
        is contiguous in the payload's logical order. The cache uses this to decode gathered
        pages straight into the ``[B, H, S, D]`` layout attention wants, with no extra pass.
        ``unpacked=True``: an int4 payload was already expanded by :meth:`unpack`.
        """
        dtype = dtype or self.model_dtype
        p = enc.payload
        contiguous = torch.contiguous_format
        if not self.quantized:
            # .to() returns a same-dtype view as is, whatever memory_format says
            return p.to(dtype).contiguous()
        assert enc.scale is not None
        # The hot path of decode attention: ~2 passes over the payload (convert into a fresh
        # contiguous tensor, then scale in place), never a Python loop. float32 work: fp16/bf16
        # products would round twice; cast once at the end.
        work = torch.float32
        if self.packed:
            # int4: low nibble = even element, high nibble = odd element (measured faster than a
            # 256-entry lookup table on CPU)
            v = (p if unpacked else self.unpack(p)).to(work, memory_format=contiguous)
        elif self.codec in _FP8:
            v = _fp8_as_half(p, self.codec).to(work, memory_format=contiguous)
        else:
            v = p.to(work, memory_format=contiguous)
        d = v.shape[-1]
        n_g = enc.scale.shape[-1]
        scale = enc.scale.to(work)
        if self.codec in _FP8:
            scale = torch.exp2(scale - 127) * _FP8_HALF_FACTOR[self.codec]
        v = v.view(*v.shape[:-1], n_g, d // n_g).mul_(scale.unsqueeze(-1))
        if enc.zero is not None:
            v = v.add_(enc.zero.to(work).unsqueeze(-1))
        return v.view(*v.shape[:-2], d).to(dtype)


_SHIFTS2 = torch.arange(0, 8, 2, dtype=torch.int16)
_SHIFTS3 = torch.arange(0, 24, 3, dtype=torch.int32)


def _pack(u: torch.Tensor, codec: str) -> torch.Tensor:
    """Unsigned codes ``u [..., D]`` (uint8, < 2**bits) -> bytes ``[..., Dp]`` (module-doc layout)."""
    if codec == "int4":
        return u[..., 0::2] | (u[..., 1::2] << 4)
    if codec == "int2":
        g = u.unflatten(-1, (-1, 4))
        return g[..., 0] | (g[..., 1] << 2) | (g[..., 2] << 4) | (g[..., 3] << 6)
    assert codec == "int3", f"no packing for {codec}"
    g = u.to(torch.int32).unflatten(-1, (-1, 8))
    w = (g << _SHIFTS3.to(u.device)).sum(-1)  # disjoint bit fields: sum == or
    return torch.stack([w & 0xFF, (w >> 8) & 0xFF, w >> 16], -1).flatten(-2).to(torch.uint8)


# fp8 -> fp16 by moving bits, because torch's float8 -> float32 cast is ~3x slower on CPU than
# these integer ops plus a half -> float cast. e5m2 is the top byte of an fp16 (same exponent
# bias); e4m3's exponent/mantissa bits land 7 places up, which reads as value * 2**-8 (bias 7
# vs 15; subnormals map to fp16 subnormals exactly). Both are exact for every finite value.
_FP8_HALF_FACTOR = {"fp8_e5m2": 1.0, "fp8_e4m3": 256.0}


def _fp8_as_half(p: torch.Tensor, codec: str) -> torch.Tensor:
    h = p.view(torch.int8).to(torch.int16)  # sign-extended: bit 15 = sign
    if codec == "fp8_e5m2":
        return (h << 8).view(torch.float16)
    return ((h << 7) & -16385).view(torch.float16)  # clear bit 14 left by sign extension


def encode(x: torch.Tensor, fmt: KVFormat) -> Encoded:
    """Functional form of :meth:`KVFormat.encode`."""
    return fmt.encode(x)


def decode(enc: Encoded, fmt: KVFormat, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form of :meth:`KVFormat.decode`."""
    return fmt.decode(enc, dtype)


def bytes_per_token(fmt: KVFormat, heads: int, head_dim: int, span: int = 1) -> TokenBytes:
    """Functional form of :meth:`KVFormat.bytes_per_token`."""
    return fmt.bytes_per_token(heads, head_dim, span)
