"""The paged cache's byte ledger: exact bytes held, by kind, for every layer's format.

One place that counts bytes for :class:`ryzlab.kv.cache.PagedKVCache` (and through it
``RyzlabCache``, the accuracy harness, the experiments and the planner), per layer, so mixed
precision (``CacheConfig.layer_codecs``), sub-byte codecs and rotation (which stores nothing
extra: the matrix is derived from the seed) all go through the same accounting.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ryzlab.kv.codecs import KVFormat

if TYPE_CHECKING:
    from ryzlab.kv.cache import PagedKVCache

__all__ = ["codec_bytes_per_token", "paged_ledger"]


def codec_bytes_per_token(key_formats: Sequence[KVFormat], value_formats: Sequence[KVFormat], heads: int,
                          head_dim: int, block_size: int) -> float:
    """Asymptotic bytes per token, all layers, K + V: payload + scales amortised over a block."""
    return sum(f.bytes_per_token(heads, head_dim, block_size).total for f in (*key_formats, *value_formats))


def paged_ledger(cache: "PagedKVCache") -> dict[str, float]:
    """Exact bytes ``cache`` holds (this rank) for the live sequences, by kind (all layers, K + V).

    Under context parallelism only this rank's blocks count (its share of every sequence);
    the tail is held by every cp rank and counted on each. Under tensor parallelism the
    cache holds the rank's own KV heads (a replicated KV head is counted on every copy).

    * ``payload``: quantised (or model-dtype) values of the filled token slots;
    * ``scales``: scales and zero points (token-local ones per filled slot, block-wide
      ones per used block);
    * ``padding``: empty slots of partially filled blocks (payload + token-local scales);
    * ``residual``: the full-precision tail rows of every live sequence (residual window
      and, for token-spanning scales, the not-yet-full block);
    * ``metadata``: what a device would hold to address them: an int32 block-table entry
      per block per sequence and an int32 length per sequence (host-side Python
      bookkeeping is not counted);
    * ``bytes_per_token``: total / tokens of the live sequences (shared prefix blocks are
      counted once, so sharing lowers it; under cp the tokens are the whole sequences, so
      this is the rank's share); ``ratio_vs_bf16`` divides it by
      ``bf16_bytes_per_token`` = ``2 * L * Hkv * D * 2``;
    * ``allocated``: bytes of every storage tensor (pool capacity, cached free blocks
      and spare tail slots included).
    """
    c = cache
    L, H, D, bs = c.n_layers, c.n_kv_heads, c.head_dim, c.block_size
    payload_slot = scale_slot = scale_block = 0.0
    for fmt in (*c.key_formats, *c.value_formats):  # one entry per layer
        tb = fmt.bytes_per_token(H, D, bs)
        payload_slot += tb.payload
        if fmt.spans_tokens:
            scale_block += tb.scales * bs
        else:
            scale_slot += tb.scales
    fill: dict[int, int] = {}
    tokens = table_entries = 0
    cp, me = c.cp_size, c.cp_rank
    seqs = c.seq_ids()
    for s in seqs:
        n = c.pool.num_tokens(s)
        tokens += n
        for j, b in enumerate(c.pool.block_table(s)):
            if b % cp == me:
                table_entries += 1
                fill[b] = max(fill.get(b, 0), min(bs, n - j * bs))
    filled = sum(fill.values())
    used = len(fill)
    payload = filled * payload_slot
    scales = filled * scale_slot + used * scale_block
    padding = (used * bs - filled) * (payload_slot + scale_slot)
    residual = float(len(seqs) * c.tail_len * H * D * c.store.tail_k.element_size() * 2 * L)
    metadata = float(4 * table_entries + 4 * len(seqs))
    total = payload + scales + padding + residual + metadata
    bf16 = 2.0 * L * H * D * 2
    bpt = total / tokens if tokens else c.bytes_per_token_codec()
    allocated = c.store.nbytes()
    return {"payload": payload, "scales": scales, "residual": residual, "padding": padding,
            "metadata": metadata, "total": total, "tokens": float(tokens), "bytes_per_token": bpt,
            "kv_bytes_per_token": bpt,  # the field's metric name (DESIGN.md)
            "bytes_per_token_codec": c.bytes_per_token_codec(), "bf16_bytes_per_token": bf16,
            "ratio_vs_bf16": bpt / bf16, "allocated": float(allocated), "blocks": float(used),
            "cp": float(cp)}
