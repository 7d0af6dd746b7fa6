"""Rotation before quantisation: Hadamard exactness, the uncompressed path unchanged, outliers tamed;
per-layer formats through the ledger."""
from __future__ import annotations

import pytest
import torch

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.kv.cache import PagedKVCache
from ryzlab.kv.codecs import KVFormat
from ryzlab.kv.rotation import HeadRotation, fwht, hadamard
from ryzlab.kv.store import KeyRope

MODEL = ModelConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)  # head_dim 16


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_hadamard_is_orthogonal_symmetric_and_sylvester(d):
    h = hadamard(d, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(h, h.T)
    i = torch.arange(d)
    pop = torch.tensor([bin(int(a) & int(b)).count("1") for a in i for b in i]).view(d, d)
    torch.testing.assert_close(h, (-1.0) ** pop.double() / d ** 0.5, atol=1e-12, rtol=0)


def test_fwht_is_its_own_inverse_and_rejects_other_sizes():
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x)), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(fwht(x), x @ hadamard(32, torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(4, 12))


@pytest.mark.parametrize("kind", ["hadamard", "hadamard_signs"])
def test_head_rotation_inverts_exactly_and_signs_depend_on_seed(kind):
    x = torch.randn(7, 2, 16)
    r = HeadRotation(kind, 16, seed=1)
    torch.testing.assert_close(r.invert(r.apply(x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(r.matrix @ r.matrix.T, torch.eye(16), atol=1e-6, rtol=0)
    # scores are invariant: (q R)(k R)^T == q k^T
    q, k = torch.randn(4, 16), torch.randn(9, 16)
    torch.testing.assert_close(r.apply(q) @ r.apply(k).T, q @ k.T, atol=1e-5, rtol=1e-5)
    if kind == "hadamard_signs":
        assert not torch.equal(r.signs, HeadRotation(kind, 16, seed=2).signs)
        assert torch.equal(r.signs, HeadRotation(kind, 16, seed=1).signs)
        assert set(r.signs.tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="choose one of 'hadamard', 'hadamard_signs'"):
        HeadRotation("none", 16)


def _rope() -> KeyRope:
    """The model's RoPE, as the model side hands it to a pre-RoPE cache."""
    from ryzlab.models.transformer import apply_rope, rope_cos_sin, rope_inv_freq

    return KeyRope(rope_inv_freq(MODEL), rope_cos_sin, apply_rope)


def _run(cfg: CacheConfig, seed: int = 0) -> tuple[list[torch.Tensor], PagedKVCache]:
    """Prefill 2 ragged sequences then 5 decode steps; every layer's attention output."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(MODEL, cfg, rope=_rope())
    cache.add_sequence("a", 9)
    cache.add_sequence("b", 4)
    outs = []
    for t in range(6):
        step = cache.extend(["a", "b"]) if t == 0 else cache.extend(["a", "b"], [1, 1])
        for layer in range(MODEL.n_layers):
            n = step.num_tokens
            k, v = torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
            k[:, :, 3] *= 30  # an outlier channel, as trained keys have
            cache.write(layer, k, v)
            outs.append(cache.attend(layer, torch.randn(n, 4, 16, generator=g)))
    return outs, cache


@pytest.mark.parametrize("kind", ["hadamard", "hadamard_signs"])
def test_uncompressed_path_is_unchanged_by_rotation(kind):
    plain, c0 = _run(CacheConfig(block_size=4))
    rot, c1 = _run(CacheConfig(block_size=4, rotation=kind, rotation_seed=5))
    for a, b in zip(plain, rot):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    for s in ("a", "b"):  # read_kv and gather give the model's basis back
        for x, y in zip(c0.read_kv(s), c1.read_kv(s)):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    k0, _ = c0.gather(1)
    k1, _ = c1.gather(1)
    torch.testing.assert_close(k1, k0, atol=1e-5, rtol=0)
    k1r, _ = c1.gather(1, rotated=True)  # the stored basis: the rotation applied
    torch.testing.assert_close(k1r, c1.rotate(k0), atol=1e-5, rtol=0)
    assert c1.ledger()["total"] == c0.ledger()["total"]  # a rotation stores nothing


def test_rotation_spreads_an_outlier_channel():
    """int4 per (token, head) on keys with one outlier channel: rotating first cuts the error."""
    _, ref = _run(CacheConfig(block_size=4))
    _, plain = _run(CacheConfig(codec="int4", key_granularity="token_head", block_size=4))
    _, rot = _run(CacheConfig(codec="int4", key_granularity="token_head", block_size=4, rotation="hadamard"))
    normal = [i for i in range(16) if i != 3]
    k = ref.read_kv("a")[0][..., normal]
    err = lambda c: ((c.read_kv("a")[0][..., normal] - k).norm() / k.norm()).item()
    # the outlier (30x) sets each vector's scale, so the other 15 channels mostly round to 0;
    # rotated, the outlier is spread over all 16 channels and they keep their information
    assert err(plain) > 0.7 and err(rot) < 0.6 * err(plain), (err(rot), err(plain))  # measured 0.39 vs 0.76


def test_mixed_precision_ledger_sums_each_layers_format():
    cfg = CacheConfig(codec="int4", layer_codecs=("int8", "int2"), key_granularity="token_head", block_size=4,
                      symmetric=False)
    cache = PagedKVCache(MODEL, cfg)
    cache.add_sequence("a", 8)  # two full blocks: no padding, no tail (token-local scales, no residual)
    cache.extend(["a"])
    for layer in range(2):
        cache.write(layer, torch.randn(8, 2, 16), torch.randn(8, 2, 16))
    led = cache.ledger()
    # per token, per layer, K and V each: H * (payload bytes + asymmetric fp16 scale + fp16 zero)
    per_token = sum(2 * 2 * (KVFormat(c).packed_dim(16) + 4) for c in ("int8", "int2"))
    assert led["payload"] + led["scales"] == 8 * per_token
    assert led["payload"] == 8 * 2 * 2 * (16 + 4)
    assert led["bytes_per_token_codec"] == per_token
    held = sum(t[:, cache.block_table("a")].numel() * t.element_size() for p in (cache.k, cache.v)
               for t in p.tensors())
    assert held == led["payload"] + led["scales"]
    assert [f.codec for f in cache.key_formats] == ["int8", "int2"]


def test_pre_rope_keys_leave_the_uncompressed_path_unchanged_and_quantise_before_rope():
    from ryzlab.models.transformer import apply_rope, rope_cos_sin, rope_inv_freq

    plain, c0 = _run(CacheConfig(block_size=4))
    for kind in ("none", "hadamard"):
        pre, c1 = _run(CacheConfig(block_size=4, pre_rope_keys=True, rotation=kind))
        for a, b in zip(plain, pre):
            torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(c1.read_kv("a")[0], c0.read_kv("a")[0], atol=5e-5, rtol=0)
        for row, n in enumerate(c1._step.context_lens):  # positions past a row's context are padding
            torch.testing.assert_close(c1.gather(0)[0][row, :n], c0.gather(0)[0][row, :n], atol=5e-5, rtol=0)
    # compressed: what is stored is the pre-RoPE key, quantised per channel over a block
    _, q = _run(CacheConfig(codec="int4", key_granularity="channel", block_size=4, pre_rope_keys=True))
    k = c0.read_kv("a", 0)[0]  # [n, H, D] post-RoPE, exact
    n = k.shape[0]
    cos, sin = rope_cos_sin(torch.arange(n), rope_inv_freq(MODEL), torch.float32)
    pre_k = apply_rope(k, cos, -sin)
    fmt = q.key_formats[0]
    full = n // 4 * 4
    exp = pre_k.clone()
    exp[:full] = fmt.decode(fmt.encode(pre_k[:full].view(-1, 4, 2, 16))).reshape(full, 2, 16)
    torch.testing.assert_close(q.read_kv("a", 0)[0], apply_rope(exp, cos, sin), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pre_rope_keys"):
        q.gather(0, rotated=True)


def test_pre_rope_keys_need_the_models_rope():
    """The cache cannot know a model's RoPE (it sits below the models layer): asked to store keys
    before RoPE without one, it says what to pass; a cache that does not need it ignores it."""
    with pytest.raises(ValueError, match="pass rope=KeyRope"):
        PagedKVCache(MODEL, CacheConfig(pre_rope_keys=True))
    assert PagedKVCache(MODEL, CacheConfig(), rope=_rope()).store.rope is None


def test_half_precision_tail_halves_the_residual_bytes():
    cfg = dict(codec="int8", block_size=4, residual=6)
    _, c32 = _run(CacheConfig(**cfg))
    _, c16 = _run(CacheConfig(**cfg, residual_dtype="float16"))
    l32, l16 = c32.ledger(), c16.ledger()
    assert l16["residual"] * 2 == l32["residual"] == 2 * 6 * 2 * 16 * 4 * 2 * 2  # seqs, rows, H, D, fp32, K+V, L
    assert l16["payload"] == l32["payload"] and l16["scales"] == l32["scales"]
    # the window reads the fp16-rounded vectors; older tokens are the same int8 codes
    k32, k16 = c32.read_kv("a", 1)[0], c16.read_kv("a", 1)[0]
    torch.testing.assert_close(k16[-6:], k32[-6:].half().float(), atol=0, rtol=0)
    torch.testing.assert_close(k16[:-6], k32[:-6], atol=0, rtol=0)
