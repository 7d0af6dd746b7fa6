"""Accuracy harness: zero error for codec none, error ordered by bits, harness on an HF model."""
from __future__ import annotations

import pytest
import torch

# Tiny tensors on a shared 2-core machine: extra threads only spin (measured 85 s -> 23 s for
# test_model.py with one thread).
torch.set_num_threads(1)

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.evaluation.accuracy import capture_qkv, evaluate, evaluate_hf, reconstruction_error
from ryzlab.models.transformer import Transformer

TINY = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(TINY).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def test_capture_qkv_matches_dense_cache(model, tokens):
    from ryzlab.models.transformer import DenseKVCache

    qkv = capture_qkv(model, tokens)
    cache = DenseKVCache(TINY.n_layers)
    with torch.no_grad():
        model(tokens, cache=cache)
    for layer, (q, k, v) in enumerate(qkv):
        assert q.shape == (2, 24, TINY.n_heads, TINY.head_dim)
        torch.testing.assert_close(k, cache.keys[layer])
        torch.testing.assert_close(v, cache.values[layer])


def test_metrics_zero_for_none_and_ordered_by_bits(model, tokens):
    # per token and head for every codec (int4's default, per-channel keys, would stage a block in full precision)
    cfgs = [CacheConfig(codec=c, block_size=4, key_granularity="token_head") for c in ("none", "int8", "fp8_e4m3", "int4")]
    df = evaluate(model, cfgs, tokens, prefill=16).set_index("codec")
    for col in ("k_rel_err", "v_rel_err", "attn_rel_err"):  # storage is exact
        assert df.loc["none", col] == 0.0, col
    # the reference is the uncompressed cache itself: codec none is it, exactly
    assert df.loc["none", "kl_per_token"] == 0.0 and df.loc["none", "rel_logit_err"] == 0.0
    assert df.loc["none", "top1_agree"] == 1.0 and df.loc["none", "ppl"] == df.loc["none", "ppl_ref"]
    # ... and the uncompressed paged decode is the model: dense forward, float rounding only
    assert df.loc["none", "ppl_ref"] == pytest.approx(df.loc["none", "ppl_dense"], rel=1e-5)
    assert (df.ppl_ref == df.ppl_ref.iloc[0]).all()  # one reference for every layout
    assert df.loc["int8", "top1_agree"] >= df.loc["int4", "top1_agree"] > 0.5
    assert df.loc["int4", "kv_bytes_per_token"] < df.loc["int8", "kv_bytes_per_token"] < df.loc["none", "kv_bytes_per_token"]
    # int8 (8 bits) < fp8 e4m3 (3 mantissa bits) < int4 (15 levels) on Gaussian-like K/V
    for col in ("k_rel_err", "v_rel_err", "attn_rel_err", "kl_per_token"):
        assert df.loc["int8", col] < df.loc["fp8_e4m3", col] < df.loc["int4", col], col
    assert df.loc["int8", "k_rel_err"] < 0.01 and df.loc["int4", "k_rel_err"] < 0.2
    assert (df.tokens_scored == 2 * (24 - 16)).all()


def test_residual_window_is_exact(model, tokens):
    """With residual >= sequence length every token is read at full precision."""
    qkv = capture_qkv(model, tokens)
    err = reconstruction_error(TINY, CacheConfig(codec="int4", residual=24, block_size=4), qkv)
    assert err["k_rel_err"] == 0.0 and err["attn_rel_err"] == 0.0
    part = reconstruction_error(TINY, CacheConfig(codec="int4", residual=8, block_size=4), qkv)
    full = reconstruction_error(TINY, CacheConfig(codec="int4", block_size=4), qkv)
    assert 0 < part["k_rel_err"] < full["k_rel_err"]


def test_prefill_out_of_range(model, tokens):
    from ryzlab.evaluation.accuracy import teacher_forced

    with pytest.raises(ValueError, match="prefill"):
        teacher_forced(model, tokens, CacheConfig(codec="int8"), prefill=24)


def test_hf_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)  # a local checkpoint path, as a user would pass
    toks = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    df = evaluate_hf(tmp_path, [{"codec": "none"}, {"codec": "int8", "block_size": 4},
                                {"codec": "int4", "block_size": 4, "key_granularity": "token_head"}], toks,
                       prefill=12).set_index("codec")
    # full forward vs incremental decode: float rounding only
    assert df.loc["none", "kl_per_token"] < 1e-6 and df.loc["none", "k_rel_err"] == 0.0
    assert 0 < df.loc["int8", "kl_per_token"] < df.loc["int4", "kl_per_token"]
    assert df.loc["int4", "cache_total"] < df.loc["int8", "cache_total"] < df.loc["none", "cache_total"]


def test_cli_any_model_on_a_text_file(tmp_path, capsys):
    """``python -m ryzlab.evaluation.accuracy --model FOLDER --text FILE``: ryzlab's Transformer + paged cache on
    a loaded checkpoint, windows tokenized with its own tokenizer; ``--hf`` still works."""
    import tiny_checkpoints as tc

    from ryzlab.evaluation.accuracy import main

    tc.save_hf(tmp_path / "m", "qwen2")
    text = tmp_path / "t.txt"
    text.write_text("".join(tc.TEXT) * 40)
    df = main(["--model", str(tmp_path / "m"), "--text", str(text), "--layout", "none", "--layout",
               "int4,key_granularity=channel", "--layout", "int8,block_size=4", "--windows", "2", "--length", "40",
               "--prefill", "24"]).set_index("layout")
    out = capsys.readouterr().out
    assert "model=m (hf, Qwen2ForCausalLM" in out and "text=" + str(text) in out
    assert list(df.index) == ["none", "int4 k=channel", "int8 bs4"] and (df.tokens_scored == 2 * 16).all()
    assert df.loc["none", "kl_per_token"] == 0.0 and df.loc["none", "ppl_ref"] == pytest.approx(
        df.loc["none", "ppl_dense"], rel=1e-5)
    assert df.loc["int8 bs4", "kl_per_token"] < df.loc["int4 k=channel", "kl_per_token"]
    assert df.loc["int8 bs4", "ratio_vs_bf16"] < 1.0 < df.loc["none", "ratio_vs_bf16"]  # float32 model: none is 2x bf16
    hf = main(["--hf", str(tmp_path / "m"), "--text", str(text), "--codecs", "int8", "--windows", "1", "--length", "32",
               "--prefill", "16", "--no-reconstruction"])
    assert hf.model.iloc[0] == "m" and "k_rel_err" not in hf


def test_cli_rejects_bad_input_before_loading(capsys):
    from ryzlab.evaluation.accuracy import main

    for argv, msg in ((["--model", "/no/such/model"], "no such file"), (["--layout", "int5"], "choose one of"),
                      (["--layout", "int4,layer_codecs=int4"], "layer_codecs has 1 entries"),
                      (["--rotation", "bogus", "--layout", "int4"], "'none', 'hadamard', 'hadamard_signs'"),
                      (["--layout", "int4,group=8"], "unknown parameter 'group'"),
                      (["--prefill", "600"], "--prefill 600")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_hf_path_takes_a_gguf_file(tmp_path):
    """evaluate_hf(path.gguf): transformers loads it with gguf_file= (it used to call from_pretrained(path))."""
    import tiny_checkpoints as tc

    from ryzlab.evaluation.accuracy import hf_heldout_tokens

    hf = tc.hf_model("llama")
    path = tc.write_gguf(tmp_path / "tiny.gguf", hf, tc.bpe_tokenizer(), {"": "F32"})
    toks = hf_heldout_tokens(path, 1, 20)
    assert toks.shape == (1, 20) and int(toks.max()) < hf.config.vocab_size
    df = evaluate_hf(path, [{"codec": "none"}, {"codec": "int8"}], toks, prefill=12).set_index("codec")
    # the int8 cache moves the logits, the uncompressed one does not (its KL on this tiny model is
    # within float32 noise of 0, either sign, on some CPUs: the logits' error is the robust measure)
    none, int8 = df.loc["none"], df.loc["int8"]
    assert abs(none["kl_per_token"]) < 1e-6 and none["rel_logit_err"] < 1e-5
    assert int8["rel_logit_err"] > max(10 * none["rel_logit_err"], 1e-5)
