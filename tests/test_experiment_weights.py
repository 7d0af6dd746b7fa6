"""The weight_compression experiment: weights x KV codec rows on a tiny random model, its refusals and key result."""
from __future__ import annotations

import pytest

from ryzlab.experiments import make_config, run_experiment
from ryzlab.experiments.weight_compression import TINY
from ryzlab.models.quant import model_weight_bytes

SMALL = {"model": "random", "context": 32, "decode_steps": 3, "warmup": 1, "eval_windows": 1, "eval_len": 64,
         "eval_prefill": 32}


@pytest.fixture(scope="module")
def rows():
    import pandas as pd

    return pd.concat([run_experiment("weight_compression", {**SMALL, "weights": w, "codec": c})
                      for w, c in [("float32", "none"), ("int4-g32", "none"), ("int4-g32", "int4")]])


def test_rows_carry_ledger_bytes_accuracy_and_kernel(rows):
    f32, w4, w4kv4 = (rows[(rows.weights == w) & (rows.codec == c)] for w, c in
                      [("float32", "none"), ("int4-g32", "none"), ("int4-g32", "int4")])
    assert len(w4) == 3 and (w4.weight_bytes == model_weight_bytes(TINY, "int4-g32")["total"]).all()
    assert f32.weight_bytes.iloc[0] == model_weight_bytes(TINY, "float32")["total"]
    assert f32.kl_per_token.iloc[0] < 1e-9 and f32.top1_agree.iloc[0] == 1.0   # the reference itself
    assert 0 < w4.kl_per_token.iloc[0] < w4kv4.kl_per_token.iloc[0]              # KV compression adds error
    assert w4kv4.kv_bytes_per_token.iloc[0] < w4.kv_bytes_per_token.iloc[0]
    assert w4.kernel.iloc[0] == "aten._weight_int4pack_mm_for_cpu" and (w4.tpot_ms > 0).all()


def test_key_result_names_the_smallest_point_within_budget(rows):
    from ryzlab.plots.summary import key_results

    (row,) = key_results("weight_compression", rows)
    assert "fewest weight bytes within perplexity +1%" in row["result"]
    assert "weights" in row["value"] and "measured" in row["basis"]


def test_bad_points_are_refused_before_running():
    with pytest.raises(ValueError, match="int4 group sizes that fit this model at tp=1: int4-g32, int4-g64"):
        make_config("weight_compression", {**SMALL, "weights": "int4-g128"})
    with pytest.raises(ValueError, match="model must be a .gguf file"):
        make_config("weight_compression", {**SMALL, "weights": "gguf"})
    with pytest.raises(ValueError, match="is not a weight format"):
        make_config("weight_compression", {**SMALL, "weights": "int5"})


def test_kv_compression_runs_on_packed_weights_and_refuses_a_misfit():
    with pytest.raises(ValueError, match="int4-g128 does not fit"):
        make_config("kv_compression", {"model": "random", "weights": "int4-g128"})
    df = run_experiment("kv_compression", {"model": "random", "weights": "int8", "codec": "int4", "context": 32,
                                           "decode_steps": 2, "eval_windows": 1, "eval_len": 64, "eval_prefill": 32})
    assert (df.weights == "int8").all() and 0 < df.kl_per_token.iloc[0] < 0.5
