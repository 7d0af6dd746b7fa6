"""KV codecs: encode ``[..., T, H, D]`` tensors into a payload plus scales, decode them back.

Formats (``Codec``): ``none`` keeps the model dtype; ``fp8_e4m3`` / ``fp8_e5m2`` store
``torch.float8`` values of ``x / scale``; ``int8`` stores round(x / scale) in int8; ``int4``
stores two 4-bit values per ``uint8`` byte (element ``2i`` in the low nibble, ``2i+1`` high).

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

Integer codecs are symmetric by default (``q = round(x / s)``, int8 in [-127, 127], int4 in
[-7, 7], stored as the nibble ``q + 8``); ``symmetric=False`` stores a float16 minimum per
scale as well (``x = q * s + min``, int8 in [0, 255], int4 in [0, 15]) at 2 more bytes per
scale. fp8 is always symmetric (a float format gains little from an offset).

Bytes per token at head_dim 64 vs bf16 (scales included): fp8 ``token_head`` 0.508, int8
``token_head`` 0.516, int4 ``token_head`` or ``group`` 64 0.266 (asymmetric: 0.281); the
paged cache adds padding, residual rows and block tables on top (see its ``ledger``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ryzlab.config import CODECS, GRANULARITIES, Codec, Granularity, check_choice

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
_INT_MAX = {"int8": 127, "int4": 7}  # symmetric range [-qmax, qmax]
_UINT_MAX = {"int8": 255, "int4": 15}  # asymmetric range [0, umax]


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
        if self.quantized and self.granularity == "group" and head_dim % self.group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(f"group_size={self.group_size} does not divide head_dim={head_dim}; "
                             f"valid group sizes: {divisors}")
        if self.codec == "int4" and head_dim % 2:
            raise ValueError(f"int4 packs two values per byte: head_dim={head_dim} must be even")

    def packed_dim(self, head_dim: int) -> int:
        """Last payload dim: head_dim, halved for int4."""
        return head_dim // 2 if self.codec == "int4" else head_dim

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
            if self.codec == "int4":
                q = q + 8  # nibble 1..15
        else:
            umax = _UINT_MAX[self.codec]
            lo = xg.amin(dim=red, keepdim=True)
            hi = xg.amax(dim=red, keepdim=True)
            zero = lo.to(SCALE_DTYPE)
            scale = ((hi - zero.float()) / umax).clamp(_MIN_SCALE, _MAX_SCALE).to(SCALE_DTYPE)
            q = ((xg - zero.float()) / scale.float()).round().clamp(0, umax).reshape(*lead, t, h, d)
            zero = zero.squeeze(-1)
        if self.codec == "int4":
            q = q.to(torch.uint8)
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        else:
            q = q.to(self.storage_dtype)
        return Encoded(q, scale.squeeze(-1), zero)

    def unpack(self, payload: torch.Tensor) -> torch.Tensor:
        """int4 only: ``[..., D/2]`` bytes -> ``[..., D]`` integers (int8 ``q`` when symmetric,
        uint8 ``q`` otherwise), element ``2i`` from the low nibble. Layout-preserving per element,
        and fastest on a contiguous payload (do it before any permute, then decode with
        ``unpacked=True``)."""
        if self.codec != "int4":
            raise ValueError(f"unpack is for int4 payloads, not codec {self.codec!r}")
        # Both nibbles in one int16 pass: x | x << 4 puts the low nibble in byte 0 and the high
        # nibble in byte 1 (little-endian), so viewing the int16s as bytes interleaves them in
        # order. About 1.8x faster on CPU than masking, shifting and stacking two tensors.
        x = payload.to(torch.int16, memory_format=torch.contiguous_format)
        v = ((x | (x << 4)) & 0x0F0F).view(torch.uint8)
        if self.symmetric:  # stored q + 8: subtract in uint8 (wraps) and read back as int8,
            return (v - 8).view(torch.int8)  # which saves a float pass (measured ~15% on CPU)
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
        if self.codec == "int4":
            # low nibble = even element, high nibble = odd element (measured faster than a
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
