"""Sharded KV cache on real gloo ranks: equals the single-rank cache for every strategy and codec,
random write / evict / migrate / rebalance programs stay coherent, a full rank spills, world_size 1
runs the same code, and invalid layouts fail before any process starts."""
import random

import pytest
import torch

from ryzlab.config import STRATEGIES, CacheConfig, ConfigError, ModelConfig, ParallelConfig
from ryzlab.kv.cache import PagedKVCache
from ryzlab.kv.comm import Comm
from ryzlab.kv.layout import comm_bytes_formula
from ryzlab.kv.sharded import CoherencyError, ShardedKVCache
from ryzlab.orchestrator import launch

M = ModelConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)  # head_dim 16
D, HKV, HQ, L = M.head_dim, M.n_kv_heads, M.n_heads, M.n_layers
# codec, key granularity, value granularity: token-local, KIVI (staged channel keys), block-wide, groups
CASES = [("none", "token_head", "token_head"), ("int8", "token_head", "token_head"),
         ("int4", "channel", "token_head"), ("fp8_e4m3", "tensor", "tensor"), ("fp8_e5m2", "group", "group")]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _equivalence(rank, world, cases=CASES, steps=5):
    """Prefill 3 ragged sequences, decode ``steps`` steps; sharded vs single-rank PagedKVCache, per case."""
    comm = Comm()
    out = []
    for strategy in STRATEGIES:
        for codec, kg, vg in cases:
            if strategy == "heads" and "tensor" in (kg, vg) and world > 1:
                continue  # a tensor-wide scale over a shard's heads is not the single-rank scale
            cfg = CacheConfig(codec=codec, key_granularity=kg, value_granularity=vg, group_size=8, block_size=4)
            sc = ShardedKVCache(M, cfg, ParallelConfig(world_size=world, strategy=strategy), comm=comm)
            ref = PagedKVCache(M, cfg)
            g = torch.Generator().manual_seed(1)
            seqs, lens = [0, 1, 2], [5, 9, 14]
            for s in seqs:
                sc.add_sequence(s)
                ref.add_sequence(s, 0)
            sc.extend(seqs, lens)
            ref.extend(seqs, lens)
            for layer in range(L):
                k, v = torch.randn(sum(lens), HKV, D, generator=g), torch.randn(sum(lens), HKV, D, generator=g)
                sc.write(layer, k, v)
                ref.write(layer, k, v)
            comm.ledger.reset()
            err = 0.0
            for _ in range(steps):
                sc.extend(seqs, 1)
                ref.extend(seqs, [1, 1, 1])
                with comm.step("decode"):
                    for layer in range(L):
                        k, v = torch.randn(3, 1, HKV, D, generator=g), torch.randn(3, 1, HKV, D, generator=g)
                        q = torch.randn(3, HQ, D, generator=g)
                        sc.write(layer, k, v)
                        ref.write(layer, k, v)
                        err = max(err, _rel(sc.attend(layer, q), ref.attend(layer, q)))
                sc.check(cross_rank=True)
            per = comm.ledger.per_step("decode")
            out.append(dict(strategy=strategy, codec=codec, kg=kg, err=err, bytes=per["bytes_sent"] / L,
                            collectives=per["collectives"] / L,
                            formula=comm_bytes_formula(strategy, world_size=world, batch=3, n_heads=HQ, head_dim=D),
                            kv_total=sc.kv_bytes()["total"]))
    return out


def _random_program(rank, world, seed, codec, kg, n_ops=70):
    """Seeded random extend / evict / migrate / rebalance / free on a capacity-bound ``sequence`` cache.

    A one-rank reference (same writes, same evictions, no migrations) checks every decode.
    """
    cfg = CacheConfig(codec=codec, key_granularity=kg, block_size=4)
    comm = Comm()
    sc = ShardedKVCache(M, cfg, ParallelConfig(world_size=world, strategy="sequence"), comm=comm,
                        blocks_per_rank=max(2, 6 // world))
    ref = ShardedKVCache(M, cfg, ParallelConfig(world_size=1, strategy="replicated"), comm=Comm(local=True))
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    next_seq, err, counts = 0, 0.0, {"extend": 0, "full": 0, "evict": 0, "migrate": 0, "rebalance": 0, "free": 0}
    for _ in range(n_ops):
        live = sc.directory.sequences()
        op = rng.choice(["extend"] * 4 + ["evict", "migrate", "rebalance", "free", "new"])
        if op == "new" or not live:
            for c in (sc, ref):
                c.add_sequence(next_seq)
            next_seq += 1
            continue
        if op == "extend":
            seqs = sorted(rng.sample(live, rng.randint(1, len(live))))
            n = [rng.randint(1, 3) for _ in seqs]
            if sc.extend(seqs, n) is None:
                counts["full"] += 1
                continue
            counts["extend"] += 1
            ref.extend(seqs, n)
            for layer in range(L):
                k, v = torch.randn(sum(n), HKV, D, generator=g), torch.randn(sum(n), HKV, D, generator=g)
                sc.write(layer, k, v)
                ref.write(layer, k, v)
            alive = [s for s in seqs if sc.num_tokens(s)]
            for layer in range(L):
                q = torch.randn(len(alive), HQ, D, generator=g)
                err = max(err, _rel(sc.attend(layer, q, alive), ref.attend(layer, q, alive)))
        else:
            blocks = [b for s in live for b in sc.directory.blocks(s)]
            if op == "evict" and blocks:
                b = rng.choice(blocks)
                sc.evict(b)
                ref.evict(b)
                counts["evict"] += 1
            elif op == "migrate" and blocks and world > 1:
                b = rng.choice(blocks)
                dst = rng.choice([r for r in range(world) if r != sc.directory.entry(b).owner])
                counts["migrate"] += sc.migrate(b, dst) is not None
            elif op == "rebalance":
                counts["rebalance"] += len(sc.rebalance(max_moves=2))
            elif op == "free":
                s = rng.choice(live)
                sc.free_sequence(s)
                ref.free_sequence(s)
                counts["free"] += 1
        sc.check(cross_rank=True)
    # finally run the cache full: one sequence grows until no rank has room (expected shortage)
    for c in (sc, ref):
        c.add_sequence(next_seq)
    while sc.extend([next_seq], 3) is not None:
        ref.extend([next_seq], 3)
        for layer in range(L):
            k, v = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g)
            sc.write(layer, k, v)
            ref.write(layer, k, v)
    counts["full"] += 1
    q = torch.randn(1, HQ, D, generator=g)
    err = max(err, _rel(sc.attend(0, q, [next_seq]), ref.attend(0, q, [next_seq])))
    sc.check(cross_rank=True)
    return {"err": err, "counts": counts, "spills": sc.directory.stats["spills"],
            "migrate_bytes": comm.ledger.records["migrate"].bytes_sent}


def _spill(rank, world):
    """Rank 0 full: the next block's home is rank 0, it spills to rank 1; then the cache is full."""
    cfg = CacheConfig(codec="int8", block_size=2)
    sc = ShardedKVCache(M, cfg, ParallelConfig(world_size=2, strategy="sequence"), blocks_per_rank=2)
    ref = ShardedKVCache(M, cfg, ParallelConfig(world_size=1, strategy="replicated"), comm=Comm(local=True))
    g = torch.Generator().manual_seed(3)
    errs, owners = [], []

    def grow(n):
        if sc.extend([0], n) is None:
            return False
        ref.extend([0], n)
        for layer in range(L):
            k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
            sc.write(layer, k, v)
            ref.write(layer, k, v)
        q = torch.randn(1, HQ, D, generator=g)
        errs.append(_rel(sc.attend(0, q), ref.attend(0, q)))
        return True

    for c in (sc, ref):
        c.add_sequence(0)
    assert grow(4)                                   # blocks 0, 1 on ranks 0, 1
    sc.migrate(sc.directory.blocks(0)[1], 0)         # rank 0 now full, rank 1 empty
    assert grow(4)                                   # block 2's home (rank 0) is full: spills to rank 1
    owners = [sc.directory.entry(b).owner for b in sc.directory.blocks(0)]
    full = sc.extend([0], 1) is None                 # 4 blocks in 4 slots: expected shortage, not a crash
    sc.check(cross_rank=True)
    return {"owners": owners, "spills": sc.directory.stats["spills"], "full": full, "err": max(errs),
            "tokens": sc.num_tokens(0)}


def _suite(rank, world, small=False):
    """Everything one launch checks (one launch per world size: process start-up is the cost)."""
    if small:  # 4 ranks on 2 shared cores: the representative cases only
        return {"equivalence": _equivalence(rank, world, [CASES[0], CASES[2], CASES[3]], steps=3),
                "random": [_random_program(rank, world, world + 10, "int4", "channel", n_ops=50)]}
    res = {"equivalence": _equivalence(rank, world),
           "random": [_random_program(rank, world, seed, codec, kg)
                      for seed, codec, kg in ((world, "none", "token_head"), (world + 10, "int4", "channel"))]}
    if world == 2:
        res["spill"] = _spill(rank, world)
    return res


def _assert_suite(results, world):
    r0 = results[0]
    for r in results[1:]:  # every rank returns the same outputs (bytes held/sent differ per rank)
        assert [x["err"] for x in r["equivalence"]] == [x["err"] for x in r0["equivalence"]]
        assert [(x["err"], x["counts"]) for x in r["random"]] == [(x["err"], x["counts"]) for x in r0["random"]]
    for row in r0["equivalence"]:
        assert row["err"] <= 1e-5, row
        assert row["bytes"] == row["formula"], row       # measured at the call site == closed form
        assert row["collectives"] == (0 if world == 1 or row["strategy"] == "replicated" else 1), row
    for rnd in r0["random"]:
        assert rnd["err"] <= 1e-5, rnd
        c = rnd["counts"]
        assert c["extend"] > 5 and c["evict"] > 0, rnd
        if world > 1:
            assert c["migrate"] + c["rebalance"] > 0 and rnd["migrate_bytes"] > 0, rnd


def test_two_ranks_match_single_rank_stay_coherent_and_spill():
    results = launch(_suite, 2, args=(), timeout_s=120)
    _assert_suite(results, 2)
    sp = results[0]["spill"]
    assert sp["owners"] == [0, 0, 1, 1] and sp["spills"] == 1 and sp["full"] and sp["tokens"] == 8, sp
    assert sp["err"] <= 1e-5
    _assert_bytes(results, replication=1)


def _assert_bytes(results, replication):
    """Summed over ranks, ``heads`` holds ``replication`` copies of the KV, ``sequence`` one copy."""
    one = {(r["strategy"], r["codec"], r["kg"]): r["kv_total"] for r in results[0]["equivalence"]}
    tot = {(r["strategy"], r["codec"], r["kg"]): sum(x["equivalence"][i]["kv_total"] for x in results)
           for i, r in enumerate(results[0]["equivalence"])}
    full = one[("replicated", "none", "token_head")]
    assert tot[("heads", "none", "token_head")] == replication * full
    assert tot[("replicated", "none", "token_head")] == len(results) * full
    # sequence: blocks spread, so the ranks together hold one copy (up to per-rank partial blocks)
    assert full <= tot[("sequence", "none", "token_head")] <= full * 1.5
    assert max(x["equivalence"][[k for k in one].index(("sequence", "none", "token_head"))]["kv_total"]
               for x in results) < full


def test_world_size_one_runs_the_same_code_without_collectives():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as launch() gives each rank: tiny ops on a busy 2-core box
    try:
        _assert_suite([_suite(0, 1)], 1)
    finally:
        torch.set_num_threads(threads)


def test_attending_over_a_stale_block_raises():
    sc = ShardedKVCache(M, CacheConfig(block_size=4), ParallelConfig(world_size=1, strategy="sequence"))
    sc.add_sequence(0)
    sc.extend([0], 3)
    for layer in range(L):
        sc.write(layer, torch.randn(3, HKV, D), torch.randn(3, HKV, D))
    sc.extend([0], 1)
    sc.write(0, torch.randn(1, HKV, D), torch.randn(1, HKV, D))  # layer 1 never written
    sc.attend(0, torch.randn(1, HQ, D))
    with pytest.raises(CoherencyError, match="stale"):
        sc.attend(1, torch.randn(1, HQ, D))
    with pytest.raises(CoherencyError, match="stale"):
        sc.check()


def _must_not_run(rank, world):
    raise AssertionError("a process group started for an invalid layout")


@pytest.mark.parametrize("values, needle", [
    ({"world_size": 3, "strategy": "heads"}, "valid world sizes"),
    ({"world_size": 2, "strategy": "pipeline"}, "choose one of 'replicated', 'heads', 'sequence'"),
    ({"world_size": 4, "strategy": "heads", "n_heads": 6, "n_kv_heads": 2}, "n_heads (6) divisible"),
])
def test_invalid_layouts_fail_before_any_process_group(values, needle, monkeypatch):
    import ryzlab.experiments.scaling as scaling

    monkeypatch.setattr(scaling, "launch", _must_not_run)
    with pytest.raises(ConfigError, match="valid|divisible|choose") as e:
        scaling.run(scaling.make_config(values))
    assert needle in str(e.value)
    assert not torch.distributed.is_initialized()


def test_scaling_experiment_rows_on_two_ranks():
    import ryzlab.experiments.scaling as scaling
    from ryzlab.experiments import run_experiment

    df = run_experiment("scaling", {"world_size": 2, "strategy": "sequence", "codec": "int8", "context": 64,
                                    "n_heads": 4, "head_dim": 16, "decode_steps": 2, "warmup": 1,
                                    "budget_mib": 0.25})
    assert len(df) == 2 and set(df["device"]) == {"cpu"} and set(df["backend"]) == {"gloo"}
    row = df.iloc[0]
    assert row["comm_bytes_per_layer"] == row["comm_bytes_formula_per_layer"] == 1 * 4 * 17 * 4
    assert row["collectives_per_step"] == row["collectives_formula_per_step"] == 2
    assert row["largest_context"] == 2 * row["largest_context_ws1"] > 0
    assert row["kv_bytes_per_rank"] < row["kv_bytes_total"] and row["kv_replication"] == 1
    eff = scaling.scaling_efficiency(df)
    assert eff["scaling_efficiency"].isna().all()  # no world_size 1 point in this frame
