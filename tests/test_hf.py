"""RyzlabCache on a tiny random HF Llama: equality with DynamicCache (codec none), generate, ledger."""
from __future__ import annotations

import dataclasses

import pytest
import torch

# Tiny tensors on a shared 2-core machine: extra threads only spin (measured 85 s -> 23 s for
# test_model.py with one thread).
torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from ryzlab.config import ConfigError  # noqa: E402
from ryzlab.kv.hf import LEDGER_KEYS, RyzlabCache, model_config_from_hf  # noqa: E402

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))


def greedy(model, ids, cache, n=10):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, cache=cache)


def test_codec_none_greedy_equals_dynamic_cache(model, ids):
    ref = greedy(model, ids, DynamicCache(config=CFG))
    for bs in (4, 16):
        assert torch.equal(greedy(model, ids, RyzlabCache(CFG, codec="none", block_size=bs)), ref)


@torch.no_grad()
def test_codec_none_forward_logits_equal(model, ids):
    d, r = DynamicCache(config=CFG), RyzlabCache(CFG, codec="none", block_size=4)
    for sl in (slice(0, 7), slice(7, 8), slice(8, 11)):  # prefill, decode, chunk
        a = model(ids[:, sl], cache=d).logits
        b = model(ids[:, sl], cache=r).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert r.get_seq_length() == 11


@pytest.mark.parametrize("codec,opts", [("int4", {"key_granularity": "channel", "residual": 8}),
                                        ("int4", {"value_granularity": "group", "group_size": 8}),
                                        ("fp8_e4m3", {}), ("int8", {"block_size": 4})])
def test_generate_with_compressed_codecs(model, ids, codec, opts):
    cache = RyzlabCache(CFG, codec=codec, **opts)
    out = greedy(model, ids, cache, n=6)
    assert out.shape == (2, 17)
    led = cache.ledger()
    assert set(LEDGER_KEYS) <= set(led)
    assert led["total"] == pytest.approx(sum(led[k] for k in LEDGER_KEYS if k != "total"))
    assert led["tokens"] == 2 * 16  # the last generated token is never fed back


@torch.no_grad()
def test_compressed_logits_close_and_smaller(model, ids):
    base = model(ids, cache=DynamicCache(config=CFG)).logits.log_softmax(-1)
    errs, totals = {}, {}
    for codec in ("int8", "fp8_e4m3", "int4"):
        c = RyzlabCache(CFG, codec=codec, block_size=4)
        lp = model(ids, cache=c).logits.log_softmax(-1)
        errs[codec] = torch.nn.functional.kl_div(lp, base, log_target=True, reduction="none").sum(-1).mean().item()
        totals[codec] = c.ledger()["payload"]
    assert errs["int8"] < 1e-3 and errs["int4"] < 0.05
    assert totals["int4"] < totals["int8"] == totals["fp8_e4m3"]


def test_beam_search_codec_none_matches_default(model, ids):
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, cache=RyzlabCache(CFG, codec="none"), **kw))


def test_invalid_options_name_valid_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        RyzlabCache(CFG, codec="int5")
    with pytest.raises(ConfigError, match="valid parameters"):
        RyzlabCache(CFG, codec="int8", blocksize=4)
    with pytest.raises(ValueError, match="valid group sizes"):
        RyzlabCache(CFG, codec="int4", key_granularity="group", group_size=5)


def test_empty_ledger_and_reset(model, ids):
    c = RyzlabCache(CFG, codec="int8")
    assert c.ledger()["total"] == 0.0
    with torch.no_grad():
        model(ids, cache=c)
    assert c.ledger()["total"] > 0
    c.reset()
    assert c.get_seq_length() == 0 and c.ledger()["tokens"] == 0


@torch.no_grad()
@pytest.mark.parametrize("codec", ["int4", "fp8_e4m3"])
def test_fill_from_dynamic_equals_model_prefill(model, ids, codec):
    """benchmarks/kv_vs_hf.py stores a DynamicCache prefill into the other caches: same result."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("kv_vs_hf", Path(__file__).parents[1] / "benchmarks" / "kv_vs_hf.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dyn = DynamicCache(config=CFG)
    model(ids[:, :9], cache=dyn)
    a, b = RyzlabCache(CFG, codec=codec, block_size=4), RyzlabCache(CFG, codec=codec, block_size=4)
    model(ids[:, :9], cache=a)
    bench.fill_from(b, dyn)
    assert a.ledger() == b.ledger()
    torch.testing.assert_close(model(ids[:, 9:10], cache=a).logits, model(ids[:, 9:10], cache=b).logits,
                               atol=0, rtol=0)


def test_default_codec_is_cache_configs():
    from ryzlab.config import CacheConfig

    assert RyzlabCache(CFG).cache_config == CacheConfig()


def _teacher_forced(m, ids, cache, prefill=8):
    out = [m(ids[:, :prefill], cache=cache).logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        out.append(m(ids[:, t:t + 1], cache=cache).logits[:, -1])
    return torch.stack(out, 1)


@torch.no_grad()
def test_rotation_keeps_the_uncompressed_path_and_rotated_attention_is_exact(ids):
    from ryzlab.kv.hf import _PENDING_ROTATION, use_rotated_attention

    torch.manual_seed(0)
    m = LlamaForCausalLM(CFG).eval()  # its own model: use_rotated_attention changes its attention
    ref = _teacher_forced(m, ids, DynamicCache(config=CFG))
    rot = dict(rotation="hadamard_signs", rotation_seed=7, block_size=4)
    fallback = _teacher_forced(m, ids, RyzlabCache(CFG, codec="none", **rot))  # K/V rotated back
    torch.testing.assert_close(fallback, ref, atol=1e-4, rtol=1e-4)
    q_fallback = _teacher_forced(m, ids, RyzlabCache(CFG, codec="int4", **rot))
    use_rotated_attention(m)
    assert m.config._attn_implementation == "ryzlab_sdpa"
    torch.testing.assert_close(_teacher_forced(m, ids, DynamicCache(config=CFG)), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_teacher_forced(m, ids, RyzlabCache(CFG, codec="none", **rot)), ref, atol=1e-4, rtol=1e-4)
    # q and the output rotated instead of every cached vector: the same numbers
    torch.testing.assert_close(_teacher_forced(m, ids, RyzlabCache(CFG, codec="int4", **rot)), q_fallback,
                               atol=1e-4, rtol=1e-4)
    assert _PENDING_ROTATION.get() is None  # every rotation asked for was consumed by its attention call
    # keys stored before RoPE (the model's RoPE undone, then redone at every read): still the model
    from ryzlab.kv.store import KeyRope
    from ryzlab.models.hf import rope_fields
    from ryzlab.models.transformer import apply_rope, rope_cos_sin, rope_inv_freq

    with pytest.raises(ValueError, match="pass rope=KeyRope"):  # the cache cannot know the model's RoPE
        RyzlabCache(CFG, codec="none", pre_rope_keys=True, **rot)
    mcfg = dataclasses.replace(model_config_from_hf(CFG), **rope_fields(CFG.to_dict(), "test"))
    rope = KeyRope(rope_inv_freq(mcfg), rope_cos_sin, apply_rope)
    pre = _teacher_forced(m, ids, RyzlabCache(CFG, codec="none", pre_rope_keys=True, rope=rope, **rot))
    torch.testing.assert_close(pre, ref, atol=1e-4, rtol=1e-4)


def test_peer_byte_counter_walks_tuples_lists_and_dicts():
    from types import SimpleNamespace

    from ryzlab.evaluation.peers import hf_cache_bytes

    a, b = torch.zeros(3, 4), torch.zeros(5, dtype=torch.int8)
    layer = SimpleNamespace(keys=(a, [b]), values={"x": a}, n=7, name="k")
    assert hf_cache_bytes(SimpleNamespace(layers=[layer, layer])) == 2 * (48 + 5 + 48)


def test_load_hf_causal_lm_names_what_it_accepts(tmp_path):
    from ryzlab.kv.hf import load_hf_causal_lm

    with pytest.raises(ValueError, match="no such .gguf file"):
        load_hf_causal_lm(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="neither a Hugging Face folder nor a .gguf file"):
        load_hf_causal_lm(tmp_path / "nothing")
