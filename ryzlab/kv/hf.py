"""Hugging Face ``transformers`` integration: any local causal LM on the ryzlab paged cache.

    from ryzlab.kv.hf import RyzlabCache
    cache = RyzlabCache(model.config, codec="int4", key_granularity="channel", residual=128)
    out = model.generate(ids, cache=cache, max_new_tokens=32)
    cache.ledger()   # {"payload": ..., "scales": ..., "residual": ..., "padding": ..., "metadata": ..., "total": ...}

:class:`RyzlabCache` is a ``transformers.Cache`` whose layers (:class:`RyzlabLayer`, one per
decoder layer) all write into ONE :class:`ryzlab.kv.cache.PagedKVCache`: batch row ``b`` is
a paged sequence, each forward is one ``extend`` step (planned when the first layer of the
forward calls ``update``), ``update`` quantises the new keys/values into the pages through
the ryzlab codecs and returns the keys/values the model's own attention then uses
(``[B, Hkv, S, D]``, as ``DynamicCache`` does): every earlier token decoded from the pages,
this step's own tokens at full precision (they are at hand; vLLM's prefill and HF's
``QuantizedCache`` do the same, so a prefill's hidden states are exact and the error is
what the compressed cache adds to later steps). With codec ``none`` the pages hold the model
dtype, so logits and greedy tokens equal ``DynamicCache``'s.

Rows of a batch always have the same length here (HF pads; the attention mask hides the
padding), so the paged cache's ragged machinery is not needed on this path. Beam search and
``num_return_sequences`` reorder/duplicate rows with the paged cache's copy-on-write
``fork``, without a lossy decode/re-encode round trip.

Rotation (``rotation="hadamard"``): the pages hold rotated K/V. HF attention computes
``q k^T`` itself, so either the cache rotates every cached vector back on each step (exact,
one ``[D, D]`` product per cached vector: the fallback, logged once) or the model uses the
``ryzlab_sdpa`` attention (:func:`use_rotated_attention`), which rotates this step's queries
and its output instead (``sdpa`` otherwise), so the cost does not grow with the context::

    use_rotated_attention(model)
    cache = RyzlabCache(model.config, codec="int4", rotation="hadamard")
"""
from __future__ import annotations

import contextvars
import itertools
import logging
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ryzlab.config import CacheConfig, ModelConfig, field_names, from_dict
from ryzlab.kv.cache import PagedKVCache
from ryzlab.kv.store import KeyRope

log = logging.getLogger(__name__)

__all__ = ["RyzlabCache", "RyzlabLayer", "LEDGER_KEYS", "model_config_from_hf", "valid_options",
           "ROTATED_ATTENTION", "use_rotated_attention", "load_hf_causal_lm"]

LEDGER_KEYS = ("payload", "scales", "residual", "padding", "metadata", "total")
ROTATED_ATTENTION = "ryzlab_sdpa"
"""``attn_implementation`` that lets a rotated :class:`RyzlabCache` hand back rotated K/V."""
# The rotation the next attention call must apply: set by RyzlabCache.update, which HF calls
# right before the same layer's attention function (one thread runs both).
_PENDING_ROTATION: contextvars.ContextVar[Any] = contextvars.ContextVar("ryzlab_pending_rotation", default=None)


def _rotated_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``sdpa`` with the query rotated into the cache's basis and the output rotated back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rot = _PENDING_ROTATION.get()
    if rot is None:  # no rotated cache in this call (or another cache): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _PENDING_ROTATION.set(None)
    out, weights = sdpa_attention_forward(module, rot.apply(query), key, value, attention_mask, **kwargs)
    return rot.invert(out), weights  # out [B, T, Hq, D]: the rotation acts on the last dim


def use_rotated_attention(model: Any) -> None:
    """Register ``ryzlab_sdpa`` (sdpa + its mask) and make ``model`` use it.

    Identical to sdpa for every cache; with a rotated :class:`RyzlabCache` it avoids rotating
    the whole cache back on every step (see the module doc).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROTATED_ATTENTION, _rotated_sdpa)
    AttentionMaskInterface.register(ROTATED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROTATED_ATTENTION)


def model_config_from_hf(config: Any) -> ModelConfig:
    """The shape a :class:`PagedKVCache` needs (layers, KV heads, head_dim) from an HF config.

    Shape only: the RoPE fields keep ModelConfig's defaults. A cache that stores keys before RoPE
    gets the model's RoPE as ``rope=`` instead (the model side parses it, see :class:`RyzlabCache`).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_heads = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return ModelConfig(vocab_size=text.vocab_size, dim=n_heads * head_dim, n_layers=text.num_hidden_layers,
                       n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=getattr(text, "intermediate_size", 0) or 0,
                       max_seq_len=getattr(text, "max_position_embeddings", 4096) or 4096)


class RyzlabLayer(CacheLayerMixin):
    """One decoder layer's view of the shared paged cache (a thin adapter; no storage of its own)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, parent: "RyzlabCache", layer_idx: int):
        super().__init__()
        self.parent, self.layer_idx = parent, layer_idx
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states`` [B, Hkv, T, D]; return all keys/values [B, Hkv, S, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.parent._update(self.layer_idx, key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RyzlabCache cannot be cropped (quantised blocks are not rolled back); "
                                  "assisted/speculative generation needs DynamicCache")

    # Row reordering is done once for all layers by RyzlabCache (the pages are shared).
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # pragma: no cover - routed by parent
        raise AssertionError("RyzlabCache.reorder_cache handles all layers at once")

    def offload(self) -> None:
        raise NotImplementedError("RyzlabCache does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("RyzlabCache does not support offloading")


class RyzlabCache(Cache):
    """A ``transformers`` Cache backed by a ryzlab :class:`PagedKVCache` (any codec).

    ``config`` is the HF model config; ``cache_options`` are :class:`ryzlab.config.CacheConfig`
    fields (``codec``, ``key_granularity``, ``value_granularity``, ``group_size``, ``residual``,
    ``block_size``, ``num_blocks``, ``symmetric``, ``rotation``, ``layer_codecs``, ...) with
    CacheConfig's defaults (codec ``none``). Invalid names or values raise
    :class:`ryzlab.config.ConfigError` listing the valid ones. The paged storage is created on
    the first ``update`` (when the dtype and device are known). ``rope`` is the model's RoPE
    (:class:`ryzlab.kv.store.KeyRope`, on the model's device), required with ``pre_rope_keys=True``.
    """

    def __init__(self, config: Any, *, rope: KeyRope | None = None, **cache_options: Any):
        self.cache_config: CacheConfig = from_dict(CacheConfig, cache_options, where="RyzlabCache")
        if self.cache_config.pre_rope_keys and rope is None:
            raise ValueError("RyzlabCache(pre_rope_keys=True) redoes the model's RoPE at every read: pass "
                             "rope=KeyRope(...) built from the model's RoPE config")
        self.rope = rope
        self.model_config = model_config_from_hf(config)
        self.cache_config.check_head_dim(self.model_config.head_dim)
        self.cache_config.check_layers(self.model_config.n_layers)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types, _ = get_layer_types_and_kwargs(text)
        if set(layer_types) - {"full_attention"}:
            raise ValueError(f"RyzlabCache supports full-attention layers only; this model has "
                             f"{sorted(set(layer_types))}")
        self.paged: PagedKVCache | None = None
        self._rows: list[int] = []          # batch row -> paged sequence id
        self._ids = itertools.count()
        self._written: set[int] = set()     # layers already written in the current step
        self._step: Any = None
        self._hf_config = text
        self._warned_unrotate = False
        super().__init__(layers=[RyzlabLayer(self, i) for i in range(self.model_config.n_layers)])

    # ------------------------------------------------------------------ the hot path
    def _update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if self.paged is None:
            self.paged = PagedKVCache(self.model_config, self.cache_config, dtype=k.dtype, device=k.device,
                                      rope=self.rope)
        if not self._rows:
            self._rows = [next(self._ids) for _ in range(B)]
            for s in self._rows:
                if self.paged.add_sequence(s, 0) is None:
                    raise RuntimeError(f"ryzlab cache out of blocks (num_blocks={self.cache_config.num_blocks})")
        if len(self._rows) != B:
            raise ValueError(f"batch has {B} rows but the cache holds {len(self._rows)} sequences; "
                             f"use a fresh RyzlabCache for a new batch")
        if self._step is None or layer in self._written:  # first layer of a new forward: plan the step
            self._step = self.paged.extend(self._rows, [T] * B)
            if self._step is None:
                raise RuntimeError(f"ryzlab cache out of blocks for {B} x {T} new tokens "
                                   f"(num_blocks={self.cache_config.num_blocks}); raise num_blocks")
            self._written.clear()
        self._written.add(layer)
        # [B, Hkv, T, D] -> [B, T, Hkv, D]: the pages' token-major layout
        self.paged.write(layer, k.transpose(1, 2), v.transpose(1, 2), step=self._step)
        # pre-RoPE keys come back in the model's basis, so only the values would stay rotated: the
        # rotated attention (q and output) does not apply there
        rotated = self.paged.rotation is not None and not self.cache_config.pre_rope_keys and self._rotated_attention()
        keys, values = self.paged.gather(layer, step=self._step, heads_first=True,
                                         rotated=rotated)  # [B, Hkv, S_pad, D]
        S = self._step.context_lens[0]
        # This step's own tokens are attended at full precision (their K/V are at hand), as in
        # vLLM's prefill and HF's QuantizedCache; everything cached before is read back decoded.
        keys[:, :, S - T:S] = self.paged.rotate(k) if rotated else k
        values[:, :, S - T:S] = self.paged.rotate(v) if rotated else v
        if rotated:  # the layer's attention call, next, rotates q and the output
            _PENDING_ROTATION.set(self.paged.rotation)
        return keys[:, :, :S], values[:, :, :S]

    def _rotated_attention(self) -> bool:
        if getattr(self._hf_config, "_attn_implementation", None) == ROTATED_ATTENTION:
            return True
        if not self._warned_unrotate:
            log.warning("RyzlabCache(rotation=%r): the model's attention is %r, so every cached K/V vector is "
                        "rotated back on each step (fallback, exact but slower); use_rotated_attention(model) "
                        "avoids it", self.cache_config.rotation,
                        getattr(self._hf_config, "_attn_implementation", None))
            self._warned_unrotate = True
        return False

    # ------------------------------------------------------------------ row bookkeeping
    def _remap(self, rows: list[int]) -> None:
        """New batch = old rows ``rows`` (forks: copy-on-write, no decode/re-encode)."""
        if self.paged is None or not self._rows:
            return
        new = []
        for r in rows:
            child = next(self._ids)
            self.paged.fork(self._rows[r], child)
            new.append(child)
        for s in self._rows:
            self.paged.free(s)
        self._rows = new
        self._step = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._remap([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._remap([r for r in range(len(self._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._remap([int(i) for i in torch.as_tensor(indices).tolist()])

    def reset(self) -> None:
        if self.paged is not None:
            for s in self._rows:
                self.paged.free(s)
        self._rows, self._step = [], None
        self._written.clear()
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    # ------------------------------------------------------------------ accounting
    def ledger(self) -> dict[str, float]:
        """Bytes held now, by kind (all layers, K + V; see ``PagedKVCache.ledger``).

        Keys: ``payload``, ``scales``, ``residual``, ``padding``, ``metadata``, ``total``, plus
        ``tokens``, ``bytes_per_token`` and ``ratio_vs_bf16`` for convenience.
        """
        if self.paged is None:
            return {k: 0.0 for k in LEDGER_KEYS} | {"tokens": 0.0, "bytes_per_token": 0.0, "ratio_vs_bf16": 0.0}
        led = self.paged.ledger()
        return {k: float(led[k]) for k in (*LEDGER_KEYS, "tokens", "bytes_per_token", "ratio_vs_bf16")}

    def __repr__(self) -> str:
        return f"RyzlabCache({self.cache_config}, layers={len(self.layers)})"


def load_hf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A transformers causal LM from a local folder or a ``.gguf`` file (``gguf_file=``: transformers
    dequantises the weights to ``dtype``), in eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"{str(path)!r}: no such .gguf file")
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype).eval()
    if not p.is_dir():
        raise ValueError(f"{str(path)!r} is neither a Hugging Face folder nor a .gguf file")
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).eval()


def valid_options() -> list[str]:
    """CacheConfig field names accepted as ``RyzlabCache(**cache_options)`` (besides ``codec``)."""
    return [f for f in field_names(CacheConfig) if f != "codec"]

