"""int4 weights x int8 activations (``int4-g<N>-a8``): the C++ kernel against the torch reference,
the layout's round trip, the layer in a model, batching and torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch

from ryzlab.models.quant import Int4A8Linear, model_weight_bytes, parse_weight_format, quantize_weights, weight_ledger
from ryzlab.models.quant import w4a8
from ryzlab.models.quant.linear import concat_int4
from ryzlab.models.quant.packing import quantize_int4

needs_kernel = pytest.mark.skipif(not w4a8.native(), reason="no C++ compiler here: the W4A8 kernel could not be built")


def _layer(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return (w, *w4a8.quantize_w4a8(w, group))


@pytest.mark.parametrize("n,k,group", [(70, 256, 32), (64, 576, 64), (5, 128, 128)])
def test_pack_round_trip_and_padding(n, k, group):
    w = torch.randn(n, k)
    q, s, z = quantize_int4(w, group, torch.bfloat16)
    packed, sz = w4a8.pack_w4a8(q, s, z)
    npad = -(-n // w4a8.TILE) * w4a8.TILE
    assert packed.shape == (npad // w4a8.TILE, w4a8.TILE * k // 2)
    assert sz.shape == (npad // w4a8.TILE, k // group, 2, w4a8.TILE)
    codes = w4a8.unpack_w4a8(packed)
    assert torch.equal(codes[:n], q.to(torch.uint8)) and not codes[n:].any()
    deq = w4a8.dequantize_w4a8(packed, sz)
    ref = ((q.float().reshape(n, -1, group) - 8) * s.float()[..., None] + z.float()[..., None]).reshape(n, k)
    assert torch.equal(deq[:n], ref) and not deq[n:].any()
    idx = torch.tensor([n - 1, 0, 3, n - 1])
    assert torch.equal(w4a8.rows_w4a8(packed, sz, idx), ref[idx])
    if w4a8.native():   # the C++ rows op: the same floats
        assert torch.equal(w4a8.w4a8_rows(packed, sz, idx.reshape(2, 2)), ref[idx])
        with pytest.raises(RuntimeError, match="out of range"):
            w4a8.w4a8_rows(packed, sz, torch.tensor([npad]))


def test_layout_byte_places_match_the_kernels_comment():
    """Chunk c (32 bytes) of block b of a tile: byte j holds row j // 4's input 32 b + 4 c + j % 4
    in its low nibble and 32 b + 16 + 4 c + j % 4 in its high one (csrc/w4a8.cpp reads that)."""
    n, k = 8, 64
    q = (torch.arange(n * k).reshape(n, k) * 7 % 16).to(torch.uint8)
    packed, _ = w4a8.pack_w4a8(q, torch.ones(n, 2), torch.zeros(n, 2))
    for b, c, j in [(0, 0, 0), (0, 1, 5), (1, 3, 31), (1, 2, 14)]:
        byte = packed[0, b * 128 + c * 32 + j].item()
        r, kk = j // 4, b * 32 + 4 * c + j % 4
        assert (byte & 15, byte >> 4) == (q[r, kk].item(), q[r, kk + 16].item())


def test_reference_is_dequantized_weight_times_quantized_activations():
    w, packed, sz = _layer(48, 256, 32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)) * torch.tensor([[1.0], [1e-3], [50.0]])
    x[0, 32:64] *= 1e-3   # a block far smaller than its neighbours keeps its own scale
    xq, sx = w4a8.quantize_activations(x)
    assert xq.dtype == torch.int8 and sx.shape == (3, 256 // w4a8.BLOCK)
    assert xq.reshape(3, -1, w4a8.BLOCK).abs().amax(-1).eq(127).all()       # every block uses its full range
    torch.testing.assert_close(sx, x.reshape(3, -1, w4a8.BLOCK).abs().amax(-1) / 127)
    # half a step of each block's scale, plus float32 rounding of x * (127 / a) and of the product
    step = sx.repeat_interleave(w4a8.BLOCK, dim=1)
    assert (w4a8.activations(xq, sx) - x).abs().le(step * (0.5 + 1e-4)).all()
    exact = (xq.double() * step.double()) @ w4a8.dequantize_w4a8(packed, sz).double().t()
    torch.testing.assert_close(w4a8.w4a8_reference(x, packed, sz, 32).double(), exact, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("n,k,group", [(72, 576, 32), (64, 1536, 64), (8, 256, 128), (4, 64, 32), (20, 192, 96)])
def test_kernel_matches_reference(m, n, k, group):
    _, packed, sz = _layer(n, k, group, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m))
    y = w4a8.w4a8_linear(x, packed, sz, group)
    ref = w4a8.w4a8_reference(x, packed, sz, group)
    npad = -(-n // w4a8.TILE) * w4a8.TILE   # padding rows: zero outputs
    assert y.shape == ref.shape == (m, npad) and not y[:, n:].any()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


@needs_kernel
def test_kernel_rows_do_not_depend_on_the_batch():
    """A row's output is the same alone or beside others, bit for bit (each row's sums run in the
    same order whether the kernel takes activation rows 4 at a time or one)."""
    _, packed, sz = _layer(64, 576, 32)
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(7))
    batch = w4a8.w4a8_linear(x, packed, sz, 32)
    alone = torch.cat([w4a8.w4a8_linear(x[i:i + 1], packed, sz, 32) for i in range(7)])
    assert torch.equal(batch, alone)


@needs_kernel
def test_kernel_refuses_bad_operands():
    _, packed, sz = _layer(8, 256, 32)
    with pytest.raises(RuntimeError, match="inputs per row"):
        w4a8.w4a8_linear(torch.randn(1, 128), packed, sz, 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        w4a8.w4a8_linear(torch.randn(1, 256), packed, sz, 48)


def test_format_parsing():
    fmt = parse_weight_format("int4-g64-a8")
    assert (fmt.kind, fmt.group_size, fmt.act_bits, fmt.name) == ("int4", 64, 8, "int4-g64-a8")
    assert parse_weight_format("int4-g32").act_bits == 0
    with pytest.raises(ValueError, match="no -a8-f32"):
        parse_weight_format("int4-g32-a8-f32")
    with pytest.raises(ValueError, match="int4-g32-a8"):
        parse_weight_format("int4-g48-a8")


def _reference_model():
    from ryzlab.models.loader import load_model

    model, _ = load_model("reference")
    return model


def test_model_layers_ledger_and_fallback_agree():
    ref = _reference_model()
    model = quantize_weights(copy.deepcopy(ref), "int4-g32-a8")
    assert isinstance(model.layers[0].attention.wq, Int4A8Linear)
    led = weight_ledger(model)
    assert led["total"] == model_weight_bytes(model.config, "int4-g32-a8")["total"]
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens)
        fallback = copy.deepcopy(model)
        for mod in fallback.modules():
            if isinstance(mod, Int4A8Linear):
                mod.native = False
        fb = fallback(tokens)
        # each layer agrees to float rounding (test_kernel_matches_reference); through the model, a
        # rounding difference can move one activation across a rounding boundary in a later layer
        # (one step of its block's scale), so the logits agree to ~1e-4, far inside the int8 error
        assert ((fb - out).norm() / out.norm()).item() < 1e-3
        assert torch.equal(fb.argmax(-1), out.argmax(-1))
        # close to the float model (int4 weights and int8 activations are lossy, not wrong)
        full = ref(tokens)
    assert ((out - full).norm() / full.norm()).item() < 0.15


def test_concat_matches_separate_layers():
    g = torch.Generator().manual_seed(5)
    parts = [Int4A8Linear.from_float(torch.randn(n, 256, generator=g), None, parse_weight_format("int4-g32-a8"))
             for n in (64, 6, 6)]
    x = torch.randn(3, 256, generator=g)
    separate = [p(x) for p in parts]
    fused, starts = concat_int4(parts)
    y = fused(x)
    for p, s, want in zip(parts, starts, separate):
        torch.testing.assert_close(y[:, s:s + p.out_features], want)
        torch.testing.assert_close(p(x), want)   # the parts now view the fused buffers


@needs_kernel
def test_compiled_layer_is_one_graph_and_same_output():
    g = torch.Generator().manual_seed(11)
    layer = Int4A8Linear.from_float(torch.randn(96, 256, generator=g), torch.randn(96, generator=g),
                                    parse_weight_format("int4-g32-a8"))
    x = torch.randn(2, 5, 256, generator=g)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_a_failed_build_falls_back_and_says_so(tmp_path, monkeypatch, caplog):
    """No compiler, or a build error: the layer still computes (the torch fallback), the log and
    the ``kernel`` name say it is the fallback."""
    bad = tmp_path / "w4a8.cpp"
    bad.write_text("#include <torch/extension.h>\nthis is not C++;\n")
    monkeypatch.setattr(w4a8, "SOURCE", bad)
    monkeypatch.setenv("RYZLAB_EXT_DIR", str(tmp_path / "ext"))
    build = w4a8._extension.__wrapped__
    with caplog.at_level("WARNING", logger="ryzlab.models.quant.w4a8"):
        assert build() is None
    assert "torch fallback" in caplog.text
    monkeypatch.setattr(w4a8, "_extension", build)   # every later ask sees the failed build
    assert not w4a8.native() and "fallback" in w4a8.w4a8_kernel()
    layer = Int4A8Linear.from_float(torch.randn(8, 64), None, parse_weight_format("int4-g32-a8"))
    assert not layer.native and "fallback" in layer.kernel
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), w4a8.w4a8_reference(x, layer.packed, layer.sz, 32))


@needs_kernel
def test_a_nan_input_row_gives_nan_outputs_not_a_silent_number():
    _, packed, sz = _layer(8, 64, 32)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    y = w4a8.w4a8_linear(x, packed, sz, 32)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    assert torch.isnan(w4a8.w4a8_reference(x, packed, sz, 32)[1]).all()


@needs_kernel
def test_an_infinite_input_row_gives_no_finite_output():
    """An infinity takes the scalar rounding (the vector one would turn inf * 0 into INT_MIN codes):
    its row's outputs are all non-finite, the other rows untouched."""
    _, packed, sz = _layer(16, 96, 32)
    x = torch.randn(3, 96)
    want = w4a8.w4a8_linear(x[[0, 2]], packed, sz, 32)
    x[1, 40] = float("-inf")
    y = w4a8.w4a8_linear(x, packed, sz, 32)
    assert not torch.isfinite(y[1]).any()
    assert torch.equal(y[[0, 2]], want)

