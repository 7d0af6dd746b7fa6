"""The step plan (:mod:`ryzlab.kv.step`) is built with tensor ops over the whole step: planning
B sequences together gives each one exactly what planning it alone gives (positions, slots,
gathered blocks and key positions, tail rows, block commits), for every page layout."""
import dataclasses

import pytest
import torch

from ryzlab.kv.step import PageLayout, gather_plan, plan_step


def _alone(lay, b, tables, tail_starts, slots, starts, writes):
    return plan_step(lay, [b], [tables[b]], [tail_starts[b]], [slots[b]], [starts[b]], [writes[b]])


@pytest.mark.parametrize("bs,commit,residual,tail,cp,rank", [
    (4, 1, 0, 0, 1, 0),     # codec none
    (4, 1, 3, 3, 1, 0),     # token-local scales + residual window
    (4, 4, 0, 3, 1, 0),     # token-spanning scales: blocks commit when full
    (4, 4, 5, 5, 1, 0),
    (4, 1, 3, 3, 2, 1),     # context parallel: this rank stores odd blocks
    (2, 2, 0, 1, 3, 0),
])
def test_batched_plan_equals_each_sequence_planned_alone(bs, commit, residual, tail, cp, rank):
    lay = PageLayout(bs, commit, residual, tail, rank, cp, torch.device("cpu"))
    g = torch.Generator().manual_seed(bs * 7 + cp)
    B = 5
    starts = [0, 3, 8, 1, 12]
    writes = [6, 1, 1, 0, 9]
    # tail_start: first self-written position (a prefix hit before it, aligned to commit units)
    tail_starts = [0, 0, 4 if commit == 1 else 8, 0, 0]
    slots = [3, 0, 4, 1, 2]
    tables = [torch.randperm(64, generator=g)[:-(-(s + w) // bs) + 1].tolist() for s, w in zip(starts, writes)]
    step = plan_step(lay, list(range(B)), tables, tail_starts, slots, starts, writes)
    off = 0
    for b in range(B):
        one = _alone(lay, b, tables, tail_starts, slots, starts, writes)
        w = writes[b]
        assert step.positions[off:off + w].tolist() == one.positions.tolist()
        assert step.slot_mapping[off:off + w].tolist() == one.slot_mapping.tolist()
        assert step._q_pos[b, :max(w, 1)].tolist()[:w] == one._q_pos[0, :w].tolist()
        assert step._tables[b, :one._tables.shape[1]].tolist() == one._tables[0].tolist()[:step._tables.shape[1]]
        if cp > 1:
            assert step._kpos[b, :one._kpos.shape[1]].tolist() == one._kpos[0].tolist()
        # tail overlay rows of sequence b
        mine = step._ov_b == b
        assert step._ov_idx[mine].tolist() == one._ov_idx.tolist()
        assert step._ov_row[mine].tolist() == one._ov_row.tolist()
        # tail ring copies and block commits (token indices are offset by the tokens before b)
        in_b = (step._tail_src >= off) & (step._tail_src < off + w)
        assert (step._tail_src[in_b] - off).tolist() == one._tail_src.tolist()
        assert step._tail_dst[in_b].tolist() == one._tail_dst.tolist()
        off += w
    # the commits in one list: the per-sequence ones, in order, new-token indices shifted
    want_blocks, want_src, off = [], [], 0
    for b in range(B):
        one = _alone(lay, b, tables, tail_starts, slots, starts, writes)
        want_blocks += one._commit_blocks.tolist()
        src = one._commit_src.clone()
        want_src += torch.where(src < 0, src - off, src).tolist()
        off += writes[b]
    assert step._commit_blocks.tolist() == want_blocks
    assert step._commit_src.tolist() == want_src
    own = None if step._own_tok is None else step._own_tok.tolist()
    if cp == 1:
        assert own is None and step._own_slots.tolist() == step.slot_mapping.tolist()
    else:
        assert all(int(step.slot_mapping[j]) // bs % cp == rank for j in own)


def test_decode_step_is_flagged_and_its_mask_is_built_once():
    lay = PageLayout(4, 1, 0, 0, 0, 1, torch.device("cpu"))
    step = plan_step(lay, [0, 1], [[5, 6], [7]], [0, 0], [0, 1], [4, 2], [1, 1])
    assert step.is_decode
    assert step.causal_mask is step.causal_mask           # one tensor for every layer
    assert step.causal_mask.shape == (2, 1, 8)
    assert step.causal_mask[0, 0].tolist() == [True] * 5 + [False] * 3
    assert step.causal_mask[1, 0].tolist() == [True] * 3 + [False] * 5
    prefill = plan_step(lay, [0], [[5, 6]], [0], [0], [0], [3])
    assert not prefill.is_decode


def test_gather_plan_pads_rows_and_keeps_this_ranks_blocks_in_order():
    lay = PageLayout(2, 1, 0, 0, 1, 2, torch.device("cpu"))       # rank 1 of 2: odd block ids
    tables, kpos, *_ = gather_plan(lay, [[3, 4, 5, 7], [2, 9]], [0, 0], [0, 1], [7, 3])
    assert tables.tolist() == [[1, 2, 3], [4, 0, 0]]            # block // cp, padded with 0
    big = 1 << 62
    assert kpos.tolist() == [[0, 1, 4, 5, 6, 7], [2, 3, big, big + 1, big, big + 1]]


@pytest.mark.parametrize("B", [1, 3, 16])
def test_decode_plan_from_lists_equals_the_tensor_plan(B):
    """A decode step on one rank without a tail is planned from Python lists (the serving hot
    path); every field equals what the general tensor-op plan gives, including sequences at a
    block's first and last slot and tables longer than the context (blocks allocated ahead)."""
    from ryzlab.kv.step import _plan_general

    lay = PageLayout(4, 1, 0, 0, 0, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(B)
    starts = [int(x) for x in torch.randint(0, 40, (B,), generator=g)]
    starts[0] = 4 * (starts[0] // 4)            # a block's first slot
    starts[-1] = 4 * (starts[-1] // 4) + 3      # and its last
    tables = [torch.randperm(100, generator=g)[:a // 4 + 1 + int(x)].tolist()
              for a, x in zip(starts, torch.randint(0, 3, (B,), generator=g))]
    args = (lay, [f"s{b}" for b in range(B)], tables, [0] * B, list(range(B)), starts, [1] * B)
    fast, general = plan_step(*args), _plan_general(*args)
    for f in dataclasses.fields(fast):
        a, b = getattr(fast, f.name), getattr(general, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    assert fast.is_decode and torch.equal(fast.causal_mask, general.causal_mask)
