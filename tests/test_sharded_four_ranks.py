"""Sharded KV cache on 4 real gloo ranks (heads replicated 2x: n_kv_heads=2 < world_size=4).

The checks live in ``test_sharded_ranks``; this file only runs them at 4 ranks, so each file
stays well under a minute on 2 shared cores.
"""
from test_sharded_ranks import _assert_bytes, _assert_suite, _suite

from ryzlab.orchestrator import launch


def test_four_ranks_match_single_rank_and_stay_coherent():
    results = launch(_suite, 4, args=(True,), timeout_s=150)
    _assert_suite(results, 4)
    _assert_bytes(results, replication=2)  # 2 KV heads on 4 ranks: every head held twice, counted twice
