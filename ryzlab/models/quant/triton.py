"""Triton kernels for int4 group-wise and ternary weight-only matmuls (GPU), dequantizing in registers.

On a GPU, decode reads every weight once per step; these kernels read the packed bytes (0.5 or
0.25 byte per weight plus scales) and expand them in registers, never writing a float copy:

* int4 (``kind=0``): a plain nibble layout ``packed [N, K / 2]`` (value ``k`` of row ``n`` in byte
  ``k // 2``, low nibble for even ``k``), ``scales`` / ``zeros`` ``[N, K / g]``:
  ``w = (q - 8) s + z`` (the same convention as :class:`~ryzlab.models.quant.linear.Int4Linear`;
  :func:`plain_int4` converts one from torch's CPU layout);
* ternary (``kind=1``): :func:`~ryzlab.models.quant.packing.pack_ternary`'s layout
  ``packed [N, K / 4]`` (value ``k`` in bits ``2 (k % 4)`` of byte ``k // 4``), ``scales [N]``:
  ``w = (code - 1) s``.

Accumulation is float32. The kernels take CUDA tensors; with ``TRITON_INTERPRET=1`` set before
triton is imported they run on CPU tensors in Triton's interpreter, which is how the tests check
them against torch (no GPU has run them in this project yet: say so beside any GPU figure).
The packed layers (:mod:`.linear`) do not call these kernels yet: they run on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["int4_linear", "ternary_linear", "plain_int4"]


@triton.jit
def _weight_only_mm(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G, stride_xm, stride_wn, stride_sn, stride_ym,
                    KIND: tl.constexpr, PER_BYTE: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K),
                    other=0.0).to(tl.float32)                                              # [BM, BK]
        wmask = (rn[None, :] < N) & (k[:, None] < K)
        byte = tl.load(w_ptr + rn[None, :] * stride_wn + (k[:, None] // PER_BYTE), mask=wmask, other=0)
        code = ((byte.to(tl.int32) >> ((k[:, None] % PER_BYTE) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        if KIND == 0:  # int4: a scale and a zero per group of G input values
            g = k[:, None] // G
            s = tl.load(s_ptr + rn[None, :] * stride_sn + g, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn[None, :] * stride_sn + g, mask=wmask, other=0.0).to(tl.float32)
            w = (code - 8.0) * s + z                                                       # [BK, BN]
        else:  # ternary: codes 0 / 1 / 2 are -1 / 0 / +1; the row scale is applied after the sum
            w = code - 1.0
        acc += tl.dot(x, w, input_precision="ieee")
    if KIND == 1:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _launch(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, kind: int,
            group: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = packed.shape[0]
    per_byte = 2 if kind == 0 else 4
    if packed.shape[1] * per_byte != k:
        raise ValueError(f"packed weight holds {packed.shape[1] * per_byte} input values per row, x has {k}")
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    block_k = 32 if kind == 1 else min(32, group)
    if kind == 0 and group % block_k:
        raise ValueError(f"group size {group} must be a multiple of {block_k}")
    grid = (triton.cdiv(m, 16), triton.cdiv(n, 32))
    _weight_only_mm[grid](x2, packed, scales, scales if zeros is None else zeros, y, m, n, k, max(group, 1),
                          x2.stride(0), packed.stride(0), scales.stride(0) if scales.dim() == 2 else 1, y.stride(0),
                          KIND=kind, PER_BYTE=per_byte, BITS=8 // per_byte, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """``x [..., K]`` times the int4 weight (plain layout, see the module docstring) -> float32 ``[..., N]``."""
    return _launch(x, packed.contiguous(), scales.contiguous(), zeros.contiguous(), 0, group_size)


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` times the ternary weight ``packed [N, K / 4]`` with row scales ``[N]`` -> float32 ``[..., N]``."""
    return _launch(x, packed.contiguous(), scales.contiguous(), None, 1, 0)


def plain_int4(layer: "object") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An :class:`~ryzlab.models.quant.linear.Int4Linear`'s weight in the kernel's plain layout:
    (packed ``[N, K / 2]`` uint8, scales ``[N, G]``, zeros ``[N, G]``), padding rows dropped."""
    from ryzlab.models.quant.packing import unpack_int4

    n = layer.out_features
    codes = unpack_int4(layer.packed, torch.arange(n))                                     # [N, K] 0..15
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    sz = layer.scales_zeros[:, :n]                                                          # [G, N, 2]
    return packed.contiguous(), sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()
