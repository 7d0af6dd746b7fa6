"""W4A8 on CPU: int4 weights times int8 activations, the product in integers (``weights='int4-g32-a8'``).

torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``) keeps activations in bfloat16 and
is vectorised well for AVX-512 only: on an AVX2 CPU a SmolLM2 projection runs ~2.2x slower
(measured: 110 against 51 us, 1536 x 576, one thread, ``ATEN_CPU_CAPABILITY=avx2``), which put
single-stream decode at 0.42x llama.cpp there. llama.cpp's Q4 x Q8 path rounds each token's input
to int8 and multiplies bytes (AVX2 ``maddubs``, AVX-512 VNNI ``dpbusd``). This module does the same
for ryzlab: a small C++ kernel (``csrc/w4a8.cpp``) compiled on first use for the CPU it runs on
(``-march=native``; ``RYZLAB_W4A8_MARCH`` picks another target, e.g. ``x86-64-v3`` for AVX2 only)
and registered as the torch op ``ryzlab_w4a8::linear`` (dispatched in C++; ``torch.compile`` sees one
opaque call).

Where no compiler is available the op falls back to :func:`w4a8_reference` (the same function in
torch ops, dequantizing the weight on every call: correct and slow); it logs a warning, and the
layer's ``kernel`` says ``fallback``.

What a layer computes: ``y = dequant(W) @ (sx * xq)`` with ``w = (q - 8) s + z`` per group and
``xq = round(x * 127 / absmax(x))``, ``sx = absmax(x) / 127`` per block of 32 inputs of a token (as
llama.cpp's Q8_0 activations; one scale per token had KL 0.086 against 0.050 on SmolLM2's held-out
text, ``benchmarks/weight_formats.py``); the kernel sums the integer products exactly per block
and in float32 across blocks.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ryzlab.models.quant.packing import quantize_int4

log = logging.getLogger(__name__)

__all__ = ["native", "pack_w4a8", "unpack_w4a8", "dequantize_w4a8", "rows_w4a8", "quantize_w4a8", "TILE", "quantize_activations", "w4a8_reference",
           "w4a8_linear", "w4a8_rows", "w4a8_kernel", "BLOCK", "activations"]

BLOCK = 32
"""Inputs per packed block (``TILE`` x 16 bytes)."""
TILE = 8
"""Output rows stored interleaved, one per vector lane of the kernel (``csrc/w4a8.cpp``: a chunk of
32 bytes holds 4 inputs of each of the 8 rows, the low nibbles inputs ``4c..4c+3`` of the block,
the high ones ``16+4c..``)."""
SOURCE = Path(__file__).with_name("csrc") / "w4a8.cpp"


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0]
    pad = -n % TILE
    return t if not pad else torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def pack_w4a8(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes ``[N, K]`` (0..15), scales and zeros ``[N, G]`` -> the kernel's operands: packed
    uint8 ``[Np / 8, 4 K]`` and sz bf16 ``[Np / 8, G, 2, 8]`` (rows padded to ``Np``, a multiple of
    :data:`TILE`, with zero codes, scales and zeros: they compute 0)."""
    n, k = q.shape
    if k % BLOCK:
        raise ValueError(f"W4A8 packs blocks of {BLOCK} inputs; a row of {k} is not whole blocks")
    b = _pad_rows(q.to(torch.uint8)).reshape(-1, TILE, k // BLOCK, 2, 4, 4)            # [T, r, B, half, c, j]
    nib = (b[:, :, :, 0] | (b[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)               # [T, B, c, r, j]
    sz = _pad_rows(torch.stack([scales, zeros], dim=-1).to(torch.bfloat16))           # [Np, G, 2]
    sz = sz.reshape(-1, TILE, *sz.shape[1:]).permute(0, 2, 3, 1)                      # [T, G, 2, r]
    return nib.reshape(nib.shape[0], -1).contiguous(), sz.contiguous()


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[T, 8, K]`` of every tile."""
    t, n = packed.shape
    b = packed.reshape(t, n // (BLOCK * TILE // 2), 1, 4, TILE, 4)                      # [T, B, 1, c, r, j]
    return torch.cat((b & 15, b >> 4), dim=2).permute(0, 4, 1, 2, 3, 5).reshape(t, TILE, -1)


def unpack_w4a8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_w4a8`'s codes: uint8 ``[Np, K]``."""
    c = _codes(packed)
    return c.reshape(-1, c.shape[-1])


def _deq(codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """codes ``[R, K]``, sz ``[R, G, 2]`` -> float32 ``(q - 8) s + z``."""
    r, k = codes.shape
    g = sz.shape[1]
    return ((codes.float().reshape(r, g, k // g) - 8) * sz[..., :1].float() + sz[..., 1:].float()).reshape(r, k)


def _row_sz(sz: torch.Tensor) -> torch.Tensor:
    """sz ``[T, G, 2, 8]`` -> per row ``[Np, G, 2]``."""
    return sz.permute(0, 3, 1, 2).reshape(-1, sz.shape[1], 2)


def dequantize_w4a8(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """float32 ``[Np, K]`` (padding rows included: they are 0)."""
    return _deq(unpack_w4a8(packed), _row_sz(sz))


def rows_w4a8(packed: torch.Tensor, sz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float32 rows ``idx`` of the weight (only their tiles are unpacked)."""
    i = idx.reshape(-1).long()
    codes = _codes(packed[i // TILE])[torch.arange(i.numel()), i % TILE]             # [R, K]
    return _deq(codes, sz[i // TILE, :, :, i % TILE] if i.numel() else sz.new_zeros(0, sz.shape[1], 2))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[M, K]`` -> (int8 codes ``[M, K]``, scales ``[M, K / 32]``): absmax / 127 per block of
    :data:`BLOCK` inputs (floored at 1e-5), rounded half to even (llama.cpp's Q8_0 activations)."""
    m, k = x.shape
    xb = x.reshape(m, k // BLOCK, BLOCK)
    a = xb.abs().amax(-1, keepdim=True).clamp_min(1e-5)
    # 127 / a as a true division, as the kernel does (python's ``127 / a`` is ``a.reciprocal() * 127``
    # in torch, one rounding more: ~25% of scales differ in the last bit, and a value near a rounding
    # boundary then rounds the other way)
    inv = torch.full_like(a, 127.0) / a
    xq = torch.round(xb * inv).clamp_(-127, 127).to(torch.int8)
    return xq.reshape(m, k), (a / 127).squeeze(-1)


def activations(xq: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    """The float32 activations the kernel multiplies by: codes x their block's scale."""
    m, k = xq.shape
    return (xq.float().reshape(m, -1, BLOCK) * sx[..., None]).reshape(m, k)


def w4a8_reference(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel computes, in torch ops (the tests' reference and the no-compiler fallback)."""
    return activations(*quantize_activations(x.float())) @ dequantize_w4a8(packed, sz).t()


def quantize_w4a8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[N, K]`` -> (packed, sz) of :func:`pack_w4a8`: the same codes, scales and zeros as
    torch's int4 path (:func:`quantize_int4`, bf16 scales), in the kernel's layout."""
    q, s, z = quantize_int4(w, group_size, torch.bfloat16)
    return pack_w4a8(q, s, z)


def _march() -> str:
    """The compiler's target: ``-march=`` this (``RYZLAB_W4A8_MARCH``, default ``native``)."""
    return f"-march={os.environ.get('RYZLAB_W4A8_MARCH') or 'native'}"


@functools.lru_cache(maxsize=1)
def _extension() -> Any | None:
    """The compiled kernel module, or None (no compiler / the build failed: logged, fallback)."""
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - torch always has it
        log.warning("W4A8: torch.utils.cpp_extension unavailable (%s); using the torch fallback (slow)", e)
        return None
    src = SOURCE.read_text()
    march = _march()
    key = hashlib.sha256(f"{src}|{march}|{torch.__version__}".encode()).hexdigest()[:12]
    build = Path(os.environ.get("RYZLAB_EXT_DIR", Path.home() / ".cache" / "ryzlab" / "extensions")) / f"w4a8_{key}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        mod = cpp_extension.load(name=f"ryzlab_w4a8_{key}", sources=[str(SOURCE)], build_directory=str(build),
                                 extra_cflags=["-O3", march, "-fopenmp"], extra_ldflags=["-fopenmp"],
                                 verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: fall back, and say so
        log.warning("W4A8: could not build the C++ kernel (%s: %s); using the torch fallback (slow: it "
                    "dequantizes the weight on every call)", type(e).__name__, str(e).splitlines()[-1:] or "")
        return None
    torch.library.register_fake("ryzlab_w4a8::linear")(_fake_linear)   # shapes for torch.compile
    torch.library.register_fake("ryzlab_w4a8::rows")(_fake_rows)
    log.info("W4A8: C++ kernel built with %s (%s inner loop) in %s", march, mod.w4a8_isa(), build)
    return mod


def w4a8_kernel() -> str:
    """Which implementation :func:`w4a8_linear` runs here (reports and ``PackedLinear.kernel``)."""
    ext = _extension()
    if ext is None:
        return "W4A8 torch fallback (dequantize per call; no C++ kernel)"
    return f"ryzlab_w4a8::linear C++ ({ext.w4a8_isa()}, {_march()})"


def native() -> bool:
    """Whether the C++ kernel is built and loaded here (building it on the first call)."""
    return _extension() is not None


def w4a8_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int,
                use_native: bool | None = None) -> torch.Tensor:
    """float32 ``[M, K]`` -> float32 ``[M, N]``: the W4A8 product through the C++ op or the torch
    fallback. ``use_native``: None asks :func:`native` (building the kernel on first use); layers pass
    the answer they got when built, so a compiled forward never calls into the build machinery."""
    if use_native is None:
        use_native = native()
    if not use_native:
        return w4a8_reference(x, packed, sz, group)
    return torch.ops.ryzlab_w4a8.linear(x, packed, sz, group)


def _fake_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * TILE, dtype=torch.float32)


def _fake_rows(packed: torch.Tensor, sz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return packed.new_empty(idx.numel(), packed.shape[1] * 2 // TILE, dtype=torch.float32)


def w4a8_rows(packed: torch.Tensor, sz: torch.Tensor, idx: torch.Tensor, use_native: bool | None = None
              ) -> torch.Tensor:
    """Rows ``idx`` of the weight, float32 ``[len(idx), K]`` (embedding lookups): the C++ op
    ``ryzlab_w4a8::rows`` (~0.3 ms a decode step less than the torch ops on SmolLM2), else the torch
    ops behind an opaque op. Both are opaque to inductor: fusing this gather of nibbles into the
    next kernel crashed under its AVX2 code generation (``ATEN_CPU_CAPABILITY=avx2``, torch 2.13: a
    segmentation fault in the fused kernel)."""
    if use_native is None:
        use_native = native()
    if not use_native:
        return _rows_op(packed, sz, idx)
    return torch.ops.ryzlab_w4a8.rows(packed, sz, idx.long())


@torch.library.custom_op("ryzlab::w4a8_rows", mutates_args=())
def _rows_op(packed: torch.Tensor, sz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return rows_w4a8(packed, sz, idx)


_rows_op.register_fake(_fake_rows)
