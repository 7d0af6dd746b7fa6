"""Triton int4 / ternary weight-only kernels against torch (Triton's interpreter on CPU, compiled on CUDA)."""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from ryzlab.models.quant.formats import parse_weight_format  # noqa: E402
from ryzlab.models.quant.linear import _pack  # noqa: E402
from ryzlab.models.quant.triton import int4_linear, plain_int4, ternary_linear  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")


def _w(n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=g) * 0.1 + 0.05 * torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_kernel_equals_the_dequantized_weight(group):
    layer = _pack(_w(40, 128), None, parse_weight_format(f"int4-g{group}-f32"), None)  # 40 rows: a partial tile
    packed, s, z = plain_int4(layer)
    assert packed.shape == (40, 64) and s.shape == z.shape == (40, 128 // group)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    want = x @ layer.dequantize().T
    got = int4_linear(x.to(DEV), packed.to(DEV), s.to(DEV), z.to(DEV), group).cpu()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ternary_kernel_equals_the_dequantized_weight():
    layer = _pack(_w(40, 96), None, parse_weight_format("ternary-f32"), None)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2))
    want = x @ layer.dequantize().T
    got = ternary_linear(x.to(DEV), layer.packed.to(DEV), layer.scales.to(DEV)).cpu()
    assert got.shape == (2, 5, 40) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
