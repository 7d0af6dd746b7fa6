"""Paged, compressed KV cache: block bookkeeping, codecs, paged storage + attention.

Split along vLLM v1's seam, bookkeeping apart from the bytes (each module's docstring says more):

* :class:`PagedKVCache` (:mod:`.cache`) — what a model and the serving engine call: ``add_sequence`` /
  ``allocate_slots`` / ``extend`` / ``write`` / ``attend`` / ``read_kv`` / ``restore`` / ``evict_cached`` /
  ``ledger`` / ``stats``; context-parallel with ``cp=`` (log-sum-exp partials merged,
  :mod:`.merge`); :mod:`.context` migrates and checks blocks across cp ranks. It composes:
* :class:`KVCacheManager` (:mod:`.manager`) — bookkeeping without tensors: each sequence's progress,
  ``allocate_slots`` (blocks or None), prefix cache, eviction, capacity; over
  :class:`BlockPool` (:mod:`.blocks`: ref counts, prefix hashes, copy-on-write, cp shards) of
  :class:`KVBlock` s in an LRU :class:`FreeBlockQueue` (:mod:`.free_queue`);
* :class:`PageStore` (:mod:`.store`) — one rank's bytes: :class:`LayerPages` / :class:`PagedTensor`
  (:mod:`.pages`), the full-precision tail, codec / rotation / pre-RoPE transforms (the model's
  RoPE injected as a :class:`KeyRope`); :class:`Step` (:mod:`.step`) plans a step from both halves;
* attention backends (:mod:`.attention`): :class:`TorchAttention` (reference, CPU) and
  :class:`TritonAttention` (:mod:`.triton`: reads the compressed pages in registers; the default
  on CUDA), picked by ``kernel=``.
* :class:`KVFormat` (:mod:`.codecs`) — codec + scale granularity: ``encode`` / ``decode`` / ``bytes_per_token``.
* :class:`HeadRotation` / :func:`fwht` (:mod:`.rotation`) — orthogonal (Walsh-Hadamard) rotation of K/V
  before quantising.
* :mod:`ryzlab.evaluation.plan` — ``plan_kv``: the smallest layout within a KL budget (``ryzlab kv-plan``);
  :mod:`ryzlab.evaluation.peers` — optimum-quanto's cache measured the same way.
"""
from ryzlab.kv.attention import TorchAttention, TritonAttention, attention_with_lse
from ryzlab.kv.blocks import AppendResult, BlockPool, hash_block
from ryzlab.kv.cache import PagedKVCache
from ryzlab.kv.codecs import Encoded, KVFormat, TokenBytes, bytes_per_token, decode, encode
from ryzlab.kv.free_queue import FreeBlockQueue, KVBlock
from ryzlab.kv.manager import KVCacheManager
from ryzlab.kv.pages import LayerPages, PagedTensor
from ryzlab.kv.rotation import HeadRotation, fwht, hadamard
from ryzlab.kv.step import Step
from ryzlab.kv.store import KeyRope, PageStore

__all__ = ["AppendResult", "KVBlock", "BlockPool", "FreeBlockQueue", "hash_block", "KVCacheManager", "PagedKVCache",
           "Step", "PageStore", "KeyRope", "TorchAttention", "TritonAttention", "Encoded", "KVFormat", "TokenBytes",
           "bytes_per_token", "decode", "encode", "PagedTensor", "LayerPages", "attention_with_lse", "HeadRotation",
           "fwht", "hadamard"]
