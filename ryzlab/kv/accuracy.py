"""What a compressed KV cache costs in accuracy, measured against the uncompressed model.

Per cache layout (codec x granularity x residual x block size), on held-out text:

* ``k_rel_err`` / ``v_rel_err``: ``||K_hat - K|| / ||K||`` over every layer, head and token,
  where K/V are the exact (post-RoPE) keys/values of a dense forward and K_hat/V_hat what
  the paged cache gives back after storing them (``PagedKVCache.read_kv``: the pages decoded,
  residual window and not-yet-full blocks in full precision, exactly as attention sees them);
* ``attn_rel_err``: relative error of the causal attention output, per layer, with the exact
  queries over K_hat/V_hat instead of K/V (reference model only: it needs the queries);
* ``kl_per_token``: mean KL(p_exact || p_cache) of the next-token distributions, and
  ``ppl`` / ``ppl_ref`` / ``ppl_delta``: perplexity with the cache, without, and the difference,
  under **teacher forcing**: every sequence is prefilled with its first ``prefill`` tokens,
  then fed its own next tokens one at a time (decode steps that read the cache); the metrics
  cover the ``L - prefill`` predicted positions. Both runs see the same tokens, so errors
  do not compound through different generations.

Semantics differ only where the two code paths differ, and are documented there: the
reference model's paged attention reads every token from the cache, its own step included
(``PagedKVCache.attend``); the HF path (:class:`ryzlab.kv.hf.RyzlabCache`) attends a step's
own tokens at full precision, as HF's ``QuantizedCache`` does.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from ..config import CacheConfig
from ..model import Transformer, apply_rope
from .cache import PagedKVCache

log = logging.getLogger(__name__)

__all__ = ["capture_qkv", "reconstruction_error", "teacher_forced", "evaluate", "evaluate_hf",
           "hf_heldout_tokens", "layout_columns"]


def layout_columns(cfg: CacheConfig) -> dict[str, Any]:
    """The swept cache fields as flat columns."""
    return {k: getattr(cfg, k) for k in ("codec", "key_granularity", "value_granularity", "group_size",
                                         "residual", "block_size", "symmetric")}


# ----------------------------------------------------------------------------- K/V and attention
@torch.no_grad()
def capture_qkv(model: Transformer, tokens: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Exact per-layer (q, k, v) of a dense forward: q [B, T, Hq, D], k/v [B, T, Hkv, D], RoPE applied."""
    cfg = model.config
    B, T = tokens.shape
    cos, sin = model.rope(torch.arange(T, device=tokens.device).expand(B, T), model.tok_embeddings.weight.dtype)
    grabbed: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for name in ("wq", "wk", "wv"):
            hooks.append(getattr(layer.attention, name).register_forward_hook(
                lambda mod, inp, out, key=(i, name): grabbed.__setitem__(key, out)))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i in range(cfg.n_layers):
        q = grabbed[(i, "wq")].view(B, T, cfg.n_heads, cfg.head_dim)
        k = grabbed[(i, "wk")].view(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = grabbed[(i, "wv")].view(B, T, cfg.n_kv_heads, cfg.head_dim)
        out.append((apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)


@torch.no_grad()
def reconstruction_error(model_cfg: Any, cache_cfg: CacheConfig, qkv: Sequence[tuple[torch.Tensor, ...]]
                         ) -> dict[str, float]:
    """Store exact K/V in a fresh paged cache, read them back, compare (K, V and attention output).

    ``qkv``: per layer (q or None, k [B, T, Hkv, D], v). Without queries ``attn_rel_err`` is NaN.
    """
    k0 = qkv[0][1]
    B, T = k0.shape[:2]
    paged = PagedKVCache(model_cfg, cache_cfg, dtype=k0.dtype, device=k0.device)
    for b in range(B):
        paged.add_sequence(("recon", b), 0)
    step = paged.extend([("recon", b) for b in range(B)], [T] * B)
    assert step is not None, "an unbounded cache always has room"
    for layer, (_, k, v) in enumerate(qkv):
        paged.write(layer, k, v, step=step)
    dk = dv = nk = nv = 0.0
    attn_err = []
    for layer, (q, k, v) in enumerate(qkv):
        kv = [paged.read_kv(("recon", b), layer) for b in range(B)]
        kh = torch.stack([x[0] for x in kv])  # [B, T, Hkv, D]
        vh = torch.stack([x[1] for x in kv])
        dk += (kh.float() - k.float()).pow(2).sum().item()
        dv += (vh.float() - v.float()).pow(2).sum().item()
        nk += k.float().pow(2).sum().item()
        nv += v.float().pow(2).sum().item()
        if q is not None:
            attn_err.append(_rel(_causal_attention(q, kh.to(q.dtype), vh.to(q.dtype)), _causal_attention(q, k, v)))
    return {"k_rel_err": math.sqrt(dk / nk), "v_rel_err": math.sqrt(dv / nv),
            "attn_rel_err": sum(attn_err) / len(attn_err) if attn_err else float("nan"),
            "attn_rel_err_max": max(attn_err) if attn_err else float("nan")}


# ----------------------------------------------------------------------------- logits
def _compare_logits(logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """logits/ref [B, n, V] predicting targets [B, n] -> KL, perplexities, relative logit error."""
    lp, lr = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
    kl = F.kl_div(lp, lr, log_target=True, reduction="none").sum(-1)  # [B, n] KL(ref || cache)
    ce = F.cross_entropy(lp.flatten(0, 1), targets.flatten(), reduction="mean").item()
    ce_ref = F.cross_entropy(lr.flatten(0, 1), targets.flatten(), reduction="mean").item()
    return {"kl_per_token": kl.mean().item(), "kl_max": kl.max().item(), "ppl": math.exp(ce),
            "ppl_ref": math.exp(ce_ref), "ppl_delta": math.exp(ce) - math.exp(ce_ref),
            "rel_logit_err": _rel(logits, ref), "tokens_scored": int(targets.numel())}


@torch.no_grad()
def teacher_forced(model: Transformer, tokens: torch.Tensor, cache_cfg: CacheConfig, prefill: int,
                   ref_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Prefill ``tokens[:, :prefill]`` into a paged cache, decode the rest teacher-forced; compare.

    tokens [B, L]; the scored predictions are positions ``prefill-1 .. L-2`` (targets
    ``tokens[:, prefill:]``). ``ref_logits`` [B, L, V]: the dense forward's (computed if None).
    """
    B, L = tokens.shape
    if not 0 < prefill < L:
        raise ValueError(f"prefill={prefill} must be in [1, {L - 1}] for sequences of {L} tokens")
    ref = model(tokens) if ref_logits is None else ref_logits
    paged = PagedKVCache(model.config, cache_cfg, dtype=model.tok_embeddings.weight.dtype,
                         device=tokens.device)
    seqs = list(range(B))
    steps = [model(tokens[:, :prefill], cache=paged, seq_ids=seqs)[:, -1:]]
    for t in range(prefill, L - 1):
        steps.append(model(tokens[:, t:t + 1], cache=paged, seq_ids=seqs))
    logits = torch.cat(steps, dim=1)  # [B, L - prefill, V]
    out = _compare_logits(logits, ref[:, prefill - 1:L - 1], tokens[:, prefill:])
    out.update({f"cache_{k}": v for k, v in paged.ledger().items()
                if k in ("total", "bytes_per_token", "ratio_vs_bf16")})
    return out


@torch.no_grad()
def evaluate(model: Transformer, cache_configs: Sequence[CacheConfig], tokens: torch.Tensor,
             prefill: int) -> pd.DataFrame:
    """Reference-model accuracy per cache layout: one row per layout (see the module docstring)."""
    qkv = capture_qkv(model, tokens)
    ref = model(tokens)
    rows = []
    for cfg in cache_configs:
        row = {**layout_columns(cfg), "model": "reference", "batch": tokens.shape[0], "seq_len": tokens.shape[1],
               "prefill": prefill}
        row.update(reconstruction_error(model.config, cfg, qkv))
        row.update(teacher_forced(model, tokens, cfg, prefill, ref_logits=ref))
        rows.append(row)
        log.info("accuracy %s: KL %.2e ppl delta %.4f", cfg.codec, row["kl_per_token"], row["ppl_delta"])
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- any HF checkpoint
def hf_heldout_tokens(path: str | Path, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of the stdlib held-out text, with the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    from ..corpus import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(str(path))
    text = bytes(stdlib_corpus().heldout.tolist()).decode("utf-8", errors="replace")
    ids = torch.tensor(tok(text[: n * length * 8])["input_ids"], dtype=torch.long)
    if ids.numel() < n * length:
        raise ValueError(f"held-out text gives {ids.numel()} tokens; {n} x {length} needed")
    return ids[: n * length].view(n, length)


@torch.no_grad()
def evaluate_hf(model: Any, cache_options: Sequence[dict[str, Any]], tokens: torch.Tensor, prefill: int
                ) -> pd.DataFrame:
    """Accuracy of :class:`RyzlabCache` layouts on an HF causal LM (an instance or a local path).

    ``cache_options``: dicts of ``RyzlabCache`` keyword arguments (``codec`` plus
    CacheConfig fields). Same metrics as :func:`evaluate` except ``attn_rel_err`` (NaN: the
    HF attention's queries are not captured); exact K/V come from a ``DynamicCache`` prefill.
    """
    from transformers import AutoModelForCausalLM, DynamicCache

    from .hf import RyzlabCache, model_config_from_hf

    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    B, L = tokens.shape
    ref = model(tokens).logits.float()
    dyn = DynamicCache(config=model.config)
    model(tokens[:, :prefill], cache=dyn)
    qkv = [(None, layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in dyn.layers]
    mcfg = model_config_from_hf(model.config)
    rows = []
    for opts in cache_options:
        cache = RyzlabCache(model.config, **opts)
        steps = [model(tokens[:, :prefill], cache=cache).logits[:, -1:]]
        for t in range(prefill, L - 1):
            steps.append(model(tokens[:, t:t + 1], cache=cache).logits)
        row = {**layout_columns(cache.cache_config), "model": getattr(model.config, "_name_or_path", "") or
               type(model).__name__, "batch": B, "seq_len": L, "prefill": prefill}
        row.update(reconstruction_error(mcfg, cache.cache_config, qkv))
        row.update(_compare_logits(torch.cat(steps, 1), ref[:, prefill - 1:L - 1], tokens[:, prefill:]))
        led = cache.ledger()
        row.update(cache_total=led["total"], cache_bytes_per_token=led["bytes_per_token"],
                   cache_ratio_vs_bf16=led["ratio_vs_bf16"])
        rows.append(row)
    return pd.DataFrame(rows)



def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """``python -m ryzlab.kv.accuracy [--hf PATH] [--codecs ...]``: print the accuracy table."""
    import argparse

    from ..config import CODECS
    from ..corpus import heldout_windows
    from ..model import load_reference_model

    ap = argparse.ArgumentParser(description="KV-cache accuracy vs uncompressed on held-out stdlib text "
                                             "(teacher forcing)")
    ap.add_argument("--hf", help="local Hugging Face checkpoint dir (default: the ryzlab reference model)")
    ap.add_argument("--codecs", default="fp8_e4m3,int8,int4", help=f"comma list of {', '.join(CODECS)}")
    ap.add_argument("--key-granularity", default="token_head")
    ap.add_argument("--value-granularity", default="token_head")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--residual", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    opts = [dict(codec=c, key_granularity=a.key_granularity, value_granularity=a.value_granularity,
                 group_size=a.group_size, residual=a.residual, block_size=a.block_size)
            for c in a.codecs.split(",")]
    if a.hf:
        df = evaluate_hf(a.hf, opts, hf_heldout_tokens(a.hf, a.windows, a.length), a.prefill)
    else:
        from ..config import from_dict

        model, _ = load_reference_model()
        df = evaluate(model, [from_dict(CacheConfig, o, where="--codecs") for o in opts],
                      heldout_windows(a.windows, a.length), a.prefill)
    cols = ["codec", "key_granularity", "value_granularity", "residual", "k_rel_err", "v_rel_err", "attn_rel_err",
            "kl_per_token", "ppl", "ppl_ref", "ppl_delta", "rel_logit_err", "cache_ratio_vs_bf16"]
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return df


if __name__ == "__main__":
    main()
