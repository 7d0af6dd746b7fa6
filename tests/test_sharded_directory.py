"""Block directory: placement, spill, migration, rebalance and coherency invariants (plain Python)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ryzlab.kv.directory import ALL_RANKS, BlockDirectory
from ryzlab.kv.merge import merge_partials


def test_sequence_spreads_round_robin_and_fills_blocks():
    d = BlockDirectory(4, 4, blocks_per_rank=8)
    d.add_sequence(0)
    slots = d.append(0, 30)
    assert len(slots) == 30 and d.num_tokens(0) == 30
    assert [d.used(r) for r in range(4)] == [2, 2, 2, 2]
    assert [s.offset for s in slots[:5]] == [0, 1, 2, 3, 0]
    d.check()


def test_full_rank_spills_instead_of_failing():
    d = BlockDirectory(2, 2, blocks_per_rank=2)
    d.add_sequence(0)
    assert [s.owner for s in d.append(0, 2 * 2)] == [0, 0, 1, 1]    # blocks 0, 1 on their homes
    d.migrate(d.blocks(0)[1], 0)                                    # rank 0 full, rank 1 empty
    assert [s.owner for s in d.append(0, 2)] == [1, 1]              # block 2's home (0) is full: spill
    assert d.stats["spills"] == 1
    assert [s.owner for s in d.append(0, 2)] == [1, 1]              # block 3's home is rank 1: no spill
    assert d.stats["spills"] == 1 and d.num_tokens(0) == 8
    d.check()
    before = d.digest()
    assert d.append(0, 1) is None                                   # every rank full: nothing changes
    assert d.digest() == before
    d.check()


def test_spill_counted_when_home_full():
    d = BlockDirectory(2, 1, blocks_per_rank=3)
    d.add_sequence(0)
    d.append(0, 3)      # ranks 0,1,0
    d.add_sequence(1)   # home of its block 0 is rank 1
    d.append(1, 3)      # rank 1 gets 2 more, the third block's home (rank 0) is full -> spill? rank 0 has 1 free
    d.check()
    assert d.used(0) + d.used(1) == 6 and max(d.used(0), d.used(1)) == 3


def test_migrate_and_evict_bump_versions_and_rebalance_evens_load():
    d = BlockDirectory(3, 2, blocks_per_rank=10)
    d.add_sequence(7)
    d.append(7, 2 * 6)
    b = d.blocks(7)[0]
    v = d.entry(b).version
    owner = d.entry(b).owner
    mv = d.migrate(b, (owner + 1) % 3)
    assert mv.version == v + 1 and d.entry(b).owner == (owner + 1) % 3
    for blk in d.blocks(7, rank=1):
        d.migrate(blk, 0)
    moves = d.rebalance()
    assert moves and max(d.used(r) for r in range(3)) - min(d.used(r) for r in range(3)) <= 1
    tomb = d.evict(b)
    assert d.is_freed(b) and tomb > mv.version
    with pytest.raises(ValueError, match="freed"):
        d.entry(b)
    d.check()


def test_everywhere_placement_holds_every_block_on_every_rank():
    d = BlockDirectory(2, 4, blocks_per_rank=3, placement="everywhere")
    d.add_sequence(0)
    assert d.append(0, 12) is not None
    assert d.used(0) == d.used(1) == 3
    assert all(d.entry(b).owner == ALL_RANKS for b in d.blocks(0))
    assert d.append(0, 1) is None
    with pytest.raises(ValueError, match="cannot migrate"):
        d.migrate(d.blocks(0)[0], 1)
    d.check()


def test_misuse_raises_value_error():
    d = BlockDirectory(2, 4)
    with pytest.raises(ValueError, match="unknown sequence"):
        d.append(3, 1)
    with pytest.raises(ValueError, match="placement"):
        BlockDirectory(2, 4, placement="ring")


class _Shards:
    """What each rank has written: per block the version it stamped (a stand-in for the tensors)."""

    def __init__(self, world):
        self.stamp = [dict() for _ in range(world)]

    def write(self, d, slots):
        for s in slots:
            for r in range(d.world_size) if s.owner == ALL_RANKS else (s.owner,):
                self.stamp[r][s.block_id] = s.version

    def move(self, mv):
        assert self.stamp[mv.src].pop(mv.block_id) == mv.version - 1, "migrated a stale block"
        self.stamp[mv.dst][mv.block_id] = mv.version

    def check(self, d):
        """No stale read, no lost block, no double owner, no freed block kept."""
        for r in range(d.world_size):
            for b, v in self.stamp[r].items():
                assert not d.is_freed(b), f"rank {r} still holds freed block {b}"
                e = d.entry(b)
                assert e.owner in (r, ALL_RANKS), f"rank {r} holds block {b} owned by {e.owner}"
                assert v == e.version, f"rank {r} stale on block {b}: {v} != {e.version}"
        for s in d.sequences():
            for b in d.blocks(s):
                holders = [r for r in range(d.world_size) if b in self.stamp[r]]
                want = list(range(d.world_size)) if d.entry(b).owner == ALL_RANKS else [d.entry(b).owner]
                assert holders == want, f"block {b} held by {holders}, directory says {want}"


def _evict(d, shards, b):
    owner = d.entry(b).owner
    d.evict(b)
    for r in range(d.world_size) if owner == ALL_RANKS else (owner,):
        shards.stamp[r].pop(b)


ops = st.lists(st.tuples(st.sampled_from(["append", "evict", "migrate", "rebalance", "free", "new"]),
                         st.integers(0, 10_000)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(world=st.integers(1, 4), cap=st.sampled_from([None, 2, 5]), block=st.integers(1, 4),
       everywhere=st.booleans(), program=ops)
def test_random_programs_keep_the_directory_coherent(world, cap, block, everywhere, program):
    d = BlockDirectory(world, block, blocks_per_rank=cap, placement="everywhere" if everywhere else "spread")
    shards = _Shards(world)
    next_seq = 0
    for op, x in program:
        seqs = d.sequences()
        if op == "new" or not seqs:
            d.add_sequence(next_seq)
            next_seq += 1
        elif op == "append":
            before = d.digest()
            slots = d.append(seqs[x % len(seqs)], 1 + x % (3 * block))
            if slots is None:
                assert d.digest() == before
            else:
                shards.write(d, slots)
        elif op == "evict":
            blocks = [b for s in seqs for b in d.blocks(s)]
            if blocks:
                _evict(d, shards, blocks[x % len(blocks)])
        elif op == "migrate" and not everywhere and world > 1:
            blocks = [b for s in seqs for b in d.blocks(s)]
            if blocks:
                b = blocks[x % len(blocks)]
                dst = (d.entry(b).owner + 1 + x % (world - 1)) % world
                if (mv := d.migrate(b, dst)) is not None:
                    shards.move(mv)
        elif op == "rebalance":
            for mv in d.rebalance(max_moves=1 + x % 3):
                shards.move(mv)
        elif op == "free":
            s = seqs[x % len(seqs)]
            for b in list(d.blocks(s)):
                _evict(d, shards, b)
            d.free_sequence(s)
        d.check()
        shards.check(d)


def test_lse_merge_is_exact_against_full_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)     # [B, H, D]
    k = torch.randn(3, 5, 40, 8, generator=g, dtype=torch.float64)  # [B, H, T, D]
    v = torch.randn(3, 5, 40, 8, generator=g, dtype=torch.float64)
    s = torch.einsum("bhd,bhtd->bht", q, k)
    ref = torch.einsum("bht,bhtd->bhd", s.softmax(-1), v)
    cuts = [0, 7, 7, 23, 40]  # includes an empty part
    outs, lses = [], []
    for a, b in zip(cuts, cuts[1:]):
        part = s[..., a:b]
        lse = torch.logsumexp(part, -1) if b > a else torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype)
        o = torch.einsum("bht,bhtd->bhd", (part - lse.unsqueeze(-1)).exp(), v[..., a:b, :]) if b > a \
            else torch.zeros_like(ref)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-12)
    empty, else_ = merge_partials(torch.zeros(2, 3, 4), torch.full((2, 3), float("-inf")))
    assert torch.all(empty == 0) and torch.all(torch.isneginf(else_))
