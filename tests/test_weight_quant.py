"""Weight formats (ryzlab.models.quant): round-trip bounds, packing layouts, the exact ledger, refusals, tp x format."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ryzlab.config import ModelConfig
from ryzlab.models.quant import (WEIGHT_FORMAT_CHOICES, Int4Linear, Int8Linear, TernaryLinear, check_weight_format,
                                 linear_weight_bytes, model_weight_bytes, parse_weight_format, quantize_weights,
                                 weight_ledger)
from ryzlab.models.quant.packing import (dequantize_int4, dequantize_int8, pack_int4, pack_ternary, quantize_int4,
                                         quantize_int8, quantize_ternary, unpack_int4, unpack_ternary)
from ryzlab.models.transformer import Transformer

torch.set_num_threads(1)

M = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, qkv_bias=True)
FORMATS = ["bf16", "int8", "int8-f32", "int8-g32", "int4-g32", "int4-g64", "int4-g32-f32", "ternary", "ternary-f32"]


def _weight(n: int = 96, k: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.01] *= 40  # outliers: the scales must stretch without clipping
    return w + 0.3 * (torch.rand(n, 1, generator=g) - 0.5)  # rows with an offset: int4's zero point matters


def _model(cfg: ModelConfig = M, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            p.data.normal_()
    return m


# ----------------------------------------------------------------------------- formats and refusals
def test_parse_names_and_refuses_with_the_choices():
    assert parse_weight_format("int4-g64").group_size == 64
    assert parse_weight_format("INT8-f32").compute == "float32"
    assert parse_weight_format("int8-g64").group_size == 64 and parse_weight_format("int8-g64").name == "int8-g64"
    for name in WEIGHT_FORMAT_CHOICES:
        assert parse_weight_format(name).name == name
    for bad in ("int4", "int4-g48", "int3", "bf16-f32", "int8-g20"):
        with pytest.raises(ValueError) as e:
            parse_weight_format(bad)
        assert "int4-g32" in str(e.value) or "-f32" in str(e.value)


def test_group_size_not_dividing_a_row_is_refused_before_loading():
    smol = ModelConfig(vocab_size=256, dim=576, n_layers=1, n_heads=9, n_kv_heads=3, ffn_dim=1536)
    with pytest.raises(ValueError) as e:
        check_weight_format(smol, "int4-g128")
    msg = str(e.value)
    assert "576 values" in msg and "int4-g32, int4-g64" in msg and "nothing loaded" in msg
    check_weight_format(smol, "int4-g64")
    # tp 4: wo's shard is 1 head of 16 values, less than a group of 32
    with pytest.raises(ValueError, match=r"wo: its rank 0 shard covers input columns \[0, 16\)"):
        check_weight_format(M, "int4-g32", tp=4)
    check_weight_format(M, "int4-g32", tp=2)
    # quantize_weights runs the same check first and leaves the model untouched
    m = _model(ModelConfig(vocab_size=128, dim=96, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=192))
    with pytest.raises(ValueError, match="int4-g64"):
        quantize_weights(m, "int4-g64")
    assert isinstance(m.layers[0].attention.wq, torch.nn.Linear)


def test_ternary_with_tp_splitting_a_packed_byte_is_refused():
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=40)
    check_weight_format(cfg, "ternary", tp=2)          # w2 shards of 20 columns: 5 whole bytes each
    with pytest.raises(ValueError) as e:
        check_weight_format(cfg, "ternary", tp=4)      # shards of 10 columns: rank 1 starts inside a byte
    assert "w2" in str(e.value) and "packed byte" in str(e.value)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [0, 32])
def test_int8_round_trip_within_half_a_step(dtype, group):
    w = _weight()
    q, s = quantize_int8(w, group, dtype)
    err = (dequantize_int8(q, s) - w).abs().reshape(w.shape[0], s.shape[1], -1)
    assert (err <= s.float()[..., None] / 2 * (1 + 1e-6)).all()
    assert err.max() > 0.1 * s.float().max() / 2  # the bound is reached, not vacuous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step_plus_zero_rounding(dtype, group):
    w = _weight()
    q, s, z = quantize_int4(w, group, dtype)
    packed, sz = pack_int4(q, s, z)
    assert torch.equal(unpack_int4(packed)[: w.shape[0]].int(), q)   # our reading of torch's layout
    deq = dequantize_int4(unpack_int4(packed, torch.arange(96)), sz, torch.arange(96))
    wg = w.reshape(96, -1, group)
    z_exact = wg.amin(-1) + 8 * s.float()
    bound = s.float() / 2 + (z.float() - z_exact).abs()
    assert ((deq - w).abs().reshape(wg.shape) <= bound[..., None] * (1 + 1e-5) + 1e-7).all()


def test_int4_layout_matches_torch_for_padded_rows():
    q = torch.randint(0, 16, (100, 64), dtype=torch.int32)
    packed, sz = pack_int4(q, torch.ones(100, 2), torch.zeros(100, 2))
    assert packed.shape == (128, 32) and sz.shape == (2, 128, 2)    # rows padded to a block of 64
    rows = torch.tensor([0, 31, 32, 63, 64, 99])
    assert torch.equal(unpack_int4(packed, rows).int(), q[rows])


def test_ternary_pack_round_trip_and_absmean_bound():
    w = _weight()
    q, s = quantize_ternary(w, torch.float32)
    assert set(q.unique().tolist()) <= {-1, 0, 1}
    packed = pack_ternary(q)
    assert packed.shape == (96, 32) and packed.dtype == torch.uint8       # 2 bits per value
    assert torch.equal(unpack_ternary(packed), q)
    assert torch.allclose(s, w.abs().mean(-1))
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= torch.maximum(s[:, None] / 2, w.abs() - s[:, None]) + 1e-6).all()


@pytest.mark.parametrize("fmt", ["int8-f32", "int4-g32-f32", "ternary-f32", "int8", "int4-g64", "ternary", "bf16"])
def test_layer_equals_float_matmul_of_its_dequantized_weight(fmt):
    from ryzlab.models.quant.linear import _pack

    w, b = _weight(), torch.randn(96)
    lin = _pack(w, b, parse_weight_format(fmt), None)
    x = torch.randn(3, 5, 128)
    ref = F.linear(x, lin.dequantize(), b)
    tol = 1e-5 if fmt.endswith("f32") else 2e-2  # bf16 activations at the kernel's input
    assert ((lin(x) - ref).norm() / ref.norm()).item() <= tol
    idx = torch.tensor([3, 0, 95])
    assert torch.equal(lin.rows(idx), lin.dequantize()[idx])


def test_grouped_int8_gguf_style_equals_its_dequantized_weight():
    w = _weight()
    q, s = quantize_int8(w, 32, torch.float32)
    lin = Int8Linear(q, s)
    assert lin.qweight.shape == (4, 96, 32) and "x4 groups" in lin.kernel
    x = torch.randn(4, 128)
    assert torch.allclose(lin(x), x @ dequantize_int8(q, s).T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the ledger
def test_linear_weight_bytes_closed_forms():
    assert linear_weight_bytes(64, 128, "float32") == 64 * 128 * 4
    assert linear_weight_bytes(64, 128, "int8") == 64 * 128 + 64 * 2
    assert linear_weight_bytes(64, 128, "int8", group_size=32) == 64 * 128 + 64 * 4 * 2
    assert linear_weight_bytes(64, 128, "int4-g32") == 64 * 64 + 64 * 4 * 2 * 2
    assert linear_weight_bytes(64, 128, "int4-g32-f32") == 64 * 64 + 64 * 4 * 2 * 4
    assert linear_weight_bytes(100, 128, "int4-g64") == 128 * 64 + 128 * 2 * 2 * 2   # padded to 128 rows
    assert linear_weight_bytes(64, 128, "ternary") == 64 * 32 + 64 * 2
    assert linear_weight_bytes(64, 128, "ternary") * 16 < linear_weight_bytes(64, 128, "float32") * 1.07


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
def test_measured_ledger_equals_the_formula(fmt, tie):
    cfg = ModelConfig(**{**M.__dict__, "tie_embeddings": tie, "mlp_bias": True, "vocab_size": 100})
    m = quantize_weights(_model(cfg), fmt)
    got, want = weight_ledger(m), model_weight_bytes(cfg, fmt)
    for k in ("linears", "tables", "float", "scales", "padding", "total", "float32"):
        assert got[k] == want[k], (k, got[k], want[k])
    f32 = weight_ledger(_model(cfg))
    assert f32["total"] == want["float32"] == model_weight_bytes(cfg, "float32")["total"]


def test_quantized_model_tracks_the_float_model():
    m = _model()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(x).log_softmax(-1)
        kls = {}
        for fmt in ("int8-f32", "int4-g32-f32", "ternary-f32"):
            lp = quantize_weights(_model(), fmt)(x).log_softmax(-1)
            kls[fmt] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kls["int8-f32"] < 1e-3 and kls["int8-f32"] < kls["int4-g32-f32"] < kls["ternary-f32"], kls
    q = quantize_weights(_model(), "int4-g32")
    assert isinstance(q.layers[0].feed_forward.w2, Int4Linear) and q.output is not q.tok_embeddings.table
    tied = quantize_weights(_model(ModelConfig(**{**M.__dict__, "tie_embeddings": True})), "int4-g32")
    assert tied.output is tied.tok_embeddings.table   # one packed matrix serves both
    t = quantize_weights(_model(), "ternary")
    assert isinstance(t.layers[1].attention.wo, TernaryLinear) and weight_ledger(t)["ratio_vs_float32"] < 0.2


# ----------------------------------------------------------------------------- tp x format on gloo ranks
TP_FORMATS = ["int8-f32", "int4-g32-f32", "ternary-f32", "int4-g32"]


def _tp_ranks(rank, world):
    from ryzlab.config import ParallelConfig
    from ryzlab.parallel import apply_tp, init_parallel

    g = init_parallel(ParallelConfig(tp=world))
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    out = {}
    for fmt in TP_FORMATS:
        m = quantize_weights(apply_tp(_model(), g.tp), fmt)
        with torch.no_grad():
            out[fmt] = {"logits": m(x), "ledger": weight_ledger(m)}
    return out


def test_tp2_each_rank_quantizes_its_shard():
    from ryzlab.orchestrator import launch

    results = launch(_tp_ranks, 2, backend="gloo", timeout_s=300)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _model()(x)
        for fmt in TP_FORMATS:
            one = quantize_weights(_model(), fmt)(x)
            for rank, r in enumerate(results):
                got = r[fmt]["logits"]
                assert r[fmt]["ledger"]["total"] == model_weight_bytes(M, fmt, tp=2, rank=rank)["total"]
                if fmt.startswith("int4"):  # shards end on group boundaries: the same groups as tp 1
                    tol = 1e-5 if fmt.endswith("f32") else 2e-2
                    assert ((got - one).norm() / one.norm()).item() <= tol, fmt
                else:  # row-parallel shards get their own per-row scales: as close to float as tp 1 is
                    e1, e2 = ((one - ref).norm() / ref.norm()).item(), ((got - ref).norm() / ref.norm()).item()
                    assert e2 <= 1.5 * e1 + 1e-6, (fmt, e1, e2)


# ----------------------------------------------------------------------------- W1.58A8
def test_ternary_a8_is_integer_ternary_times_absmax_int8_activations():
    """ternary-a8: each token's input rounded to int8 (absmax / 127), integer matmul with the ternary codes,
    then both scales; same bytes as ternary; the -a8 suffix belongs to ternary only."""
    fmt = parse_weight_format("ternary-a8-f32")
    assert fmt.act_bits == 8 and fmt.name == "ternary-a8-f32" and parse_weight_format("ternary").act_bits == 0
    with pytest.raises(ValueError, match="not a weight format"):
        parse_weight_format("int8-a8")
    assert model_weight_bytes(M, "ternary-a8")["total"] == model_weight_bytes(M, "ternary")["total"]
    w, x = _weight(), torch.randn(5, 128) * 3
    lin = TernaryLinear.from_float(w, None, fmt)
    assert "_int_mm" in lin.kernel
    q, s = quantize_ternary(w, torch.float32)
    a = x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * 127 / a).clamp(-128, 127) * a / 127
    want = F.linear(xq, q.float() * s[:, None])
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    plain = TernaryLinear.from_float(w, None, parse_weight_format("ternary-f32"))(x)
    assert (plain - want).abs().max() > 1e-3   # the activation rounding is there


def test_ternary_a8_computes_what_the_bitnet_checkpoint_was_trained_with():
    """On the shipped BitNet checkpoint: the hidden states a packed ternary-a8 model hands its output head
    match the QAT forward's (BitLinear: ternary weights x 8-bit activations) far closer than packed ternary
    with float activations does (the head itself is bf16 in both packed formats: compared before it)."""
    from ryzlab.models import load_model
    from ryzlab.models.corpus import text_windows
    from ryzlab.models.quant.qat import ternary_qat

    def hidden(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        got = []
        h = m.output.register_forward_pre_hook(lambda mod, args: got.append(args[0].float()))
        with torch.no_grad():
            m(ids)
        h.remove()
        return got[0]

    ck = "ryzlab/checkpoints/bitnet.safetensors"
    qat, tok = load_model(ck)
    ids = text_windows(tok, 2, 64)
    ref = hidden(ternary_qat(qat), ids)
    err = {w: ((hidden(load_model(ck, weights=w)[0], ids) - ref).norm() / ref.norm()).item()
           for w in ("ternary-a8-f32", "ternary-f32")}
    assert err["ternary-a8-f32"] < 1e-3 and err["ternary-a8-f32"] * 5 < err["ternary-f32"], err


def test_int4_many_rows_take_the_dense_path_within_bf16_rounding_of_the_kernel():
    """From DENSE_ROWS tokens an int4 layer unpacks its weight (every row at once, exactly the
    dequantized values) and runs one bf16 GEMM: the same product as torch's int4 kernel within
    bf16 rounding; fewer rows still go through the kernel."""
    from ryzlab.models.quant.linear import DENSE_ROWS, _pack
    from ryzlab.models.quant.packing import dequantize_int4_all

    w = torch.randn(100, 128) * 0.05                   # 100 rows: padded to 128 in the layout
    lin = _pack(w, None, parse_weight_format("int4-g32"), None)
    rows = torch.arange(100)                          # the per-row reference unpacking
    assert torch.equal(dequantize_int4_all(lin.packed, lin.scales_zeros)[:100],
                       dequantize_int4(unpack_int4(lin.packed, rows), lin.scales_zeros, rows))
    x = torch.randn(DENSE_ROWS + 3, 128)
    calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu

    def kernel(*a):
        calls.append(a[0].shape[0])
        return real(*a)

    torch.ops.aten._weight_int4pack_mm_for_cpu = kernel
    try:
        dense = lin(x)
        few = lin(x[:DENSE_ROWS - 1])
    finally:
        torch.ops.aten._weight_int4pack_mm_for_cpu = real
    assert calls == [DENSE_ROWS - 1]                   # only the short input used the kernel
    ref = real(x.to(torch.bfloat16), lin.packed, 32, lin.scales_zeros)[:, :100].float()
    assert dense.shape == (DENSE_ROWS + 3, 100)
    assert ((dense - ref).norm() / ref.norm()).item() < 1e-2
    assert ((few - dense[:DENSE_ROWS - 1]).norm() / few.norm()).item() < 1e-2


@pytest.mark.parametrize("fmt", ["int8", "int8-g32"])
def test_int8_many_rows_dense_path_matches_the_kernel_within_bf16_rounding(fmt):
    from ryzlab.models.quant.linear import DENSE_ROWS, _pack

    fm = parse_weight_format(fmt)
    lin = _pack(torch.randn(96, 128) * 0.05, None, fm, None)
    x = torch.randn(DENSE_ROWS + 5, 128)
    dense, few = lin(x), lin(x[:DENSE_ROWS - 1])       # one bf16 GEMM; the kernel (per group for g32)
    ref = F.linear(x.to(torch.bfloat16).float(), lin.dequantize())
    assert ((dense - ref).norm() / ref.norm()).item() < 1e-2
    assert ((few - dense[:DENSE_ROWS - 1]).norm() / few.norm()).item() < 1e-2


@pytest.mark.parametrize("fmt, fused", [("int4-g32", 4), ("int8", 0), ("float32", 0)])
def test_fused_projections_give_the_same_logits_and_hold_the_weights_once(fmt, fused):
    """Model.fuse_projections runs q|k|v and gate|up as one int4 call each (k / v of 32 rows pad to
    a 64-row block: the offsets skip the padding): bit-identical logits, prefill and decode, and
    the parts' buffers become views of the fused ones. Other formats are left as they are."""
    from ryzlab.models.transformer import DenseKVCache

    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    m = quantize_weights(_model(cfg), fmt) if fmt != "float32" else _model(cfg)
    tokens = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c0 = DenseKVCache(cfg.n_layers)
        want = [m(tokens, cache=c0), m(tokens[:, :1], cache=c0)]
        assert m.fuse_projections() == fused
        c1 = DenseKVCache(cfg.n_layers)
        got = [m(tokens, cache=c1), m(tokens[:, :1], cache=c1)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if fused:
        att, ff = m.layers[0].attention, m.layers[0].feed_forward
        qkv, starts = att._qkv
        assert starts == [0, 64, 128] and qkv.packed.shape[0] == 192
        for part, at in zip((att.wq, att.wk, att.wv), starts):
            assert part.packed.data_ptr() == qkv.packed[at:].data_ptr()
        assert ff.w1.packed.untyped_storage().data_ptr() == ff._gate_up[0].packed.untyped_storage().data_ptr()
