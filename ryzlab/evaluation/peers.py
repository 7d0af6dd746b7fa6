"""Peer KV caches measured like ryzlab's: Hugging Face ``QuantizedCache`` (optimum-quanto).

The peer configuration is ``../shared/peers/hf_cache_baseline.py``'s: int4 or int2, one
scale and shift per group of 64 values along head_dim (axis 0: per token), the 128 most
recent tokens in full precision. Bytes come from the peer's own counter (packed data + scales
+ shifts + the residual window); accuracy from teacher forcing on a transformers model (a
folder or a ``.gguf`` file) against the same model with ``DynamicCache``, with the same metric
code as ryzlab's layouts (:func:`ryzlab.evaluation.accuracy.compare_logits`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

__all__ = ["Peer", "PEERS", "peer_cache", "tensor_bytes", "hf_cache_bytes", "teacher_forced_hf", "evaluate_peer"]

Peer = Literal["quanto_int4", "quanto_int2"]
PEERS: tuple[str, ...] = get_args(Peer)


def peer_cache(config: Any, peer: str) -> Any:
    """A fresh ``QuantizedCache`` for ``peer`` (the peer script's settings)."""
    from transformers.cache_utils import QuantizedCache

    from ryzlab.config import check_choice

    check_choice("peer", peer, PEERS)
    return QuantizedCache(backend="quanto", config=config, nbits=int(peer[-1]), axis_key=0, axis_value=0,
                          q_group_size=64, residual_length=128)


def tensor_bytes(t: Any) -> int:
    """The peer's counter: optimum-quanto packed tensors count data + scale + shift; containers
    (tuples, lists, dicts of tensors, as some caches keep) are walked; anything else is 0."""
    if isinstance(t, (tuple, list)):
        return sum(tensor_bytes(x) for x in t)
    if isinstance(t, dict):
        return sum(tensor_bytes(x) for x in t.values())
    if not torch.is_tensor(t):
        return 0
    if hasattr(t, "_data") and hasattr(t, "_scale"):
        d = getattr(t._data, "_data", t._data)
        return d.numel() * d.element_size() + sum(x.numel() * x.element_size() for x in (t._scale, t._shift))
    return t.numel() * t.element_size()


def hf_cache_bytes(cache: Any) -> int:
    """Bytes an HF cache holds, summed over its layers' attributes."""
    return sum(tensor_bytes(v) for layer in cache.layers for v in vars(layer).values())


@torch.no_grad()
def teacher_forced_hf(model: Any, tokens: torch.Tensor, prefill: int, make_cache: Callable[[], Any]
                      ) -> tuple[torch.Tensor, Any]:
    """Prefill ``tokens[:, :prefill]`` into ``make_cache()``, then feed the rest one token at a time.

    -> (logits ``[B, L - prefill, V]`` float32 predicting ``tokens[:, prefill:]``, the cache).
    """
    L = tokens.shape[1]
    cache = make_cache()
    steps = [model(tokens[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].float()]
    for t in range(prefill, L - 1):
        steps.append(model(tokens[:, t:t + 1], cache=cache, use_cache=True).logits.float())
    return torch.cat(steps, 1), cache


def evaluate_peer(model: Any, peer: str, tokens: torch.Tensor, prefill: int) -> dict[str, float]:
    """KL / perplexity / top-1 of ``peer`` vs ``DynamicCache`` on the same model, plus its bytes."""
    from transformers import DynamicCache

    from ryzlab.evaluation.accuracy import compare_logits

    ref, _ = teacher_forced_hf(model, tokens, prefill, lambda: DynamicCache(config=model.config))
    logits, cache = teacher_forced_hf(model, tokens, prefill, lambda: peer_cache(model.config, peer))
    total = float(hf_cache_bytes(cache))
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bf16 = 2.0 * text.num_hidden_layers * n_kv * head_dim * 2
    bpt = total / tokens[:, :-1].numel()  # the cache holds every token but the last of each row
    return {**compare_logits(logits, ref, tokens[:, prefill:]), "kv_bytes_per_token": bpt, "cache_total": total,
            "ratio_vs_bf16": bpt / bf16}
