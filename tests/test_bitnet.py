"""BitNet b1.58 QAT (ryzlab.models.quant.qat) and the shipped ternary checkpoint."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ryzlab.models.quant import TernaryLinear, quantize_weights, weight_ledger
from ryzlab.models.quant.linear import _pack
from ryzlab.models.quant.formats import parse_weight_format
from ryzlab.models.quant.qat import BitLinear
from ryzlab.models.train import BITNET_CHECKPOINT

torch.set_num_threads(1)


def test_bitlinear_forward_is_ternary_weights_times_8bit_inputs_with_straight_through_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    lin.__class__ = BitLinear
    x = torch.randn(5, 64, requires_grad=True)
    y = lin(x)
    s = lin.weight.abs().mean(-1, keepdim=True)
    wq = torch.round(lin.weight / s).clamp(-1, 1) * s
    a = x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * 127 / a).clamp(-128, 127) * a / 127
    assert torch.allclose(y, F.linear(xq, wq, lin.bias), atol=1e-5)
    y.sum().backward()   # straight through: the gradient of a plain linear at the quantized operands
    assert torch.allclose(lin.weight.grad, torch.ones(5, 32).T @ xq.detach(), atol=1e-4)
    assert torch.allclose(x.grad, torch.ones(5, 32) @ wq.detach(), atol=1e-5)
    # the packed inference layer holds exactly the trained ternary weights (float32 scales)
    packed = _pack(lin.weight.detach(), lin.bias.detach(), parse_weight_format("ternary-f32"), None)
    assert isinstance(packed, TernaryLinear)
    assert torch.allclose(packed.dequantize(), wq.detach(), rtol=1e-6, atol=1e-7)


def test_shipped_bitnet_checkpoint_is_reproduced_packed():
    from ryzlab.models import load_model
    from ryzlab.models.corpus import stdlib_corpus
    from ryzlab.models.train import evaluate_perplexity

    meta = json.loads(BITNET_CHECKPOINT.with_suffix(".json").read_text())
    model, _ = load_model(str(BITNET_CHECKPOINT), weights="ternary")
    led = weight_ledger(model)
    assert led["linears"] == meta["weight_bytes_linears"] and led["total"] == meta["weight_bytes"]
    payload = sum(m.packed.numel() for m in model.modules() if isinstance(m, TernaryLinear))
    assert payload * 16 == meta["weight_bytes_linears_float32"]          # 2 bits per weight: 1/16 of float32
    assert led["linears"] - payload == sum(m.scales.numel() * 2 for m in model.modules()
                                           if isinstance(m, TernaryLinear))  # + one bf16 scale per row
    ppl = evaluate_perplexity(model, stdlib_corpus().heldout, 8, 512)
    ref = json.loads(BITNET_CHECKPOINT.with_name("reference.json").read_text())["heldout_perplexity"]
    assert ppl < 2 * ref, (ppl, ref)   # trained ternary: near the float reference (post-training ternary is not)
    assert meta["heldout_perplexity"] < 1.1 * ref
