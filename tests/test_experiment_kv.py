"""kv_compression experiment: a tiny config runs and returns the tidy columns the report uses."""
from __future__ import annotations

import pytest
import torch

# Tiny tensors on a shared 2-core machine: extra threads only spin.
torch.set_num_threads(1)

from ryzlab.config import ConfigError
from ryzlab.experiments import make_config, run_experiment

TINY = dict(model="random", context=32, batch=2, decode_steps=3, warmup=1, eval_windows=2, eval_len=48,
            eval_prefill=40, block_size=8, group_size=8)

COLUMNS = {"experiment", "sample", "tpot_ms", "prefill_ms", "kv_bytes_per_token", "ratio_vs_bf16", "cache_bytes",
           "max_tokens_in_budget", "kl_per_token", "ppl", "ppl_ref", "ppl_delta", "k_rel_err", "v_rel_err",
           "attn_rel_err", "device", "kernel", "codec", "key_granularity", "residual", "block_size", "context", "batch"}


@pytest.mark.parametrize("codec", ["none", "int4"])
def test_tiny_run_tidy_columns(codec, tmp_path):
    # per token and head: int4's default per-channel keys stage a block in full precision, which
    # dominates the bytes at this tiny context
    df = run_experiment("kv_compression", {**TINY, "codec": codec, "key_granularity": "token_head"}, tmp_path)
    assert COLUMNS <= set(df.columns), COLUMNS - set(df.columns)
    assert len(df) == 3 and (df.device == "cpu").all() and (df.kernel == "torch").all()
    assert (tmp_path / "metrics.parquet").exists()
    r = df.iloc[0]
    if codec == "none":
        assert r.kl_per_token == 0.0 and r.ppl_delta == 0.0 and r.top1_agree == 1.0  # it is the reference
        assert r.ppl_ref == pytest.approx(r.ppl_dense, rel=1e-5)  # and the reference is the model
        assert r.ratio_vs_bf16 > 2.0  # float32 model dtype, plus block padding
    else:
        assert r.kl_per_token > 0 and r.ratio_vs_bf16 < 0.5
    assert r.max_tokens_in_budget == int(1024 * 2**20 // r.kv_bytes_per_token)


def test_report_runs_headless(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from ryzlab.plots import kv_compression as plots

    shown = []
    monkeypatch.setattr(plots, "show_table", lambda df, caption=None: shown.append(df))
    df = run_experiment("kv_compression", {**TINY, "codec": "int8"})
    plots.report(df)
    assert shown and "tpot_ms_p50" in shown[0].columns


@pytest.mark.parametrize("codec", ["none", "int4"])
def test_loaded_checkpoint_as_model(codec, tmp_path):
    """``model`` = a Hugging Face folder, ``text`` = a file: tokenized with the checkpoint's tokenizer."""
    import tiny_checkpoints as tc

    tc.save_hf(tmp_path / "m", "llama")
    text = tmp_path / "t.txt"
    text.write_text("".join(tc.TEXT) * 40)
    df = run_experiment("kv_compression", {**TINY, "model": str(tmp_path / "m"), "text": str(text), "codec": codec})
    r = df.iloc[0]
    assert r.model == str(tmp_path / "m") and r.model_name == "m" and r.model_dtype == "float32"
    assert r.model_params == 82240 and r.tokens_scored == 2 * 8
    assert (r.kl_per_token == 0.0) == (codec == "none") and 0 < r.top1_agree <= 1
    bf16 = run_experiment("kv_compression", {**TINY, "model": str(tmp_path / "m"), "codec": codec, "dtype": "bfloat16",
                                             "eval_windows": 0})
    assert bf16.model_dtype.iloc[0] == "bfloat16"
    if codec == "none":  # the uncompressed cache stores the model dtype: half the float32 bytes
        assert bf16.kv_bytes_per_token.iloc[0] == pytest.approx(r.kv_bytes_per_token / 2, rel=0.05)


def test_invalid_config_names_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        make_config("kv_compression", {"codec": "int5"})
    with pytest.raises(ConfigError, match="peer='quanto_int4' runs on a transformers model"):
        make_config("kv_compression", {"peer": "quanto_int4"})
    with pytest.raises(ConfigError, match="layer_codecs has 1 entries"):
        make_config("kv_compression", {"layer_codecs": ["int4"]})
    from ryzlab.experiments.kv_compression import Config, run

    with pytest.raises(ValueError, match="valid group sizes"):  # checked once the model is known
        run(Config(model="random", codec="int4", key_granularity="group", group_size=5))
    with pytest.raises(ConfigError, match="eval_prefill"):
        make_config("kv_compression", {"eval_prefill": 300, "eval_len": 256})
    with pytest.raises(ConfigError, match="no such file or folder") as e:  # before any work
        make_config("kv_compression", {"model": "/no/such/checkpoint"})
    assert "'reference', 'random', a Hugging Face folder" in str(e.value)
    with pytest.raises(ConfigError, match="text='/no/such.txt': no such file"):
        make_config("kv_compression", {"text": "/no/such.txt"})
    with pytest.raises(ConfigError, match="choose one of 'auto', 'float32', 'bfloat16', 'float16'"):
        make_config("kv_compression", {"dtype": "int8"})
    with pytest.raises(ConfigError, match="choose one of 'auto', 'torch', 'triton'"):
        make_config("kv_compression", {"kernel": "cuda"})


def test_report_draws_peers_on_the_pareto_axes_and_names_model_and_text(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from ryzlab.plots import kv_compression as plots

    captions, figs = [], []
    monkeypatch.setattr(plots, "show_table", lambda df, caption=None: captions.append(caption))
    monkeypatch.setattr(plots, "show_figure", lambda fig, alt=None: figs.append(fig))
    base = dict(device="cpu", key_granularity="channel", value_granularity="token_head", group_size=32,
                symmetric=True, residual=0, block_size=16, rotation="none", layer_codecs=(), model_name="smollm2",
                text="t.txt", context=512, batch=2, tpot_ms=1.0, kv_bytes_per_token=1.0)
    rows = [dict(base, codec="int8", peer="", ratio_vs_bf16=0.52, kl_per_token=0.001, ppl_delta=0.0),
            dict(base, codec="int4", peer="", ratio_vs_bf16=0.27, kl_per_token=0.02, ppl_delta=0.1, rotation="hadamard"),
            dict(base, codec="int2", peer="", ratio_vs_bf16=0.2, kl_per_token=0.1, ppl_delta=0.5,
                 layer_codecs=("int4", "int2")),
            dict(base, codec="int8", peer="quanto_int4", ratio_vs_bf16=0.3, kl_per_token=0.03, ppl_delta=0.3)]
    plots.report(pd.DataFrame(rows))
    ax = figs[0].axes[0]
    assert "model=smollm2" in ax.get_title() and "text=t.txt" in ax.get_title()
    labels = {t.get_text() for t in ax.texts}
    assert "HF quanto int4 (peer)" in labels and any("rot" in x for x in labels)
    assert any(x.startswith("mixed 1xint4+1xint2") for x in labels)
    assert {"ryzlab layouts", "peer caches", "ryzlab Pareto front"} <= {t.get_text() for t in ax.get_legend().texts}
    front = [line for line in ax.lines if line.get_label() == "ryzlab Pareto front"][0]
    assert list(front.get_xdata()) == [0.2, 0.27, 0.52]  # the peer is not part of ryzlab's front
    assert "model=smollm2" in captions[0]


# slow (issue 24: ~200 s on a loaded machine, transformers + optimum-quanto on a checkpoint): `make test-slow`
@pytest.mark.slow
def test_peer_point_on_a_checkpoint(tmp_path):
    """peer=quanto_int4: optimum-quanto's QuantizedCache on the transformers model of the same folder."""
    pytest.importorskip("optimum.quanto")
    import tiny_checkpoints as tc

    tc.save_hf(tmp_path / "m", "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64
    df = run_experiment("kv_compression", {**TINY, "model": str(tmp_path / "m"), "peer": "quanto_int4",
                                           "context": 16, "eval_len": 24, "eval_prefill": 16})
    r = df.iloc[0]
    assert r.peer == "quanto_int4" and r.model_name == "m" and r.text == "heldout-stdlib" and len(df) == 3
    assert r.kl_per_token > 0 and 0 < r.top1_agree <= 1 and r.tokens_scored == 2 * 8
    # the prefill is quantised (4-bit + scale/shift per 64 values), the decoded tokens stay float32 (2x bf16)
    assert 0.3 < r.ratio_vs_bf16 < 1.0


# ----------------------------------------------------------------------------- layout labels (issue 23.1)
LAYOUTS = [  # every layout the kv_compression experiment accepts, as a row would hold it -> its label
    (dict(codec="none"), "none"),
    (dict(codec="fp8_e4m3"), "fp8_e4m3"),
    (dict(codec="fp8_e5m2"), "fp8_e5m2"),
    (dict(codec="int8"), "int8"),
    (dict(codec="int4"), "int4 k=channel"),  # KIVI: keys per channel (key_granularity auto)
    (dict(codec="int4", key_granularity="token_head", rotation="hadamard"), "int4 rot"),
    (dict(codec="int2", key_granularity="token_head", rotation="hadamard", symmetric=False, residual=64),
     "int2 r64 asym rot"),
    (dict(codec="int4", layer_codecs=("int4", "int2")), "mixed 1xint4+1xint2 k=channel"),
    (dict(codec="int8", peer="quanto_int4"), "HF quanto int4 (peer)"),
]
ROW = dict(key_granularity="auto", value_granularity="token_head", group_size=32, symmetric=True, residual=0,
           block_size=16, rotation="none", layer_codecs=(), peer="")


@pytest.mark.parametrize("fields,label", LAYOUTS, ids=[x[1] for x in LAYOUTS])
def test_every_layout_gets_its_own_label_from_one_function(fields, label):
    from ryzlab.plots.kv_compression import layout_name

    assert layout_name({**ROW, **fields}) == label


@pytest.mark.parametrize("stored", [(), [], "", "()", "[]", float("nan"), None])
def test_an_empty_layer_codecs_in_any_stored_form_is_not_mixed_precision(stored):
    """Old runs wrote str(()) == "()": the label said `mixed 1x() ...` for every layout."""
    from ryzlab.plots.kv_compression import layout_name

    assert layout_name({**ROW, "codec": "int8", "layer_codecs": stored}) == "int8"
    assert layout_name({**ROW, "codec": "int4", "layer_codecs": "('int4', 'int2')"}).startswith("mixed 1xint4+1xint2")


def test_parameters_keep_their_types_from_config_to_parquet(tmp_path):
    """A tuple parameter is a tuple in the DataFrame and after metrics.parquet is read back (was its str())."""
    from ryzlab.io import read_parquet
    from ryzlab.plots.kv_compression import summarize

    df = run_experiment("kv_compression", {**TINY, "codec": "int8", "eval_windows": 0, "decode_steps": 1,
                                           "layer_codecs": ["int8", "int4"]}, tmp_path)
    assert df["layer_codecs"].iloc[0] == ("int8", "int4") and df["residual"].dtype.kind == "i"
    back = read_parquet(tmp_path / "metrics.parquet")
    assert back["layer_codecs"].iloc[0] == ("int8", "int4") and back["residual"].dtype.kind == "i"
    assert summarize(back)["layout"].iloc[0].startswith("mixed 1xint8+1xint4")
    empty = run_experiment("kv_compression", {**TINY, "codec": "int8", "eval_windows": 0, "decode_steps": 1},
                           tmp_path / "e")
    assert empty["layer_codecs"].iloc[0] == () == read_parquet(tmp_path / "e" / "metrics.parquet")["layer_codecs"].iloc[0]
    assert summarize(empty)["layout"].iloc[0] == "int8 bs8"  # TINY pages hold 8 tokens


def test_cache_fields_are_declared_once():
    """The experiment's cache layout is CacheConfig's own group of fields (QuantFields), not a copy:
    same names, types and defaults, and every one reaches the cache it builds."""
    import dataclasses
    import typing

    from ryzlab.config import CacheConfig, QuantFields, field_names
    from ryzlab.experiments.kv_compression import Config

    assert issubclass(Config, QuantFields) and issubclass(CacheConfig, QuantFields)
    group = field_names(QuantFields)
    assert set(group) <= set(field_names(Config)) and set(group) <= set(field_names(CacheConfig))
    hints = typing.get_type_hints(Config)
    assert all(hints[n] == typing.get_type_hints(CacheConfig)[n] for n in group)
    cfg = make_config("kv_compression", {**TINY, "codec": "int4", "residual": 16, "symmetric": False,
                                         "rotation": "hadamard", "layer_codecs": ["int4", "int8"]})
    cache = cfg.cache_config()
    assert {n: getattr(cache, n) for n in group if n != "key_granularity"} == \
        {n: getattr(cfg, n) for n in group if n != "key_granularity"}
    assert cache.key_granularity == "channel" and cfg.key_granularity == "auto"  # resolved by the cache only
    assert Config().codec == "int8" and dataclasses.fields(Config)[0].name == "codec"
