"""The scaling experiment runs the model over tp x cp ranks: rows, formulas, capacity, exactness."""
import pytest
import torch

from ryzlab.config import ConfigError
from ryzlab.experiments import run_experiment

SMALL = {"codec": "int8", "context": 96, "batch": 2, "decode_steps": 2, "warmup": 1, "budget_mib": 0.06,
         "prefill_chunk": 64}


@pytest.fixture(scope="module")
def points():
    return {(tp, cp): run_experiment("scaling", {**SMALL, "tp": tp, "cp": cp}) for tp, cp in ((1, 1), (2, 1), (1, 2))}


def test_rows_measure_what_the_formulas_say(points):
    for (tp, cp), df in points.items():
        assert len(df) == 2 and set(df["device"]) == {"cpu"} and set(df["backend"]) == {"gloo"}
        assert set(df["kernel"]) == {"torch"}  # the attention path that ran (CPU: torch)
        r = df.iloc[0]
        assert r["layout"] == f"tp{tp}xcp{cp}" and r["world_size"] == tp * cp
        assert r["nodes"] == 1 and r["interconnect"] == "loopback"  # launch(): one host
        assert r["comm_bytes_per_step_tp"] == r["comm_formula_per_step_tp"] == (4 * 2 * 2 * 256 * 4 if tp > 1 else 0)
        assert r["comm_bytes_per_step_cp"] == r["comm_formula_per_step_cp"] == (4 * 2 * 8 * 33 * 4 if cp > 1 else 0)
        assert r["collectives_per_step"] == 4 * (2 * (tp > 1) + (cp > 1))
        assert r["logits_rel_err_vs_ws1"] <= (0.0 if tp * cp == 1 else 1e-5)
        assert r["prefill_ms"] > 0 and (df["step_ms"] > 0).all()


def test_memory_per_rank_splits_and_capacity_grows(points):
    one, tp2, cp2 = points[(1, 1)].iloc[0], points[(2, 1)].iloc[0], points[(1, 2)].iloc[0]
    assert tp2["weight_bytes_sharded_per_rank"] == one["weight_bytes_sharded_per_rank"] / 2
    assert tp2["weight_bytes_replicated_per_rank"] == one["weight_bytes_replicated_per_rank"] > 0
    assert "tok_embeddings.weight" in tp2["weights_replicated"]
    assert cp2["weight_bytes_per_rank"] == one["weight_bytes_per_rank"]
    meta = 4 * (2 * 7) + 4 * 2  # int32 block-table entries (2 sequences x 7 blocks) + lengths: on every rank
    assert tp2["kv_bytes_per_rank"] == (one["kv_bytes_per_rank"] - meta) / 2 + meta   # half the KV heads each
    assert cp2["kv_bytes_per_rank"] < one["kv_bytes_per_rank"]       # a share of the blocks each
    assert one["largest_context"] > 0
    assert cp2["largest_context"] >= 1.9 * one["largest_context"]
    assert tp2["largest_context"] >= 1.9 * one["largest_context"]


def test_efficiency_uses_the_world_size_one_point(points):
    import pandas as pd

    from ryzlab.experiments.scaling import scaling_efficiency

    s = scaling_efficiency(pd.concat(points.values()))
    assert s.set_index("layout").loc["tp1xcp1", "speedup"] == 1.0
    assert s["context_gain"].notna().all() and s.set_index("layout").loc["tp1xcp2", "context_gain"] >= 1.9


def test_shared_memory_collectives_give_the_same_rows(points):
    """cpu_comm='shm': the same logits as one rank, the same counted bytes and collectives as gloo,
    nothing on the sockets during decode; the rows name the transport that carried them."""
    for tp, cp in ((2, 1), (1, 2)):
        df = run_experiment("scaling", {**SMALL, "tp": tp, "cp": cp, "cpu_comm": "shm"})
        r, g = df.iloc[0], points[(tp, cp)].iloc[0]
        assert r["comm_transport"] == "shm" and g["comm_transport"] == "gloo"
        assert r["logits_rel_err_vs_ws1"] <= 1e-5
        for k in ("comm_bytes_per_step", "collectives_per_step", "largest_context"):
            assert r[k] == g[k], k
        assert r["comm_wire_bytes_per_step"] == 0 < g["comm_wire_bytes_per_step"]
    assert run_experiment("scaling", {**SMALL, "cpu_comm": "shm"}).iloc[0]["comm_transport"] == "none"


def _must_not_run(*a, **k):
    raise AssertionError("a process group started for an invalid layout")


@pytest.mark.parametrize("values, needle", [
    ({"tp": 3}, "valid tp sizes: [1, 2, 4, 8]"),
    ({"tp": 2, "codec": "int9"}, "'int8'"),
    ({"cp": 0}, "cp must be > 0"),
    ({"model": "/nonexistent/model.safetensors"}, "'reference'"),
    ({"tp": 2, "cpu_comm": "tcp"}, "cpu_comm='tcp' is not valid; choose one of 'gloo', 'shm'"),
])
def test_invalid_points_fail_before_any_process(values, needle, monkeypatch):
    import ryzlab.experiments.scaling as scaling

    monkeypatch.setattr(scaling, "launch", _must_not_run)
    with pytest.raises((ConfigError, ValueError)) as e:
        run_experiment("scaling", values)
    assert needle in str(e.value)
    assert not torch.distributed.is_initialized()


def test_layout_and_page_fields_are_the_configs_own():
    """tp / cp / backend are ParallelConfig's fields (with its validation), the page format is
    CodecFields: declared once in ryzlab/config.py."""
    from ryzlab.config import CodecFields, ParallelConfig, field_names
    from ryzlab.experiments.scaling import Config

    assert issubclass(Config, ParallelConfig) and issubclass(Config, CodecFields)
    assert {"tp", "cp", "backend", "codec", "value_granularity", "block_size"} <= set(field_names(Config))
    cfg = Config(tp=2, cp=2, backend="gloo")
    assert cfg.world_size == 4 and cfg.parallel() == ParallelConfig(tp=2, cp=2, backend="gloo")
    assert Config().key_granularity == "token_head"  # no "auto" here: every codec on the same scales
    with pytest.raises(ValueError, match="backend"):
        Config(backend="mpi")


def _point(layout: str, tp: int, cp: int, threads: int, tokens_per_s: float, largest_context: int = 100) -> dict:
    return {"device": "cpu", "model": "reference", "codec": "int8", "key_granularity": "auto", "context": 512,
            "batch": 4, "budget_mib": 0.25, "layout": layout, "tp": tp, "cp": cp, "world_size": tp * cp,
            "threads": threads, "tokens_per_s": tokens_per_s, "step_ms": 1.0, "prefill_ms": 1.0,
            "largest_context": largest_context, "kv_bytes_per_rank": 1, "weight_bytes_per_rank": 1,
            "comm_bytes_per_step": 0, "comm_formula_per_step": 0, "logits_rel_err_vs_ws1": 0.0}


def test_speedup_only_at_equal_total_threads():
    """2 ranks x 1 thread is compared with 1 rank x 2 threads, never with 1 rank x 1 thread; without
    such a point the speedup is NaN and the note says why (constructed rows)."""
    import pandas as pd

    from ryzlab.experiments.scaling import scaling_efficiency

    rows = [_point("tp1xcp1", 1, 1, 1, 100.0), _point("tp1xcp1", 1, 1, 2, 160.0),
            _point("tp2xcp1", 2, 1, 1, 180.0, 200)]
    s = scaling_efficiency(pd.DataFrame(rows))
    tp2 = s[s["layout"] == "tp2xcp1"].iloc[0]
    assert tp2["tokens_per_s_ws1"] == 160.0 and tp2["speedup"] == 180.0 / 160.0
    assert tp2["scaling_efficiency"] == 180.0 / 160.0 / 2 and tp2["speedup_note"] == ""
    assert len(s[s["layout"] == "tp1xcp1"]) == 2  # thread counts are not pooled into one median
    only_one_thread = scaling_efficiency(pd.DataFrame([rows[0], rows[2]]))
    tp2 = only_one_thread[only_one_thread["layout"] == "tp2xcp1"].iloc[0]
    assert pd.isna(tp2["speedup"]) and pd.isna(tp2["scaling_efficiency"])
    assert "no 1-rank point with 2 threads" in tp2["speedup_note"]
    assert tp2["context_gain"] == 2.0  # capacity does not depend on threads


@pytest.mark.parametrize("weights", ["int4-g32", "ternary"])
def test_packed_weights_each_rank_packs_its_shard_bytes_from_the_ledger(weights):
    """tp=2 on gloo ranks with packed weights: every byte column is the weight ledger's, measured on the
    rank's packed shard and equal to the ledger's formula from shapes; not parameters x dtype size."""
    from ryzlab.models.loader import check_model
    from ryzlab.models.quant import model_weight_bytes

    small = {**SMALL, "codec": "none", "budget_mib": 0.0, "context": 32, "prefill_chunk": 32}
    r = run_experiment("scaling", {**small, "tp": 2, "weights": weights}).iloc[0]
    cfg = check_model("reference").config
    per_rank = [model_weight_bytes(cfg, weights, tp=2, rank=k) for k in range(2)]
    assert r["weights"] == weights and r["weight_kernels"]
    assert r["weight_bytes_per_rank"] == r["weight_bytes_formula_per_rank"] == max(x["total"] for x in per_rank)
    assert r["weight_bytes_total"] == sum(x["total"] for x in per_rank)
    assert r["weight_bytes_sharded_per_rank"] + r["weight_bytes_replicated_per_rank"] == r["weight_bytes_per_rank"]
    assert r["weight_bytes_replicated_per_rank"] == per_rank[0]["tables"] + (2 * 4 + 1) * 256 * 4  # + norms
    assert r["weight_bytes_per_rank"] < 0.35 * model_weight_bytes(cfg, "float32", tp=2)["total"]
    assert 0 < r["logits_rel_err_vs_ws1"] < 0.1   # the one-rank reference packs whole rows: scales differ a little


@pytest.mark.parametrize("values, needle", [
    ({"tp": 2, "weights": "int4-g64"}, "int4 group sizes that fit this model at tp=2: int4-g32"),
    ({"weights": "int5"}, "not a weight format"),
    ({"weights": "gguf"}, "not a .gguf file"),
    ({"weights": "int8", "backend": "nccl"}, "packed weight kernels run on CPU"),
])
def test_bad_weight_formats_fail_before_any_process(values, needle, monkeypatch):
    import ryzlab.experiments.scaling as scaling

    monkeypatch.setattr(scaling, "launch", _must_not_run)
    with pytest.raises((ConfigError, ValueError)) as e:
        run_experiment("scaling", values)
    assert needle in str(e.value)
    assert not torch.distributed.is_initialized()
