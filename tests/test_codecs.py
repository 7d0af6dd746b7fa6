"""Codecs: round-trip error bounds per format and granularity, packing, byte ledger, validation."""
from __future__ import annotations

import pytest
import torch

from ryzlab.config import CODECS, GRANULARITIES, CacheConfig
from ryzlab.kv.codecs import KVFormat

H, D = 2, 16


def _x(seed: int = 0, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, t, H, D, generator=g) * 2.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# Relative Frobenius error bounds on Gaussian data (measured values are ~2/3 of these):
# int8 step = absmax/127, int4 = absmax/7; fp8 e4m3 has 3 mantissa bits (2^-4 relative), e5m2 2.
# int3 = absmax/3; int2 symmetric has three levels (-s, 0, s) with s = absmax, so only the
# per-element half-step check below bounds it (a tensor-wide scale zeroes most values).
BOUNDS = {"none": 0.0, "int8": 0.012, "fp8_e4m3": 0.04, "fp8_e5m2": 0.08, "int4": 0.2, "int3": 0.4, "int2": 1.0}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_bound(codec, gran, symmetric):
    fmt = KVFormat(codec, gran, group_size=8, symmetric=symmetric)
    x = _x()
    enc = fmt.encode(x)
    y = fmt.decode(enc)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert _rel(y, x) <= BOUNDS[codec]
    if codec != "none":
        s_t, s_h, n_g = fmt.scale_shape(x.shape[1], H, D)
        assert tuple(enc.scale.shape) == (3, s_t, s_h, n_g) and enc.scale.dtype == fmt.scale_dtype
        assert (enc.zero is not None) == (not symmetric and codec.startswith("int"))
        # no element is off by more than one quantisation step (half a step + fp16 scale rounding)
        if codec.startswith("int"):
            step = enc.scale.float().unsqueeze(-1)  # int scales are fp16 values
            err = (y - x).view(3, x.shape[1], H, n_g, D // n_g).abs()
            assert (err <= 0.51 * step + 1e-6).all()


def test_int4_packs_two_values_per_byte_low_nibble_first():
    fmt = KVFormat("int4", "token_head")
    x = torch.tensor([[[7.0, -7.0, 0.0, 1.0]]])  # [T=1, H=1, D=4], scale = 1
    enc = fmt.encode(x)
    assert enc.payload.dtype == torch.uint8 and enc.payload.shape == (1, 1, 2)
    assert enc.payload.flatten().tolist() == [(7 + 8) | ((-7 + 8) << 4), (0 + 8) | ((1 + 8) << 4)]
    assert torch.equal(fmt.decode(enc), x)


def test_int2_packs_four_values_per_byte_lowest_bits_first():
    fmt = KVFormat("int2", "token_head")
    x = torch.tensor([[[1.0, -1.0, 0.0, 1.0, 0.0, 0.0, -1.0, 1.0]]])  # scale 1, codes q + 2
    enc = fmt.encode(x)
    assert enc.payload.dtype == torch.uint8 and enc.payload.shape == (1, 1, 2)
    assert enc.payload.flatten().tolist() == [3 | (1 << 2) | (2 << 4) | (3 << 6), 2 | (2 << 2) | (1 << 4) | (3 << 6)]
    assert torch.equal(fmt.decode(enc), x)


def test_int3_packs_eight_values_in_a_little_endian_24_bit_word():
    fmt = KVFormat("int3", "token_head", symmetric=False)
    x = torch.arange(8.0).view(1, 1, 8)  # min 0, scale 1: codes 0..7
    enc = fmt.encode(x)
    assert enc.payload.shape == (1, 1, 3)
    w = sum(i << (3 * i) for i in range(8))
    assert enc.payload.flatten().tolist() == [w & 0xFF, (w >> 8) & 0xFF, w >> 16]
    assert torch.equal(fmt.decode(enc), x)
    with pytest.raises(ValueError, match="multiple of 8"):
        fmt.encode(torch.zeros(1, 1, 12))
    with pytest.raises(ValueError, match="multiple of 4"):
        CacheConfig(codec="int2").check_head_dim(6)


@pytest.mark.parametrize("codec", ["int4", "int3", "int2"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_sub_byte_round_trip_of_codes_is_exact(codec, symmetric):
    """decode(encode(decode(encode(x)))) == decode(encode(x)): the grid is a fixed point."""
    fmt = KVFormat(codec, "token_head", symmetric=symmetric)
    y = fmt.decode(fmt.encode(_x(3)))
    levels = 2 ** int(codec[-1]) - (1 if symmetric else 0)
    assert int(fmt.unpack(fmt.encode(_x(3)).payload).unique().numel()) <= levels
    torch.testing.assert_close(fmt.decode(fmt.encode(y)), y, rtol=0, atol=2e-3 * y.abs().max().item())


def test_token_spanning_scale_covers_all_tokens_passed():
    fmt = KVFormat("int8", "channel")
    x = torch.zeros(4, 1, 2)
    x[2, 0, 1] = 127.0  # one outlier in channel 1 fixes that channel's scale for all 4 tokens
    enc = fmt.encode(x)
    assert enc.scale.shape == (1, 1, 2) and enc.scale[0, 0, 1].item() == pytest.approx(1.0)
    assert enc.scale[0, 0, 0].item() == pytest.approx(2 ** -14)  # all-zero channel: floor scale


def test_zero_and_constant_inputs_do_not_produce_nan():
    for codec in CODECS:
        for sym in (True, False):
            fmt = KVFormat(codec, "group", group_size=4, symmetric=sym)
            for x in (torch.zeros(2, H, D), torch.full((2, H, D), 3.0)):
                y = fmt.decode(fmt.encode(x))
                assert torch.isfinite(y).all() and (y - x).abs().max() < 0.13, (codec, sym)


def test_decode_to_half_dtypes():
    fmt = KVFormat("int8", "token_head")
    x = _x()
    for dt in (torch.float16, torch.bfloat16):
        y = fmt.decode(fmt.encode(x), dt)
        assert y.dtype == dt and _rel(y.float(), x) < 0.02


def test_bytes_per_token_exact():
    # int8 per (token, head): D bytes + one fp16 scale per head
    assert KVFormat("int8", "token_head").bytes_per_token(2, 64).total == 2 * (64 + 2)
    # int4 groups of 32: D/2 bytes + D/32 fp16 scales (+ as many fp16 minima when asymmetric)
    assert KVFormat("int4", "group", 32).bytes_per_token(2, 64).total == 2 * (32 + 2 * 2)
    assert KVFormat("int4", "group", 32, symmetric=False).bytes_per_token(2, 64).total == 2 * (32 + 4 * 2)
    # channel scales are shared by `span` tokens
    assert KVFormat("int4", "channel").bytes_per_token(2, 64, span=16).scales == 2 * 64 * 2 / 16
    assert KVFormat("fp8_e4m3", "tensor").bytes_per_token(2, 64, span=16).scales == 1 / 16
    assert KVFormat("none", model_dtype=torch.bfloat16).bytes_per_token(2, 64).total == 2 * 64 * 2
    # fp8: one E8M0 exponent byte per scale
    assert KVFormat("fp8_e4m3", "token_head").bytes_per_token(2, 64).total == 2 * (64 + 1)


def test_fp8_scale_is_a_power_of_two_that_avoids_overflow():
    for codec, fmax in (("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)):
        fmt = KVFormat(codec, "token_head")
        x = torch.tensor([[[1000.0, -3.0, 0.5, 0.0]]])
        enc = fmt.encode(x)
        scale = 2.0 ** (enc.scale.float() - 127)
        assert fmt.scale_dtype == torch.uint8 and (1000.0 / scale).item() <= fmax < 2000.0 / scale.item()
        assert (fmt.decode(enc) - x).abs().max() <= 1000.0 * 2 ** -3  # within one fp8 ulp at the top


def test_payload_bytes_match_the_ledger():
    for codec in CODECS:
        for gran in GRANULARITIES:
            fmt = KVFormat(codec, gran, 8)
            x = _x(t=16)
            enc = fmt.encode(x[0])  # [16, H, D]: one "span" of 16 tokens
            nbytes = sum(t.numel() * t.element_size() for t in (enc.payload, enc.scale, enc.zero) if t is not None)
            assert nbytes == pytest.approx(16 * fmt.bytes_per_token(H, D, span=16).total)


def test_invalid_choices_name_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of 'none', 'fp8_e4m3'.*'int3', 'int2'"):
        KVFormat("int5")
    with pytest.raises(ValueError, match="'token_head', 'channel'"):
        KVFormat("int8", "row")
    with pytest.raises(ValueError, match=r"valid group sizes: \[1, 2, 4, 8, 16\]"):
        KVFormat("int4", "group", 6).encode(torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="choose one of"):
        CacheConfig(codec="int5")
    with pytest.raises(ValueError, match="'none', 'hadamard', 'hadamard_signs'"):
        CacheConfig(rotation="random")
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        CacheConfig(rotation="hadamard").check_head_dim(48)
    with pytest.raises(ValueError, match="layer_codecs has 2 entries but the model has 3"):
        CacheConfig(layer_codecs=("int8", "int4")).check_layers(3)
    with pytest.raises(ValueError, match="valid group sizes"):
        CacheConfig(codec="int4", key_granularity="group", group_size=48).check_head_dim(64)


@pytest.mark.parametrize("codec", ["int4", "int3", "int2"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_unpack_then_decode_equals_decode(codec, symmetric):
    fmt = KVFormat(codec, "group", 8, symmetric=symmetric)
    enc = fmt.encode(_x())
    vals = fmt.unpack(enc.payload)
    assert vals.shape == (3, 12, H, D) and vals.dtype == (torch.int8 if symmetric else torch.uint8)
    bits = int(codec[-1])
    lo, hi = (1 - 2 ** (bits - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert lo <= int(vals.min()) and int(vals.max()) <= hi
    from ryzlab.kv.codecs import Encoded
    torch.testing.assert_close(fmt.decode(Encoded(vals, enc.scale, enc.zero), unpacked=True), fmt.decode(enc),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="int4"):
        KVFormat("int8").unpack(enc.payload)
