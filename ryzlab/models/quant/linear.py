"""Linear layers and embeddings over packed weights, and :func:`quantize_weights` (applied like ``apply_tp``).

Each layer computes ``x @ W^T`` through the fastest CPU kernel torch 2.13 has for its format and
says which in ``kernel``:

* int8: ``aten._weight_int8pack_mm`` (per-row scales; a grouped int8 weight, GGUF Q8_0, sums
  one call per group of 32 input values);
* int4: ``aten._weight_int4pack_mm_for_cpu`` (torch's tinygemm layout, scale and zero per group);
  ``int4-g<N>-a8`` (W4A8): ryzlab's C++ kernel ``ryzlab::w4a8_linear`` (:mod:`ryzlab.models.quant.w4a8`),
  each token's input rounded to int8 with an absmax scale per block of 32, integer dot products per block;
* ternary: the 2-bit codes are unpacked to int8 on every call, then ``aten._weight_int8pack_mm``
  with the per-row absmean scale (no packed-ternary kernel exists in torch; the weight at rest is
  2 bits per value, the transient int8 copy is one layer at a time); ``ternary-a8`` (W1.58A8)
  first rounds each token's input to int8 (absmax / 127, computed in float32 as in training) and
  multiplies integers exactly with ``aten._int_mm`` (int32 sums), then applies both scales;
* bf16: ``aten.linear`` in bfloat16.

The int8 / int4 kernels are vectorised for bfloat16 activations on CPU (measured: float32
activations are 5-30x slower), so by default activations are rounded to bfloat16 at the kernel's
input and the output is returned in the model's dtype (``WeightFormat.compute``). Both kernels cost
one GEMV per input row, so from :data:`DENSE_ROWS` rows (a prefill chunk) int8 / int4 layers unpack
the weight to bfloat16 for that call and run one dense GEMM instead (within bf16 rounding of the
kernel, whose output is bfloat16 too); the weight at rest stays packed.

Row-parallel layers (tensor parallelism) keep their all-reduce: :func:`ryzlab.parallel.apply_tp`
leaves ``tp_reduce`` on them, and the packed layer reduces its partial product before the bias.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ryzlab.models.quant import w4a8
from ryzlab.models.quant.formats import WeightFormat, check_weight_format, parse_weight_format
from ryzlab.models.quant.packing import (dequantize_int4, dequantize_int4_all, dequantize_int8, pack_int4, pack_ternary,
                                         quantize_int4,
                                         quantize_int8, quantize_ternary, unpack_int4, unpack_ternary)

log = logging.getLogger(__name__)

__all__ = ["DENSE_ROWS", "PackedLinear", "Int8Linear", "Int4Linear", "Int4A8Linear", "concat_int4", "TernaryLinear", "Bf16Linear", "PackedEmbedding",
           "quantize_weights", "PROJECTIONS"]

DENSE_ROWS = 128
"""Input rows (tokens) from which :class:`Int4Linear` and :class:`Int8Linear` unpack their weight to
bf16 and run one dense GEMM instead of torch's int4 / int8 kernel, whose cost grows as one GEMV per row. Measured on this CPU
(1536 x 576, int4-g32): at 512 rows the kernel takes 6.1 ms (2 threads) against 0.7 ms unpacking
+ 2.3 ms GEMM; at 64 rows the kernel still wins (0.7 ms against ~1.0 ms)."""

PROJECTIONS = (("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
               ("feed_forward", "w1"), ("feed_forward", "w3"), ("feed_forward", "w2"))


class PackedLinear(nn.Module):
    """Shared plumbing: float bias, optional tp all-reduce, ``kernel`` name, logical shape."""

    kernel = ""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, compute: torch.dtype,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.out_features, self.in_features, self.compute = out_features, in_features, compute
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.reduce = reduce

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] compute dtype -> [M, N]
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight this layer multiplies by, float32 ``[N, K]`` (tests, the dequantized reference)."""
        raise NotImplementedError

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the weight, float32 ``[len(idx), K]`` (embedding lookups)."""
        return self.dequantize()[idx.reshape(-1)]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's input from ``x`` [M, K] (default: rounded to the compute dtype)."""
        return x.to(self.compute).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(self.prepare(x.reshape(-1, shape[-1])))
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.reduce is not None:
            y = self.reduce(y.contiguous())
        return y if self.bias is None else y + self.bias

    def scales_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel}"


class Int8Linear(PackedLinear):
    """int8 weight ``[N, K]`` with a scale per row (``group_size`` 0) or per group of input values."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                 reduce: Any = None):
        """``qweight`` int8 ``[N, K]`` with ``scales [N, G]``, or already grouped: ``[G, N, g]`` with ``[G, N]``."""
        if qweight.dim() == 3:  # grouped layout given (GGUF reader: no transposed copy of a large table)
            groups, n, g = qweight.shape
            k = groups * g
        else:
            n, k = qweight.shape
            groups = scales.shape[1]
        super().__init__(n, k, bias, scales.dtype, reduce)
        self.group_size = 0 if groups == 1 else k // groups
        if groups == 1:
            self.register_buffer("qweight", qweight.reshape(n, k).contiguous())      # [N, K]
            self.register_buffer("scales", scales.reshape(n).contiguous())           # [N]
            self.kernel = "aten._weight_int8pack_mm"
        elif qweight.dim() == 3:
            self.register_buffer("qweight", qweight.contiguous())                    # [G, N, g]
            self.register_buffer("scales", scales.contiguous())                      # [G, N]
        else:  # one [N, g] slab per group: each is a per-row-scaled int8 matmul of its g inputs
            g = self.group_size
            self.register_buffer("qweight", qweight.reshape(n, groups, g).transpose(0, 1).contiguous())  # [G, N, g]
            self.register_buffer("scales", scales.t().contiguous())                 # [G, N]
        if groups > 1:
            self.kernel = f"aten._weight_int8pack_mm x{groups} groups"

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat, group_size: int = 0,
                   reduce: Any = None) -> "Int8Linear":
        q, s = quantize_int8(w, group_size, fmt.compute_dtype)
        return cls(q, s, bias, reduce=reduce)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_ROWS and x.dtype == torch.bfloat16:
            # as Int4Linear: torch's int8 kernel also costs a GEMV per row (1536 x 576, 1 thread: 13.1 ms
            # at 512 rows against 4.9 ms for scaling the codes to bf16 and one GEMM)
            return F.linear(x, self.dequantize().to(torch.bfloat16))
        if self.group_size == 0:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        g = self.group_size
        out = None
        for i in range(self.qweight.shape[0]):
            part = torch.ops.aten._weight_int8pack_mm(x[:, i * g:(i + 1) * g].contiguous(), self.qweight[i],
                                                      self.scales[i])
            out = part.float() if out is None else out.add_(part.float())
        return out

    def _codes_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.group_size == 0:
            return self.qweight, self.scales[:, None]
        return self.qweight.transpose(0, 1).reshape(self.out_features, -1), self.scales.t()

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(*self._codes_scales())

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.reshape(-1)
        if self.group_size == 0:
            return self.qweight[idx].float() * self.scales[idx].float()[:, None]
        q = self.qweight[:, idx].transpose(0, 1)                                     # [R, G, g]
        return (q.float() * self.scales[:, idx].t().float()[..., None]).reshape(len(idx), -1)


class Int4Linear(PackedLinear):
    """int4 codes in torch's CPU tinygemm layout, a bfloat16 / float32 scale and zero per group."""

    kernel = "aten._weight_int4pack_mm_for_cpu"

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, group_size: int,
                 bias: torch.Tensor | None = None, *, reduce: Any = None):
        super().__init__(out_features, packed.shape[1] * 2, bias, scales_zeros.dtype, reduce)
        self.group_size = group_size
        self.register_buffer("packed", packed)                                       # [Np, K/2] uint8
        self.register_buffer("scales_zeros", scales_zeros)                           # [G, Np, 2]

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, reduce: Any = None) -> "Int4Linear":
        packed, sz = pack_int4(q, scales, zeros)
        return cls(packed, sz, q.shape[0], group_size, bias, reduce=reduce)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat, reduce: Any = None
                   ) -> "Int4Linear":
        q, s, z = quantize_int4(w, fmt.group_size, fmt.compute_dtype)
        return cls.from_codes(q, s, z, fmt.group_size, bias, reduce)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_ROWS and x.dtype == torch.bfloat16:
            # many rows (a prefill chunk): torch's int4 kernel costs a GEMV per row, so unpack the
            # weight to bf16 once and run one bf16 GEMM (2.6x faster at 512 rows, 2 threads). The
            # kernel's output is bf16 too: both are within bf16 rounding of the exact product
            return F.linear(x, dequantize_int4_all(self.packed, self.scales_zeros, torch.bfloat16)[:self.out_features])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_all(self.packed, self.scales_zeros)[:self.out_features]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.packed, idx), self.scales_zeros, idx)


class Int4A8Linear(PackedLinear):
    """int4 codes with a bf16 scale and zero per group (:func:`~ryzlab.models.quant.w4a8.pack_w4a8`
    layout: tiles of 8 rows), times 8-bit activations (W4A8): ``y = dequant(W) @ (sx * round(x / sx))``,
    ``sx = absmax(x) / 127`` per block of 32 inputs of a token, through ``ryzlab_w4a8::linear`` (C++; a logged torch
    fallback where it cannot be built)."""

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, out_features: int, group_size: int,
                 bias: torch.Tensor | None = None, *, reduce: Any = None):
        super().__init__(out_features, packed.shape[1] * 2 // w4a8.TILE, bias, torch.bfloat16, reduce)
        self.group_size = group_size
        self.register_buffer("packed", packed.contiguous())                           # [Np/8, 4K] uint8
        self.register_buffer("sz", sz.contiguous())                                   # [Np/8, G, 2, 8] bf16
        self.native = w4a8.native()   # asked here, not in forward (a compiled graph reads it as a constant)

    @property
    def kernel(self) -> str:  # type: ignore[override]
        return w4a8.w4a8_kernel()

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat, reduce: Any = None
                   ) -> "Int4A8Linear":
        packed, sz = w4a8.quantize_w4a8(w, fmt.group_size)
        return cls(packed, sz, w.shape[0], fmt.group_size, bias, reduce=reduce)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().contiguous()   # rounded to int8 inside the kernel, from float32

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = w4a8.w4a8_linear(x, self.packed, self.sz, self.group_size, self.native)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]

    def dequantize(self) -> torch.Tensor:
        return w4a8.dequantize_w4a8(self.packed, self.sz)[:self.out_features]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return w4a8.w4a8_rows(self.packed, self.sz, idx, self.native)


def concat_int4(parts: list[nn.Module]) -> tuple[PackedLinear, list[int]] | None:
    """One :class:`Int4Linear` (or :class:`Int4A8Linear`) computing ``parts``' outputs side by side
    (the q / k / v or the gate / up projections of a layer, which read the same input) -> (it, where
    each part's outputs start), or None where they cannot share a call (not all the same int4 layer,
    other group sizes or inputs, a bias, a tp reduce).

    At batch 1 the kernel's fixed cost per call is ~4 us of a 10-50 us GEMV (SmolLM2 on a CPU
    core), so three calls into one saves that twice per projection group. Each part keeps its
    rows padded to whole blocks of its layout (64 rows for torch's, tiles of 8 for W4A8: both
    concatenate block by block), and its buffers become views of the fused ones: the weights are
    held once.
    """
    kinds = {type(m) for m in parts}
    if len(parts) < 2 or len(kinds) != 1 or not kinds <= {Int4Linear, Int4A8Linear}:
        return None
    cls = kinds.pop()
    # where each layout keeps its scales, along which dim they follow the rows, rows per packed row
    name, dim, unit = ("scales_zeros", 1, 1) if cls is Int4Linear else ("sz", 0, w4a8.TILE)
    first = parts[0]
    if any(m.bias is not None or m.reduce is not None or m.group_size != first.group_size
           or m.in_features != first.in_features or m.compute != first.compute
           or getattr(m, name).dtype != getattr(first, name).dtype for m in parts):
        return None
    packed = torch.cat([m.packed for m in parts])
    sz = torch.cat([getattr(m, name) for m in parts], dim=dim)
    fused = cls(packed, sz, packed.shape[0] * unit, first.group_size)
    starts, row = [], 0
    for m in parts:
        n = m.packed.shape[0]
        m.packed = packed[row:row + n]
        setattr(m, name, sz.narrow(dim, row, n))
        starts.append(row * unit)
        row += n
    return fused, starts


class TernaryLinear(PackedLinear):
    """Ternary {-1, 0, 1} codes packed 4 per byte, one absmean scale per output row."""

    kernel = "unpack 2-bit + aten._weight_int8pack_mm"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                 reduce: Any = None, act_bits: int = 0):
        """``act_bits=8``: BitNet b1.58's 8-bit absmax activations (W1.58A8), integer matmul."""
        super().__init__(packed.shape[0], packed.shape[1] * 4, bias, scales.dtype, reduce)
        if act_bits not in (0, 8):
            raise ValueError(f"act_bits={act_bits}: 0 (activations in {scales.dtype}) or 8 (absmax int8)")
        self.act_bits = act_bits
        if act_bits:
            self.kernel = "absmax int8 activations + unpack 2-bit + aten._int_mm"
        self.register_buffer("packed", packed.contiguous())                          # [N, K/4] uint8
        self.register_buffer("scales", scales.contiguous())                          # [N]

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat, reduce: Any = None
                   ) -> "TernaryLinear":
        q, s = quantize_ternary(w, fmt.compute_dtype)
        return cls(pack_ternary(q), s, bias, reduce=reduce, act_bits=fmt.act_bits)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_bits:
            return super().prepare(x)
        return x.float().contiguous()   # quantized in float32 in matmul, as the QAT forward (BitLinear) does

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            a = x.abs().amax(-1, keepdim=True).clamp_min(1e-5)                       # [M, 1] absmax per token
            xq = torch.round(x * (127 / a)).clamp(-128, 127).to(torch.int8)
            acc = torch._int_mm(xq, unpack_ternary(self.packed).t().contiguous())    # [M, N] int32, exact
            return acc.float() * (a / 127) * self.scales.float()
        return torch.ops.aten._weight_int8pack_mm(x, unpack_ternary(self.packed), self.scales)

    def dequantize(self) -> torch.Tensor:
        return unpack_ternary(self.packed).float() * self.scales.float()[:, None]


class Bf16Linear(PackedLinear):
    """The weight stored in bfloat16; the matmul runs in bfloat16."""

    kernel = "aten.linear bf16"

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None, *, reduce: Any = None):
        super().__init__(w.shape[0], w.shape[1], bias, torch.bfloat16, reduce)
        self.register_buffer("weight_bf16", w.detach().to(torch.bfloat16).contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_bf16)

    def dequantize(self) -> torch.Tensor:
        return self.weight_bf16.float()

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_bf16[idx.reshape(-1)].float()


class PackedEmbedding(nn.Module):
    """Token embeddings read from a packed ``[V, dim]`` matrix (shared with the output head when tied)."""

    def __init__(self, table: PackedLinear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype

    @property
    def kernel(self) -> str:
        return f"row gather + dequantize ({type(self.table).__name__})"

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the activation dtype: callers read ``model.tok_embeddings.weight.dtype``
        (KV caches, reports) to learn the model's dtype; the packed rows live in ``table``."""
        return torch.empty(0, dtype=self.dtype, device=self.table.scales_device())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens).to(self.dtype).reshape(*tokens.shape, -1)


def _pack(w: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat, reduce: Any) -> PackedLinear:
    if fmt.kind == "int8":
        return Int8Linear.from_float(w, bias, fmt, fmt.group_size, reduce=reduce)
    if fmt.kind == "int4":
        return (Int4A8Linear if fmt.act_bits else Int4Linear).from_float(w, bias, fmt, reduce=reduce)
    if fmt.kind == "ternary":
        return TernaryLinear.from_float(w, bias, fmt, reduce=reduce)
    if fmt.kind == "bf16":
        return Bf16Linear(w, bias, reduce=reduce)
    raise ValueError(f"weights={fmt.name}: {fmt.kind!r} is not a post-training format (gguf weights come from a "
                     f"GGUF file through load_model)")


def _table_format(fmt: WeightFormat) -> WeightFormat:
    """Embeddings / output head: the same format, except ternary (BitNet keeps them in bf16)."""
    return WeightFormat(kind="bf16") if fmt.kind == "ternary" else fmt


@torch.no_grad()
def quantize_weights(model: nn.Module, fmt: WeightFormat | str) -> nn.Module:
    """Replace ``model``'s projections, embeddings and output head by packed layers of ``fmt``, in place.

    Applied after the model is built (and after :func:`ryzlab.parallel.apply_tp`: each rank
    quantizes only the shard it holds). The format is checked against the model's shapes at its
    tp size first (:func:`check_weight_format`). Sets ``model.weight_format``; returns the model.
    """
    fmt = parse_weight_format(fmt)
    cfg = model.config
    layout = getattr(model, "tp_layout", None)
    check_weight_format(cfg, fmt, 1 if layout is None else layout.tp)
    model.weight_format = fmt
    if not fmt.quantized:
        return model
    dtype = model.tok_embeddings.weight.dtype
    if model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError(f"weights={fmt.name}: packed weight kernels run on CPU in this version (the model is on "
                         f"{model.tok_embeddings.weight.device}); use weights=float32 there")
    for block in model.layers:
        for part, proj in PROJECTIONS:
            owner = getattr(block, part)
            lin = getattr(owner, proj)
            setattr(owner, proj, _pack(lin.weight, lin.bias, fmt, getattr(lin, "tp_reduce", None)))
    tied = model.output.weight is model.tok_embeddings.weight
    tfmt = _table_format(fmt)
    head = _pack(model.output.weight, None, tfmt, None)
    table = head if tied else _pack(model.tok_embeddings.weight, None, tfmt, None)
    model.output = head
    model.tok_embeddings = PackedEmbedding(table, dtype)
    log.info("quantize_weights: %s, kernels %s", fmt.name, sorted({m.kernel for m in model.modules()
                                                                    if isinstance(m, PackedLinear)}))
    return model
