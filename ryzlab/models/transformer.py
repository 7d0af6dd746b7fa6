"""Reference Llama-style decoder (GQA, RoPE, RMSNorm, SwiGLU), gpt-fast style.

The model knows nothing about processes or parallelism. One forward,
``model(tokens, positions, ctx)``: embed, RoPE at ``positions``, the layers (each attends through
the attention context ``ctx``), norm, output head. The serving engine calls it with a
:class:`PagedContext` over a ragged step and asks for the last token's logits only
(``logits_at``). Convenience forms plan ``positions`` and ``ctx`` from a cache::

    logits = model(tokens)                                  # [B, T] -> [B, T, V], dense causal
    logits = model(tokens, cache=DenseKVCache(...))         # [B, T] incremental, contiguous KV
    logits = model(tokens, cache=paged, seq_ids=[...])      # [B, T] on a ryzlab PagedKVCache

* ``cache=None``: training / full recompute; causal ``scaled_dot_product_attention``.
* :class:`DenseKVCache`: the "no paging, no compression" incremental reference, used by
  tests as ground truth (keys/values kept in contiguous ``[B, Hkv, S, D]`` tensors).
* a :class:`ryzlab.kv.cache.PagedKVCache`: the tokens of row ``b`` are appended to sequence
  ``seq_ids[b]`` (prefill of many sequences when ``T > 1``, batched decode when ``T == 1``);
  keys/values are written into the pages (through the cache's codec) and attention reads
  them back from the pages. Unknown ``seq_ids`` are registered on first use
  (``cache.add_sequence``); the caller frees them (``cache.free``).

Positions come from the cache (tokens already stored for that sequence), so RoPE
(:mod:`ryzlab.models.rope`) is computed on the fly from integer positions: no ``max_seq_len``
buffer limits the context.
"""
from __future__ import annotations

import json
import logging
import math
import weakref
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ryzlab.config import ModelConfig
from ryzlab.kv.attention import decode_attention
# rope_inv_freq is called through this module's global (models.source swaps it while it builds
# a meta-device skeleton); the three names stay importable from here for existing callers
from ryzlab.models.rope import RopeFn, apply_rope, rope_cos_sin, rope_inv_freq

log = logging.getLogger(__name__)

__all__ = ["Transformer", "TransformerBlock", "AttentionContext", "CausalContext", "DenseKVCache", "PagedContext",
           "paged_context", "load_reference_model", "save_checkpoint", "load_checkpoint", "REFERENCE_CHECKPOINT",
           "rope_inv_freq", "rope_cos_sin", "apply_rope"]

REFERENCE_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "reference.safetensors"


# ----------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)
        self._gate_up: tuple[nn.Module, list[int]] | None = None  # fuse(): w1 | w3 in one layer, w3's start

    def fuse(self) -> bool:
        """Run w1 and w3 (same input) as one packed call where their weights allow (:func:`concat_int4`)."""
        from ryzlab.models.quant.linear import concat_int4

        self._gate_up = concat_int4([self.w1, self.w3])
        return self._gate_up is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None:
            fused, (_, at) = self._gate_up
            y = fused(x)
            return self.w2(F.silu(y[..., :self.w1.out_features]) * y[..., at:at + self.w3.out_features])
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # n_heads / n_kv_heads are attributes (not read from cfg in forward) so that tensor
        # parallelism can shrink them to the rank's share after the model is built (apply_tp)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self._qkv: tuple[nn.Module, list[int]] | None = None  # fuse(): wq | wk | wv in one layer, their starts

    def fuse(self) -> bool:
        """Run wq, wk and wv (same input) as one packed call where their weights allow (:func:`concat_int4`)."""
        from ryzlab.models.quant.linear import concat_int4

        self._qkv = concat_int4([self.wq, self.wk, self.wv])
        return self._qkv is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: "AttentionContext") -> torch.Tensor:
        B, T, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self._qkv is not None:
            fused, (_, ak, av) = self._qkv
            y = fused(x)
            q, k, v = y[..., :nq], y[..., ak:ak + nkv], y[..., av:av + nkv]
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)      # [B, T, H, D]
        k = k.view(B, T, self.n_kv_heads, self.head_dim)   # [B, T, Hkv, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim)   # [B, T, Hkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v)                    # [B, T, H, D]
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))


class TransformerBlock(nn.Module):
    """One decoder layer: pre-norm attention, then pre-norm SwiGLU, each added to the residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: "AttentionContext"
                ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- attention contexts
def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_offset: int | None) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D]; query t sees keys <= causal_offset + t."""
    H, Hkv = q.shape[2], k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D], [B, Hkv, S, D]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    T, S = q.shape[2], k.shape[2]
    if causal_offset is None or T == 1 and causal_offset == S - 1:
        mask = None
    elif causal_offset == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    else:
        mask = torch.arange(S, device=q.device)[None, :] <= (causal_offset + torch.arange(T, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


class AttentionContext(Protocol):
    """Per-forward attention backend: where this step's K/V go and what attention reads."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D], k/v [B, T, Hkv, D] (RoPE applied) -> attention output [B, T, H, D]."""


class CausalContext:
    """No cache: causal attention over the forward's own tokens (training, full recompute)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _sdpa_gqa(q, k, v, causal_offset=0)


class DenseKVCache:
    """Contiguous, uncompressed incremental cache: the ground truth for paged/compressed paths.

    Keys/values per layer are ``[B, S, Hkv, D]`` tensors grown by concatenation; every row of
    the batch has the same length (the simple case tests need).
    """

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def positions(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        return (self.length + torch.arange(T, device=device)).expand(B, T)

    def step(self, B: int, T: int, device: torch.device) -> tuple[torch.Tensor, AttentionContext]:
        """Plan ``T`` new tokens per row -> (positions [B, T], the context that stores and reads them)."""
        positions, ctx = self.positions(B, T, device), _DenseContext(self, self.length)
        self.length += T
        return positions, ctx


class _DenseContext:
    def __init__(self, cache: DenseKVCache, past: int):
        self.cache, self.past = cache, past

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.keys[layer] = k if c.keys[layer] is None else torch.cat([c.keys[layer], k], dim=1)
        c.values[layer] = v if c.values[layer] is None else torch.cat([c.values[layer], v], dim=1)
        return _sdpa_gqa(q, c.keys[layer], c.values[layer], causal_offset=self.past)


class PagedContext:
    """Writes each layer's new K/V into a ryzlab ``PagedKVCache`` step and attends over its pages.

    The rows are flattened to the cache's ``[N, H, D]`` token list, so a rectangular batch
    (``[B, T]``, every row writing T tokens) and a ragged serving step (``[1, N]``: prefill chunks
    and decodes of many sequences in one row) go through the same calls.

    Under ``torch.compile`` (``EngineConfig.compile``) the cache is reached through opaque
    operators, as vLLM keeps its attention out of the graph: the cache's bookkeeping is Python with
    data-dependent shapes, and a graph break at every layer costs more than the compiled layers
    save. A decode step over plain pages (``cache.plain_decode``) is the exception: its pages come
    in as plain tensors (:meth:`~ryzlab.kv.cache.PagedKVCache.decode_pages`), so the graph writes
    the new K/V and gathers the pages itself and traces the attention math
    (:func:`ryzlab.kv.attention.decode_attention`) after them; any other step calls
    ``ryzlab::paged_attention`` (write and attend), which finds the live context by the cache's id.
    """

    def __init__(self, cache: Any, step: Any, *, compiled: bool = False):
        self.cache, self.step = cache, step
        self.key = id(cache)
        plain = getattr(cache, "plain_decode", None)
        self.visible: torch.Tensor | None = step.causal_mask[:, 0] if plain is not None and plain(step) else None
        """``[B, S]`` which gathered keys are real, on a plain decode step (else None)."""
        self.pages = cache.decode_pages(step) if compiled and self.visible is not None else None
        """A plain decode step's pages as tensors, what a ``compiled`` forward writes and reads
        (built only for one: ~30 us a step an eager forward would not use)."""
        _LIVE[self.key] = self

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return self.write_attend(layer, q, k, v)
        if self.pages is None:
            return torch.ops.ryzlab.paged_attention(q, k, v, layer, self.key)
        keys, values = self.pages.write_read(layer, k.flatten(0, 1), v.flatten(0, 1))   # [B, S, Hkv, D]
        return decode_attention(q.flatten(0, 1), keys.transpose(1, 2), values.transpose(1, 2),  # [B, Hkv, S, D]
                                self.visible).view(q.shape)

    def write_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.cache.write_attend(layer, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), step=self.step)
        return out.view(q.shape)  # [B, T, H, D]


_LIVE: weakref.WeakValueDictionary[int, PagedContext] = weakref.WeakValueDictionary()
"""The contexts of the forwards now running, by cache id (what the operators below read)."""


# The operators' K/V pages are state they own, not arguments: they declare no mutation. Their
# calls cannot be reordered or dropped: each layer's call reads the previous layer's output and
# its own output feeds the next layer.
@torch.library.custom_op("ryzlab::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, key: int) -> torch.Tensor:
    return _LIVE[key].write_attend(layer, q, k, v)


@_paged_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, key: int) -> torch.Tensor:
    return torch.empty_like(q)


def paged_context(cache: Any, tokens: torch.Tensor, seq_ids: Sequence[Any] | None
                  ) -> tuple[torch.Tensor, PagedContext]:
    """Plan one forward step of ``tokens [B, T]`` on a ``PagedKVCache`` -> (positions [B, T], context).

    Unknown ``seq_ids`` are registered first. Token ids are passed to the cache, so full blocks
    get prefix hashes (another sequence added later with the same prompt can share them).
    """
    B, T = tokens.shape
    seq_ids = list(range(B)) if seq_ids is None else list(seq_ids)
    if len(seq_ids) != B:
        raise ValueError(f"seq_ids has {len(seq_ids)} entries for a batch of {B} rows")
    for s in seq_ids:
        if s not in cache and cache.add_sequence(s, []) is None:
            raise RuntimeError(f"paged KV cache is out of blocks: cannot add sequence {s!r}; "
                               f"free or evict sequences, or raise CacheConfig.num_blocks")
    step = cache.extend(seq_ids, tokens.tolist())
    if step is None:
        raise RuntimeError(f"paged KV cache is out of blocks for {B} x {T} new tokens "
                           f"(stats: {cache.stats()}); free or evict sequences, or raise num_blocks")
    return step.positions.view(B, T), PagedContext(cache, step)


# ----------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # frequencies in float32, not a buffer: model.to(bfloat16) must not round them
        self.rope = RopeFn(cfg, rope_inv_freq(cfg))
        """``rope(positions, dtype) -> (cos, sin)`` ``[..., head_dim]`` (:class:`ryzlab.models.rope.RopeFn`)."""
        if self.inv_freq.device.type != "meta":  # a meta-device skeleton is filled by a loader
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
                if name.endswith(("wo.weight", "w2.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies ``[head_dim / 2]`` (float32; a loader sets them on its device)."""
        return self.rope.inv_freq

    @inv_freq.setter
    def inv_freq(self, value: torch.Tensor) -> None:
        self.rope.inv_freq = value

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                ctx: AttentionContext | None = None, *, cache: Any = None, seq_ids: Sequence[Any] | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """The model's one forward: tokens [B, T] (or [T], treated as B=1) at integer ``positions``
        [B, T] through the attention context ``ctx`` -> logits [B, T, vocab] (float32).

        Without ``ctx``, ``cache`` plans it (the convenience forms): None (dense causal, positions
        0..T-1), a :class:`DenseKVCache`, or a ryzlab ``PagedKVCache`` (then ``seq_ids`` [B] names
        the sequence each row extends; default ``range(B)``).
        ``logits_at``: indices into the flattened ``B * T`` tokens; only those rows go through the
        norm and the output head -> logits [len(logits_at), vocab] (a serving step needs the
        last token of each sequence only).
        """
        if tokens.dim() == 1:
            tokens = tokens[None]
        if ctx is None:
            if positions is not None:
                raise ValueError("positions without ctx: pass both, or neither (cache= plans them)")
            positions, ctx = self.context(tokens, cache, seq_ids)
        elif positions is None or cache is not None or seq_ids is not None:
            raise ValueError("ctx needs positions, and replaces cache= / seq_ids=")
        x = self.tok_embeddings(tokens)                                   # [B, T, dim]
        cos, sin = self.rope(positions, x.dtype)                          # [B, T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]                                # [n, dim]
        return self.output(self.norm(x)).float()                          # [B, T, V] or [n, V]

    def context(self, tokens: torch.Tensor, cache: Any = None, seq_ids: Sequence[Any] | None = None
                ) -> tuple[torch.Tensor, AttentionContext]:
        """(positions [B, T], attention context) of ``tokens [B, T]`` over ``cache`` (see :meth:`forward`)."""
        B, T = tokens.shape
        if cache is None:
            if seq_ids is not None:
                raise ValueError("seq_ids is only meaningful with a paged cache (cache=PagedKVCache)")
            return torch.arange(T, device=tokens.device).expand(B, T), CausalContext()
        if isinstance(cache, DenseKVCache):
            return cache.step(B, T, tokens.device)
        return paged_context(cache, tokens, seq_ids)

    def fuse_projections(self) -> int:
        """Each layer's q / k / v and gate / up projections as one packed call each where the weight
        format allows (int4 today: :func:`ryzlab.models.quant.linear.concat_int4`); the same outputs,
        fewer kernel calls per token. How many groups were fused."""
        return sum(int(layer.attention.fuse()) + int(layer.feed_forward.fuse()) for layer in self.layers)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, cache: Any = None,
                 seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Greedy decoding: prompt [B, T] -> [B, max_new_tokens]. Without a cache: DenseKVCache."""
        cache = DenseKVCache(self.config.n_layers) if cache is None else cache
        kw = {} if isinstance(cache, DenseKVCache) else {"seq_ids": seq_ids}
        logits = self(prompt, cache=cache, **kw)
        out = []
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)                 # [B, 1]
            out.append(nxt)
            logits = self(nxt, cache=cache, **kw)
        return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: Transformer, path: str | Path, meta: dict[str, Any],
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """Weights as safetensors (``dtype``, bf16 by default to stay small) + ``<stem>.json`` metadata."""
    import dataclasses

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_embeddings:  # one tensor on disk (safetensors refuses shared storage)
        state.pop("output.weight", None)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    meta = {"config": dataclasses.asdict(model.config), "weights_dtype": str(dtype).removeprefix("torch."), **meta}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` -> (model in eval mode, metadata)."""
    from safetensors.torch import load_file

    from ryzlab.config import from_dict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python -m ryzlab.models.train`")
    meta = json.loads(path.with_suffix(".json").read_text())
    model = Transformer(from_dict(ModelConfig, meta["config"], where=str(path)))
    state = {k: v.to(dtype) for k, v in load_file(str(path), device=str(device)).items()}
    model.load_state_dict(state, strict=not model.config.tie_embeddings)
    return model.to(device=device, dtype=dtype).eval(), meta


def load_reference_model(dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """The shipped byte-level reference model (trained by ``python -m ryzlab.models.train``) + its metadata."""
    return load_checkpoint(REFERENCE_CHECKPOINT, dtype=dtype, device=device)
