"""Triton kernels that read and write the paged KV cache in its stored (compressed) format.

Decode attention on a GPU is bound by reading the cache; decoding pages to bf16 first and then
calling SDPA reads the compressed bytes, writes bf16 and reads bf16 again, so compression made
decode *slower*. These kernels dequantize in registers instead:

* :func:`paged_attention` (``decode.py``): attention of N query tokens (decode: one per
  sequence; prefill chunks work too, causally) over the pages of their sequences plus the
  full-precision tail rows, GQA, ragged lengths, any block size, split over the keys
  (flash-decoding) and merged in a second kernel. Returns the output and the log-sum-exp, so
  context-parallel partials merge with :func:`ryzlab.kv.merge.merge_partials`.
* :func:`write_slots` (``write.py``): quantizes new tokens into their page slots for the
  token-local granularities (``token_head``, ``group``), scales included.

Every codec of :mod:`ryzlab.kv.codecs` (none in the model dtype, fp8 e4m3/e5m2 with E8M0
scales, int8, int4 packed; symmetric or with a zero point) and every scale granularity
(token_head, group, head, tensor, channel) is read by the same kernel: a format becomes a few
compile-time constants (:func:`format_constants`) and the scale strides (0 along a dimension the
scale does not vary over).

Adding a codec (e.g. int2/int3) to the read side: a packed integer format whose width divides 8,
stored like int4 (element ``k*i + j`` in bits ``[j*b, (j+1)*b)`` of byte ``i``, symmetric values
offset by ``2**(b-1)``), is two table entries: ``CODE[name] = 4`` (packed) and ``BITS[name] = b``.
A width that does not divide 8 (int3) needs its own branch in ``decode._load_dequant`` turning
the stored bytes of element ``d`` into its integer; scales and zero points are shared code. The
write kernel packs pairs only (int4); other widths keep the torch write path
(:func:`supports_write` says False) until ``write.py`` packs them.

The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this package is
imported they run on CPU tensors in Triton's interpreter (slow; used by the tests).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ryzlab.kv.codecs import KVFormat

__all__ = ["CODE", "BITS", "available", "interpreting", "supports_write", "format_constants", "paged_attention",
           "write_slots", "unavailable_reason", "unreadable_reason"]

CODE = {"none": 0, "fp8_e4m3": 1, "fp8_e5m2": 2, "int8": 3, "int4": 4}
"""Codec -> the kernels' compile-time codec id (4: packed integers of ``BITS`` bits)."""
BITS = {"int4": 4}
"""Packed integer codecs -> bits per value."""


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` (None if they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"device {device.type!r}: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
            f"(Triton's interpreter, CPU tensors)")


def unreadable_reason(fmt: KVFormat) -> str | None:
    """Why :func:`paged_attention` cannot read pages of this format (None if it can)."""
    if fmt.codec not in CODE:
        return f"codec {fmt.codec!r} has no Triton reader (readable: {', '.join(CODE)})"
    return None


def available(device: torch.device) -> bool:
    return unavailable_reason(device) is None


def format_constants(fmt: KVFormat, head_dim: int) -> tuple[int, int, int, bool]:
    """``(codec id, bits per packed value or 0, head_dim elements per scale, has zero point)``."""
    if fmt.codec not in CODE:
        raise ValueError(f"the Triton kernels do not read codec {fmt.codec!r}; they read {', '.join(CODE)}")
    return CODE[fmt.codec], BITS.get(fmt.codec, 0), head_dim // fmt.groups(head_dim), fmt.has_zero


def supports_write(fmt: KVFormat, head_dim: int) -> bool:
    """Whether :func:`write_slots` encodes this format (token-local scales; int4 groups of even size)."""
    if not fmt.quantized or fmt.spans_tokens or fmt.codec not in CODE or BITS.get(fmt.codec, 4) != 4:
        return False
    per_scale = head_dim // fmt.groups(head_dim)
    return not (fmt.codec == "int4" and per_scale % 2)


def paged_attention(*args, **kwargs):  # noqa: D103 - documented in decode.py
    from ryzlab.kv.triton.decode import paged_attention as f
    return f(*args, **kwargs)


paged_attention.__doc__ = "See :func:`ryzlab.kv.triton.decode.paged_attention` (imports Triton on first use)."


def write_slots(*args, **kwargs):  # noqa: D103 - documented in write.py
    from ryzlab.kv.triton.write import write_slots as f
    return f(*args, **kwargs)


write_slots.__doc__ = "See :func:`ryzlab.kv.triton.write.write_slots` (imports Triton on first use)."
