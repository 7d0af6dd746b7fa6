"""BlockPool: prefix sharing, copy-on-write, LRU eviction, shortage, and random-operation invariants."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ryzlab.kv.blocks import BlockPool
from ryzlab.kv.free_queue import FreeBlockQueue, KVBlock


def test_free_queue_removes_from_middle_in_order():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft().block_id == 0
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 4, 2] and len(q) == 4
    with pytest.raises(AssertionError, match="twice"):
        q.append(blocks[2])


def test_prefix_hit_shares_full_blocks_only():
    p = BlockPool(16, 4)
    a = p.allocate("a", list(range(10)))          # 2 full blocks + 2 tokens
    b = p.allocate("b", list(range(9)) + [99])    # same first 8 tokens, differs in the 3rd block
    assert a[:2] == b[:2] and a[2] != b[2]
    assert p.num_cached_tokens("a") == 0 and p.num_cached_tokens("b") == 8
    assert p.stats()["prefix_cache_hit_rate"] == pytest.approx(8 / 20)
    c = p.allocate("c", [0, 1, 2, 3, 4, 5, 6, 99])  # differs inside block 1: only block 0 shared
    assert c[0] == a[0] and c[1] != a[1]
    p.check_invariants()


def test_fully_cached_prompt_recomputes_last_block():
    p = BlockPool(8, 4)
    a = p.allocate("a", list(range(8)))
    b = p.allocate("b", list(range(8)))
    assert p.num_cached_tokens("b") == 4 and b[0] == a[0] and b[1] != a[1]
    p.check_invariants()


def test_freed_blocks_stay_cached_until_reused_lru():
    p = BlockPool(4, 2)
    p.allocate("a", [1, 2, 3, 4])
    p.free("a")
    assert p.stats()["num_cached_blocks"] == 2 and p.num_free_blocks == 4
    assert p.allocate("b", [1, 2, 3, 4, 5]) is not None  # revives both cached blocks
    assert p.num_cached_tokens("b") == 4
    p.free("b")
    # 4 new unrelated blocks evict every cached block (LRU order), never a used one
    p.allocate("c", [9] * 8)
    p.free("c")
    assert p.allocate("d", [1, 2, 3, 4, 5]) is not None and p.num_cached_tokens("d") == 0
    p.check_invariants()


def test_fork_copy_on_write_and_shared_full_blocks():
    p = BlockPool(8, 4)
    p.allocate("a", list(range(6)))  # block 0 full, block 1 holds 2 tokens
    table = p.fork("a", "b")
    assert table == p.block_table("a")
    res = p.append("b", [7])
    assert res is not None and len(res.copies) == 1
    src, dst = res.copies[0]
    assert src == table[1] and p.block_table("b") == [table[0], dst]
    res_a = p.append("a", [8])  # now private again: no copy
    assert res_a is not None and res_a.copies == []
    p.check_invariants()


def test_shortage_returns_none_and_changes_nothing():
    p = BlockPool(3, 2)
    p.allocate("a", [1, 2, 3])
    before = (p.block_table("a"), p.stats())
    assert p.allocate("b", [5, 6, 7, 8, 9]) is None
    assert "b" not in p
    assert p.append("a", [4, 5, 6, 7]) is None
    assert (p.block_table("a"), p.stats()) == before and p.num_tokens("a") == 3
    assert p.append("a", [4, 5]) is not None
    p.check_invariants()


def test_unbounded_pool_grows():
    p = BlockPool(None, 2)
    p.allocate("a", list(range(101)))
    assert len(p.block_table("a")) == 51 and p.stats()["kv_cache_usage_perc"] == 1.0
    p.check_invariants()


def test_unknown_token_ids_are_never_hashed():
    p = BlockPool(8, 2)
    p.allocate("a", 4)
    p.allocate("b", 4)
    assert p.num_cached_tokens("b") == 0 and not p.cached
    p.append("a", [1, 2])
    assert not p.cached  # the chain broke at the first unknown block


def test_misuse_raises_value_error():
    p = BlockPool(4, 2)
    p.allocate("a", [1])
    with pytest.raises(ValueError, match="already exists"):
        p.allocate("a", [1])
    with pytest.raises(ValueError, match="unknown sequence 'zz'"):
        p.append("zz", [1])
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
    with pytest.raises(ValueError, match=">= 0"):
        p.append("a", -1)


def test_invariant_check_names_the_bug():
    p = BlockPool(4, 2)
    p.allocate("a", [1, 2])
    p.blocks[p.block_table("a")[0]].ref_cnt = 2
    with pytest.raises(AssertionError, match="ref_cnt 2 but 1 block tables"):
        p.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / evict keep every invariant; tiny pool so shortage happens."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, 3)
        self.next_id = 0
        self.model: dict[int, list[int]] = {}  # seq -> tokens (reference)

    tokens = st.lists(st.integers(0, 3), max_size=8)  # small alphabet: prefixes collide often

    @rule(toks=tokens)
    def allocate(self, toks):
        sid = self.next_id
        self.next_id += 1
        before = self.pool.stats()
        table = self.pool.allocate(sid, toks)
        if table is None:
            assert sid not in self.pool and self.pool.stats()["num_used_blocks"] == before["num_used_blocks"]
        else:
            self.model[sid] = list(toks)
            assert len(table) == -(-len(toks) // 3)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), toks=tokens)
    def append(self, data, toks):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        table = self.pool.block_table(sid)
        res = self.pool.append(sid, toks)
        if res is None:
            assert self.pool.block_table(sid) == table
        else:
            self.model[sid] += toks
            for src, dst in res.copies:
                assert src in table and dst in self.pool.block_table(sid)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.model)))
        child = self.next_id
        self.next_id += 1
        self.pool.fork(parent, child)
        self.model[child] = list(self.model[parent])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.pool.free(sid)
        del self.model[sid]

    @rule(n=st.none() | st.integers(0, 5))
    def evict(self, n):
        self.pool.evict(n)

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        for sid, toks in self.model.items():
            assert self.pool.token_ids(sid) == toks
        # no leak: used blocks are exactly those referenced by live sequences
        referenced = {b for sid in self.model for b in self.pool.block_table(sid)}
        assert self.pool.num_used_blocks == len(referenced)


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase


class ShardedPoolMachine(PoolMachine):
    """The same program on a pool sharded over 3 cp ranks, plus migrate / rebalance: every
    invariant holds, blocks stay on their shard's free queue, and a migration keeps the tokens."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, 3, shards=3)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def migrate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        table = self.pool.block_table(sid)
        if not table:
            return
        b = data.draw(st.sampled_from(table))
        dst = (self.pool.shard_of(b) + data.draw(st.integers(1, 2))) % 3
        free_before = self.pool.num_free_blocks
        mv = self.pool.migrate(b, dst)
        if mv is None:
            assert self.pool.block_table(sid) == table
        else:
            assert mv[0] == b and self.pool.shard_of(mv[1]) == dst and b not in self.pool.block_table(sid)
            assert self.pool.num_free_blocks == free_before

    @rule()
    def rebalance(self):
        self.pool.rebalance()
        used = self.pool.used_per_shard()
        # balanced to within one, unless the emptiest shard ran out of free blocks
        assert max(used) - min(used) <= 1 or not self.pool.free_queues[used.index(min(used))]


ShardedPoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
TestShardedPoolMachine = ShardedPoolMachine.TestCase


def test_sharded_placement_spreads_a_sequence_and_spills_when_its_home_is_full():
    p = BlockPool(6, 2, shards=3)
    p.allocate("a", list(range(6)))                       # 3 blocks: homes 0, 1, 2
    assert [p.shard_of(b) for b in p.block_table("a")] == [0, 1, 2]
    p.allocate("b", list(range(100, 104)))                # next sequence starts one shard further
    assert [p.shard_of(b) for b in p.block_table("b")] == [1, 2]
    p.allocate("c", list(range(200, 202)))                # home shard 2 is full: spills to shard 0
    assert [p.shard_of(b) for b in p.block_table("c")] == [0] and p.stats()["spills"] == 1
    with pytest.raises(ValueError, match="divide"):
        BlockPool(7, 2, shards=2)
