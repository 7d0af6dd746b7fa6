"""Paged, compressed KV cache: block bookkeeping, codecs, paged storage + attention.

Public API (see each module's docstring):

* :class:`BlockPool` — plain-Python blocks, LRU free queue, ref counts, prefix hashes, CoW.
* :class:`KVFormat` — codec + scale granularity: ``encode`` / ``decode`` / ``bytes_per_token``.
* :class:`PagedKVCache` — per-layer pages, ``add_sequence`` / ``extend`` / ``write`` /
  ``allocate_slots`` / ``attend`` (context-parallel with ``cp=``: log-sum-exp partials merged) / ``read_kv`` /
  ``ledger`` / ``stats``; :mod:`ryzlab.kv.context` migrates and checks blocks across cp ranks.
  ``kernel=`` picks its attention path: ``torch`` (reference, CPU) or ``triton``
  (:mod:`ryzlab.kv.triton`: reads the compressed pages in registers; the default on CUDA).
* :class:`HeadRotation` / :func:`fwht` — orthogonal (Walsh-Hadamard) rotation of K/V before quantising.
* :mod:`ryzlab.evaluation.plan` — ``plan_kv``: the smallest layout within a KL budget (``ryzlab kv-plan``);
  :mod:`ryzlab.evaluation.peers` — optimum-quanto's cache measured the same way.
"""
from ryzlab.kv.blocks import AppendResult, Block, BlockPool, FreeBlockQueue, hash_block
from ryzlab.kv.cache import PagedKVCache, Step
from ryzlab.kv.codecs import Encoded, KVFormat, TokenBytes, bytes_per_token, decode, encode
from ryzlab.kv.pages import LayerPages, PagedTensor, attention_with_lse
from ryzlab.kv.rotation import HeadRotation, fwht, hadamard

__all__ = ["AppendResult", "Block", "BlockPool", "FreeBlockQueue", "hash_block", "PagedKVCache", "Step",
           "Encoded", "KVFormat", "TokenBytes", "bytes_per_token", "decode", "encode", "PagedTensor",
           "LayerPages", "attention_with_lse", "HeadRotation", "fwht", "hadamard"]
