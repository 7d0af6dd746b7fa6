"""Quantization-aware training of BitNet b1.58 ternary weights (Ma et al. 2024), for ryzlab's trainer.

:class:`BitLinear` is an ``nn.Linear`` whose forward sees
* its weight as ternary: ``s = mean |w|`` of each output row (absmean), ``w_q = clamp(round(w / s), -1, 1) s``;
* its input as 8-bit: per token, ``a = max |x|``, ``x_q = clamp(round(127 x / a), -128, 127) a / 127``;
both through the straight-through estimator (the forward uses the quantized value, the gradient
flows to the float "latent" weight as if nothing were rounded). The latent weights are what the
optimizer updates and what a checkpoint stores; ``quantize_weights(model, "ternary")`` turns them
into the packed 2-bit layers with the same per-row absmean rule.

One difference from the paper, on purpose: the scale is per output row, not per tensor, so the
trained network is exactly what :class:`~ryzlab.models.quant.linear.TernaryLinear` computes (and a
tensor-parallel shard of a row-parallel layer keeps whole rows). Embeddings, the output head and
the norms stay float, as in BitNet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BitLinear", "ternary_qat"]


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward, the identity's gradient in the backward."""
    return x + (q - x).detach()


class BitLinear(nn.Linear):
    """A linear layer trained as ternary weights x 8-bit activations (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        s = w.detach().abs().mean(-1, keepdim=True).clamp_min(1e-8)                   # [N, 1] absmean
        wq = _ste(w, torch.round(w / s).clamp(-1, 1) * s)
        a = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-5)                   # [..., 1] absmax per token
        xq = _ste(x, torch.round(x * (127 / a)).clamp(-128, 127) * (a / 127))
        return F.linear(xq, wq, self.bias)


def ternary_qat(model: nn.Module) -> nn.Module:
    """Make every attention / MLP projection of ``model`` a :class:`BitLinear`, in place (same parameters)."""
    from ryzlab.models.quant.linear import PROJECTIONS

    for block in model.layers:
        for part, proj in PROJECTIONS:
            lin = getattr(getattr(block, part), proj)
            lin.__class__ = BitLinear  # same parameters and names: optimizer and checkpoints see no change
    return model
