"""GGUF Q8_0 / Q4_0 / Q4_1 tensors straight into packed layers, without a float round trip.

llama.cpp's blocks hold 32 values of one row (``ggml-common.h``):

* ``Q8_0``: fp16 ``d`` + 32 int8 ``q``;                 ``w = d q``          -> :class:`Int8Linear`, a scale per 32
* ``Q4_0``: fp16 ``d`` + 16 bytes of nibbles;            ``w = d (q - 8)``    -> :class:`Int4Linear`, zero 0
* ``Q4_1``: fp16 ``d``, fp16 ``m`` + 16 bytes of nibbles; ``w = d q + m``     -> :class:`Int4Linear`, zero ``m + 8 d``

(nibble ``j`` of a block: low half of byte ``j`` for values 0-15, high half for 16-31). torch's
int4 kernel computes ``(q - 8) s + z``, so Q4_1 becomes ``s = d``, ``z = m + 8 d``: the same
weights up to the rounding of ``z`` to the scale dtype (exact enough in float32 to match the
dequantized path to float rounding; bfloat16 scales round ``d`` and ``z`` to 8 bits).

Rows are read a chunk at a time (multiples of 64 rows, ~4 M values), so the only transient copies
are one chunk's raw bytes and codes. A tensor-parallel rank reads only its rows (column-parallel)
or every row and keeps whole blocks of its columns (row-parallel; :func:`check_weight_format`
refuses a shard that does not start on a block). Other tensor types (F32, K-quants, ...) are left
to the float path.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ryzlab.models.quant.formats import INT4_ROW_BLOCK, WeightFormat
from ryzlab.models.quant.linear import Int4Linear, Int8Linear, PackedEmbedding, PackedLinear
from ryzlab.models.quant.packing import int4_padded_rows

log = logging.getLogger(__name__)

__all__ = ["NATIVE_TYPES", "read_packed", "load_native"]

NATIVE_TYPES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
"""ggml types kept packed -> bytes per block of 32 values."""
_BLOCK = 32
_CHUNK_VALUES = 1 << 20


def _raw_rows(path: Any, t: Any, rows: list[int] | range) -> np.ndarray:
    """Raw bytes of the given rows of 2-D tensor ``t`` -> uint8 ``[len(rows), row_bytes]`` (runs read at once)."""
    n_rows = t.shape[0]
    row_bytes = t.nbytes // n_rows
    out = np.empty((len(rows), row_bytes), dtype=np.uint8)
    rows = list(rows)
    with open(path, "rb") as f:
        i = 0
        while i < len(rows):
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                j += 1
            f.seek(t.offset + rows[i] * row_bytes)
            view = memoryview(out[i:j + 1]).cast("B")
            if f.readinto(view) != len(view):
                raise ValueError(f"{path}: file is truncated (tensor data past its end)")
            i = j + 1
    return out


def _decode(raw: np.ndarray, qtype: str, cols: slice) -> tuple[torch.Tensor, ...]:
    """Raw rows ``[R, nb * bytes]`` -> (codes, d[, m]) for the blocks in ``cols`` (block indices)."""
    r = raw.shape[0]
    blocks = torch.from_numpy(raw).view(r, -1, NATIVE_TYPES[qtype])[:, cols]           # [R, nb, B]
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0]                         # [R, nb]
    if qtype == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).reshape(r, -1), d
    start = 4 if qtype == "Q4_1" else 2
    qs = blocks[..., start:]                                                              # [R, nb, 16]
    codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(r, -1)                          # [R, K] 0..15
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0] if qtype == "Q4_1" else None
    return (codes, d) if m is None else (codes, d, m)


def read_packed(path: Any, t: Any, rows: list[int], col_blocks: slice, compute: torch.dtype,
                unpermute_head_dim: int = 0) -> PackedLinear:
    """A packed layer of tensor ``t``'s ``rows`` (file order) and blocks ``col_blocks`` of each row.

    ``unpermute_head_dim``: undo llama.cpp's per-head Q/K row permutation (``rows`` are whole heads).
    """
    from ryzlab.models.gguf import _unpermute

    qtype = t.qtype.name
    n = len(rows)
    k = len(range(*col_blocks.indices(t.shape[1] // _BLOCK))) * _BLOCK
    order = torch.arange(n)
    if unpermute_head_dim:  # row i of the result is file row rows[perm[i]]
        order = _unpermute(order, unpermute_head_dim)
    step = max(INT4_ROW_BLOCK, _CHUNK_VALUES // max(k, 1) // INT4_ROW_BLOCK * INT4_ROW_BLOCK)
    if qtype == "Q8_0":
        q = torch.empty(k // _BLOCK, n, _BLOCK, dtype=torch.int8)                   # Int8Linear's grouped layout
        s = torch.empty(k // _BLOCK, n, dtype=compute)
        for a in range(0, n, step):
            sel = order[a:a + step]
            codes, d = _decode(_raw_rows(path, t, [rows[i] for i in sel.tolist()]), qtype, col_blocks)
            q[:, a:a + len(sel)] = codes.view(len(sel), -1, _BLOCK).transpose(0, 1)
            s[:, a:a + len(sel)] = d.t().to(compute)
        return Int8Linear(q, s)
    npad = int4_padded_rows(n)
    packed = torch.empty(npad, k // 2, dtype=torch.uint8)
    sz = torch.zeros(k // _BLOCK, npad, 2, dtype=compute)
    for a in range(0, npad, step):
        sel = order[a:min(n, a + step)]
        parts = _decode(_raw_rows(path, t, [rows[i] for i in sel.tolist()]), qtype, col_blocks)
        codes, d = parts[0].to(torch.int32), parts[1].float()
        zero = parts[2].float() + 8 * d if len(parts) == 3 else torch.zeros_like(d)
        rows_here = min(step, npad - a)
        if codes.shape[0] < rows_here:  # the padded tail: zero codes, zero scale
            codes = torch.cat([codes, torch.zeros(rows_here - codes.shape[0], k, dtype=torch.int32)])
        packed[a:a + rows_here] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        sz[:, a:a + len(sel), 0] = d.t().to(compute)
        sz[:, a:a + len(sel), 1] = zero.t().to(compute)
    return Int4Linear(packed, sz, n, _BLOCK)


def load_native(model: Any, ckpt: Any, to_file: Any, shard_spec: Any, layout: Any, fmt: WeightFormat,
                dtype: torch.dtype) -> set[str]:
    """Fill ``model``'s (a meta skeleton, after ``apply_tp``) projections and tables stored as
    :data:`NATIVE_TYPES` from GGUF ``ckpt``; returns the parameter names it filled (the caller
    loads the rest, and the biases, through the float path)."""
    from ryzlab.models.quant.linear import PROJECTIONS

    cfg = model.config
    done: set[str] = set()

    def packed(name: str) -> PackedLinear | None:
        fname = to_file(name)
        t = ckpt.tensors[fname]
        if t.qtype.name not in NATIVE_TYPES:
            return None
        spec = shard_spec(name, cfg, layout)
        rows: list[int] = list(range(t.shape[0]))
        blocks = slice(0, t.shape[1] // _BLOCK)
        if spec is not None and spec[0] == 0:
            rows = spec[1].tolist()
        elif spec is not None:  # row-parallel: contiguous columns starting on a block (checked before loading)
            a, b = int(spec[1][0]), int(spec[1][-1]) + 1
            blocks = slice(a // _BLOCK, b // _BLOCK)
        perm = cfg.head_dim if (".attn_q." in fname or ".attn_k." in fname) else 0
        done.add(name)
        return read_packed(ckpt.path, t, rows, blocks, fmt.compute_dtype, perm)

    for i, block in enumerate(model.layers):
        for part, proj in PROJECTIONS:
            owner = getattr(block, part)
            lin = packed(f"layers.{i}.{part}.{proj}.weight")
            if lin is None:
                continue
            old = getattr(owner, proj)
            lin.reduce = getattr(old, "tp_reduce", None)
            if old.bias is not None:  # a placeholder of the rank's shape: the float path reads it by name
                lin.bias = torch.nn.Parameter(torch.empty(old.bias.shape, device="meta"), requires_grad=False)
            setattr(owner, proj, lin)
    table = packed("tok_embeddings.weight")
    if table is not None:
        model.tok_embeddings = PackedEmbedding(table, dtype)
    head = table if cfg.tie_embeddings else packed("output.weight")
    if head is not None:
        model.output = head
    model.weight_format = fmt
    log.info("GGUF native: %d tensors kept packed (%s)", len(done),
             sorted({m.kernel for m in model.modules() if isinstance(m, PackedLinear)}))
    return done
