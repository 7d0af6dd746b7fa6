"""Tensor and context parallelism of the model itself, on real gloo ranks.

Each launch runs several layouts (one process start per world size): greedy tokens equal world
size 1, logits within 1e-5 (uncompressed) / 1e-4 (each codec, against the same codec at world
size 1), bytes at the collective call sites equal the formulas, KV bytes split over cp ranks,
and a capacity-bound cp cache stays coherent through random extend / free / migrate / rebalance.
"""
from __future__ import annotations

import random

import pytest
import torch

from ryzlab.config import CacheConfig, ConfigError, ModelConfig, ParallelConfig
from ryzlab.kv import context as kvcp
from ryzlab.kv.cache import PagedKVCache
from ryzlab.models.transformer import Transformer
from ryzlab.orchestrator import launch
from ryzlab.parallel import (apply_tp, cp_comm_bytes_formula, init_parallel, tp_comm_bytes_formula, tp_layout,
                             validate_parallel, weight_bytes)

torch.set_num_threads(1)

M = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True)  # head_dim 16
CODECS = [dict(codec="none"), dict(codec="int8"), dict(codec="int4", key_granularity="channel"),
          dict(codec="fp8_e4m3"), dict(codec="fp8_e5m2", key_granularity="group", value_granularity="group",
                                           group_size=8), dict(codec="int8", residual=6)]
B, PROMPT, NEW = 2, 11, 8


def _model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(M).eval()
    for name, p in m.named_parameters():  # non-zero biases, so their sharding is checked too
        if name.endswith("bias"):
            p.data.normal_()
    return m


def _prompt() -> torch.Tensor:
    return torch.randint(0, M.vocab_size, (B, PROMPT), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _greedy(m, cache, groups=None):
    """Prefill + NEW greedy steps; returns (tokens [B, NEW], logits [B, NEW, V], comm per decode step)."""
    x = _prompt()
    logits = [m(x, cache=cache, seq_ids=[0, 1])[:, -1]]
    toks = []
    if groups is not None:
        groups.reset_ledgers()
    for _ in range(NEW):
        nxt = logits[-1].argmax(-1, keepdim=True)
        toks.append(nxt)
        if groups is None:
            logits.append(m(nxt, cache=cache, seq_ids=[0, 1])[:, -1])
        else:
            with groups.tp.step("decode"), groups.cp.step("decode"):
                logits.append(m(nxt, cache=cache, seq_ids=[0, 1])[:, -1])
    comm = None
    if groups is not None:
        comm = {"tp": groups.tp.ledger.per_step("decode"), "cp": groups.cp.ledger.per_step("decode")}
    return torch.cat(toks, 1), torch.stack(logits[:-1], 1), comm


def _layouts(rank, world, layouts, program):
    out = {}
    for tp, cp in layouts:
        g = init_parallel(ParallelConfig(tp=tp, cp=cp))
        m = apply_tp(_model(), g.tp)
        rows = []
        for c in CODECS:
            cache = PagedKVCache(m.local_config, CacheConfig(block_size=4, **c), cp=g.cp)
            toks, logits, comm = _greedy(m, cache, g)
            kvcp.check(cache, cross_rank=True)
            rows.append({"tokens": toks, "logits": logits, "comm": comm, "kv": cache.ledger()["total"]})
        out[(tp, cp)] = {"rows": rows, "weights": weight_bytes(m)}
    if program:
        out["program"] = _random_program(init_parallel(ParallelConfig(cp=world)), seed=world)
        out["spill"] = _spill(init_parallel(ParallelConfig(cp=world))) if world == 2 else None
        out["prefix"] = _prefix(init_parallel(ParallelConfig(cp=world)))
    return out


@pytest.fixture(scope="module")
def reference():
    m = _model()
    return [_greedy(m, PagedKVCache(M, CacheConfig(block_size=4, **c))) for c in CODECS], weight_bytes(m)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_layouts(results, reference, layouts):
    ref, ref_w = reference
    for tp, cp in layouts:
        per_rank = [r[(tp, cp)] for r in results]
        for i, c in enumerate(CODECS):
            ref_toks, ref_logits, _ = ref[i]
            for rank, r in enumerate(per_rank):
                row = r["rows"][i]
                assert torch.equal(row["tokens"], ref_toks), (tp, cp, c, rank)
                tol = 1e-5 if c["codec"] == "none" else 1e-4
                assert _rel(row["logits"], ref_logits) <= tol, (tp, cp, c, rank, _rel(row["logits"], ref_logits))
                comm = row["comm"]
                # measured at the call sites == the closed form, per decode step (all layers)
                assert comm["tp"]["bytes_sent"] == M.n_layers * tp_comm_bytes_formula(M, tp=tp, tokens=B)
                assert comm["tp"]["collectives"] == (2 * M.n_layers if tp > 1 else 0)
                assert comm["cp"]["bytes_sent"] == M.n_layers * cp_comm_bytes_formula(M, cp=cp, tp=tp, tokens=B)
                assert comm["cp"]["collectives"] == (M.n_layers if cp > 1 else 0)
            # the cp ranks of one tp rank hold one copy of its KV between them, each a share
            kv = [r["rows"][i]["kv"] for r in per_rank]
            if cp > 1 and c["codec"] == "none":
                one_copy = sum(kv[:: tp])   # tp rank 0 across the cp ranks
                assert max(kv) < one_copy
        w = per_rank[0]["weights"]
        assert w["replicated"] == ref_w["replicated"]
        # sharded weights split evenly (exactly 1/tp), KV projections times their replication
        rep = tp_layout(M, tp, 0).kv_replication
        kv_bytes = sum(p.numel() * 4 for n, p in _model().named_parameters() if ".wk." in n or ".wv." in n)
        assert w["sharded"] == (ref_w["sharded"] - kv_bytes) / tp + kv_bytes * rep / tp


def test_two_ranks_tp_cp_equal_one_rank(reference):
    layouts = [(2, 1), (1, 2)]
    results = launch(_layouts, 2, args=(layouts, True), backend="gloo", timeout_s=300)
    _check_layouts(results, reference, layouts)
    prog = [r["program"] for r in results]
    assert len({p["digest"] for p in prog}) == 1, "cp replicas diverged"
    assert prog[0]["err"] <= 1e-5 and prog[0]["counts"]["migrate"] + prog[0]["counts"]["rebalance"] > 0, prog[0]
    assert prog[0]["counts"]["extend"] > 10 and prog[0]["counts"]["full"] > 0, prog[0]
    sp = results[0]["spill"]
    assert sp["owners"] == [0, 0, 1, 1] and sp["spills"] == 1 and sp["full"] and sp["err"] <= 1e-5, sp
    px = results[1]["prefix"]
    assert px["hits"] == [(0, 0), (8, 8)] and px["err"] <= 1e-5, px


def test_four_ranks_tp4_cp4_and_tp2_cp2_equal_one_rank(reference):
    layouts = [(4, 1), (1, 4), (2, 2)]
    results = launch(_layouts, 4, args=(layouts, False), backend="gloo", timeout_s=300)
    _check_layouts(results, reference, layouts)
    # tp 4 > n_kv_heads 2: each KV head lives on two ranks, and every copy is counted
    kv_tp4 = [r[(4, 1)]["rows"][0]["kv"] for r in results]
    kv_tp2 = [r[(2, 2)]["rows"][0]["kv"] for r in results]
    assert tp_layout(M, 4, 0).kv_replication == 2 and len(set(kv_tp4)) == 1
    assert sum(kv_tp4) == 2 * sum(kv_tp4[:2]) > 0  # 4 ranks hold two full copies of the KV heads


def _write_both(cache, ref, gen, seqs, n):
    """Plan the pending tokens of ``seqs`` on both caches and write the same random K/V."""
    cache.extend(seqs, None, num_write=n)
    ref.extend(seqs, None, num_write=n)
    for layer in range(M.n_layers):
        k = torch.randn(sum(n), M.n_kv_heads, M.head_dim, generator=gen)
        v = torch.randn(sum(n), M.n_kv_heads, M.head_dim, generator=gen)
        cache.write(layer, k, v)
        ref.write(layer, k, v)
    q = torch.randn(sum(n), M.n_heads, M.head_dim, generator=gen)
    return _rel(cache.attend(M.n_layers - 1, q), ref.attend(M.n_layers - 1, q))


def _random_program(g, seed, n_ops=60):
    """Seeded random allocate / free / migrate / rebalance on a capacity-bound cp cache; every step
    also runs on a one-rank cache with no capacity limit (same writes) and attention must agree.
    (Prefix caching off: the two pools evict cached blocks in different orders.)"""
    def cfg(num_blocks):
        return CacheConfig(codec="int4", key_granularity="channel", block_size=2, num_blocks=num_blocks,
                           enable_prefix_caching=False)
    cache = PagedKVCache(M, cfg(8 * g.cp.world_size), cp=g.cp)
    ref = PagedKVCache(M, cfg(None))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    live, nxt, err = [], 0, 0.0
    counts = {"extend": 0, "full": 0, "free": 0, "migrate": 0, "rebalance": 0}
    for _ in range(n_ops):
        op = rng.choice(["extend"] * 4 + ["new", "free", "migrate", "rebalance"])
        if op == "new" or not live:
            toks = [rng.randrange(4) for _ in range(rng.randint(1, 5))]
            if cache.allocate_slots(nxt, toks) is None:
                counts["full"] += 1
                continue
            ref.allocate_slots(nxt, toks)
            live.append(nxt)
            seqs, nxt = [nxt], nxt + 1
        elif op == "extend":
            seqs = sorted(rng.sample(live, rng.randint(1, len(live))))
            for s in list(seqs):  # one call per sequence, as the scheduler makes them
                toks = [rng.randrange(4) for _ in range(rng.randint(1, 3))]
                if cache.allocate_slots(s, toks) is None:  # full: drop it, as a scheduler preempts
                    counts["full"] += 1
                    cache.free(s), ref.free(s), live.remove(s), seqs.remove(s)
                else:
                    ref.allocate_slots(s, toks)
            if not seqs:
                continue
            counts["extend"] += 1
        elif op == "free":
            s = rng.choice(live)
            cache.free(s), ref.free(s), live.remove(s)
            counts["free"] += 1
            continue
        elif op == "migrate":
            b = rng.choice(sorted({b for s in live for b in cache.block_table(s)}))
            counts["migrate"] += kvcp.migrate(cache, b, (b + 1) % g.cp.world_size) is not None
            kvcp.check(cache, cross_rank=True)
            continue
        else:
            counts["rebalance"] += len(kvcp.rebalance(cache, max_moves=2))
            kvcp.check(cache, cross_rank=True)
            continue
        n = [cache.num_tokens(s) - cache.num_written(s) for s in seqs]
        err = max(err, _write_both(cache, ref, gen, seqs, n))
        kvcp.check(cache, cross_rank=True)
    return {"err": err, "counts": counts, "digest": cache.pool.digest()}


def _spill(g):
    """Shard 0 full: the next block's home is shard 0, it spills to shard 1; then the pool is full."""
    cache = PagedKVCache(M, CacheConfig(codec="int8", block_size=2, num_blocks=4), cp=g.cp)
    ref = PagedKVCache(M, CacheConfig(codec="int8", block_size=2))
    gen, errs = torch.Generator().manual_seed(3), []

    def grow(toks):
        if cache.allocate_slots(0, toks) is None:
            return False
        ref.allocate_slots(0, toks)
        errs.append(_write_both(cache, ref, gen, [0], [cache.num_tokens(0) - cache.num_written(0)]))
        return True

    assert grow([1, 2, 3, 4])                                # blocks on shards 0, 1
    kvcp.migrate(cache, cache.block_table(0)[1], 0)          # shard 0 now full, shard 1 empty
    assert grow([5, 6, 7, 8])                                # block 2's home (shard 0) is full: spills
    owners = [cache.pool.shard_of(b) for b in cache.block_table(0)]
    full = cache.allocate_slots(0, [9]) is None              # 4 blocks of 4: expected shortage
    kvcp.check(cache, cross_rank=True)
    return {"owners": owners, "spills": cache.pool.stats()["spills"], "full": full, "err": max(errs)}


def _prefix(g):
    """A second prompt sharing 8 tokens reuses their blocks on every cp rank; attention still exact."""
    cache = PagedKVCache(M, CacheConfig(codec="int8", block_size=4), cp=g.cp)
    ref = PagedKVCache(M, CacheConfig(codec="int8", block_size=4))
    gen = torch.Generator().manual_seed(5)
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    errs, hits = [], []
    for sid, prompt in ((0, shared + [5, 3]), (1, shared + [8, 9, 7])):
        cache.allocate_slots(sid, prompt)
        ref.allocate_slots(sid, prompt)
        hits.append((cache.num_cached_tokens(sid), ref.num_cached_tokens(sid)))
        errs.append(_write_both(cache, ref, gen, [sid], [len(prompt) - cache.num_cached_tokens(sid)]))
    return {"hits": hits, "err": max(errs)}


def test_world_size_one_is_the_same_code_with_no_collectives(reference):
    results = [_layouts(0, 1, [(1, 1)], False)]
    _check_layouts(results, reference, [(1, 1)])


class _FakeComm:
    """Rank ``rank`` of ``world`` for shape checks only (no process group); fakes live in tests."""

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world

    def all_reduce(self, t):
        return t


def test_apply_tp_keeps_each_ranks_rows_and_columns():
    m = _model()
    full = {k: v.clone() for k, v in m.state_dict().items()}
    m = apply_tp(_model(), _FakeComm(1, 2))  # tp rank 1 of 2: q heads 2, 3; kv head 1; ffn second half
    a = m.layers[0].attention
    assert (a.n_heads, a.n_kv_heads) == (2, 1) and m.local_config.n_heads == 2
    D, F = M.head_dim, M.ffn_dim
    torch.testing.assert_close(a.wq.weight, full["layers.0.attention.wq.weight"][2 * D:4 * D], rtol=0, atol=0)
    torch.testing.assert_close(a.wk.bias, full["layers.0.attention.wk.bias"][D:2 * D], rtol=0, atol=0)
    torch.testing.assert_close(a.wo.weight, full["layers.0.attention.wo.weight"][:, 2 * D:4 * D], rtol=0, atol=0)
    ffn = m.layers[0].feed_forward
    torch.testing.assert_close(ffn.w2.weight, full["layers.0.feed_forward.w2.weight"][:, F // 2:], rtol=0, atol=0)
    torch.testing.assert_close(ffn.w1.weight, full["layers.0.feed_forward.w1.weight"][F // 2:], rtol=0, atol=0)
    w = weight_bytes(m)
    assert "tok_embeddings.weight" in w["replicated_names"] and "output.weight" in w["replicated_names"]
    lay = tp_layout(M, 4, 3)
    assert (lay.q_heads, lay.kv_heads, lay.kv_replication) == ((3,), (1,), 2)


@pytest.mark.parametrize("tp, cp, cache, needle", [
    (3, 1, None, "valid tp sizes: [1, 2, 4]"),
    (8, 1, None, "valid tp sizes"),
    (1, 4, CacheConfig(num_blocks=2), "multiple of cp"),
    (1, 3, CacheConfig(num_blocks=16), "multiple of cp"),
])
def test_bad_layouts_fail_before_any_process(tp, cp, cache, needle):
    with pytest.raises(ConfigError) as e:
        validate_parallel(M, ParallelConfig(tp=tp, cp=cp), cache)
    assert needle in str(e.value)


def test_unknown_codec_and_bad_layout_in_generate_fail_before_any_rank(monkeypatch):
    import ryzlab.orchestrator as orch
    from ryzlab.serve.generate import GenerateRequest, generate

    def must_not_run(*a, **k):
        raise AssertionError("a process started for invalid input")

    monkeypatch.setattr(orch, "launch", must_not_run)
    with pytest.raises(ValueError, match="valid tp sizes"):
        generate(GenerateRequest(prompt="x", tp=3))
    with pytest.raises(ValueError, match="'int8'"):
        generate(GenerateRequest(prompt="x", tp=2, codec="int9"))
    with pytest.raises(ValueError, match="temperature"):
        GenerateRequest(prompt="x", temperature=float("nan"))


def _mesh_timeouts(rank, world_size):
    groups = init_parallel(ParallelConfig(tp=2, cp=1))
    return {d: c.group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for d, c in (("tp", groups.tp), ("cp", groups.cp))}


def test_mesh_groups_keep_the_collective_timeout():
    """torch gives mesh subgroups 30 min under gloo: a rank cut off from its peer node hung that long."""
    res = launch(_mesh_timeouts, 2, backend="gloo", collective_timeout_s=17, timeout_s=120)
    assert res[0] == res[1] == {"tp": 17.0, "cp": 17.0}
