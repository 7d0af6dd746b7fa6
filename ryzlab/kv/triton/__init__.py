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

Adding a codec (e.g. int2/int3): give it a code in ``CODE``, a branch in
``decode._load_dequant`` that turns the stored bytes of element ``d`` into its integer (int4
reads byte ``d // 2`` and shifts by ``4 * (d % 2)``; int2 would read ``d // 4`` and shift by
``2 * (d % 4)``; a 3-bit layout needs its own offset rule) and its zero offset; the scale and
zero-point handling is shared.

The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this package is
imported they run on CPU tensors in Triton's interpreter (slow; used by the tests).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ryzlab.kv.codecs import KVFormat

__all__ = ["CODE", "available", "interpreting", "supports_write", "format_constants", "paged_attention",
           "write_slots", "unavailable_reason"]

CODE = {"none": 0, "fp8_e4m3": 1, "fp8_e5m2": 2, "int8": 3, "int4": 4}
"""Codec -> the kernels' compile-time codec id."""


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


def available(device: torch.device) -> bool:
    return unavailable_reason(device) is None


def format_constants(fmt: KVFormat, head_dim: int) -> tuple[int, int, bool]:
    """``(codec id, head_dim elements per scale, has zero point)`` of a format."""
    if fmt.codec not in CODE:
        raise ValueError(f"the Triton kernels do not read codec {fmt.codec!r}; they read {', '.join(CODE)}")
    return CODE[fmt.codec], head_dim // fmt.groups(head_dim), fmt.has_zero


def supports_write(fmt: KVFormat, head_dim: int) -> bool:
    """Whether :func:`write_slots` encodes this format (token-local scales; int4 groups of even size)."""
    if not fmt.quantized or fmt.spans_tokens or fmt.codec not in CODE:
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
