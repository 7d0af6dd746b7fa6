"""What a compressed KV cache costs in accuracy, measured against the uncompressed model.

Per cache layout (codec x granularity x residual x block size), on held-out text:

* ``k_rel_err`` / ``v_rel_err``: ``||K_hat - K|| / ||K||`` over every layer, head and token,
  where K/V are the exact (post-RoPE) keys/values of a dense forward and K_hat/V_hat what
  the paged cache gives back after storing them (``PagedKVCache.read_kv``: the pages decoded,
  residual window and not-yet-full blocks in full precision, exactly as attention sees them);
* ``attn_rel_err``: relative error of the causal attention output, per layer, with the exact
  queries over K_hat/V_hat instead of K/V (reference model only: it needs the queries);
* under **teacher forcing**, every window is prefilled with its first ``prefill`` tokens, then
  fed its own next tokens one at a time — decode steps that really read the compressed cache —
  and the ``L - prefill`` predicted positions are compared with the same run through the
  **uncompressed** paged cache (codec ``none``, same block size): ``ppl`` / ``ppl_ref`` /
  ``ppl_delta`` (perplexity with the cache, uncompressed, and the difference), ``kl_per_token``
  (mean KL(p_uncompressed || p_cache) of the next-token distributions), ``top1_agree`` (fraction
  of positions whose argmax equals the uncompressed cache's), ``rel_logit_err``; ``ppl_dense``
  is the dense forward's (no cache at all) perplexity on the same positions, a check that the
  uncompressed paged path is the model. Both runs see the same tokens, so errors do not
  compound through different generations;
* memory: ``kv_bytes_per_token`` and ``ratio_vs_bf16`` from the cache's byte ledger after the
  run (scales, residual window, block padding and tables included), ``cache_total``.

Any model ryzlab loads (:func:`ryzlab.models.load_model`: the reference model, a Hugging Face
folder, a GGUF file) runs through ryzlab's own Transformer and :class:`PagedKVCache`; windows
come from the model's tokenizer on a text file (:func:`ryzlab.models.corpus.text_windows`; default the
held-out stdlib text). ``python -m ryzlab.evaluation.accuracy --model PATH --preset standard`` prints
the table.

Semantics differ only where the two code paths differ, and are documented there: ryzlab's
Transformer reads every token from the paged cache, its own step included
(``PagedKVCache.attend``); :func:`evaluate_hf` (a transformers model on
:class:`ryzlab.kv.hf.RyzlabCache`) attends a step's own tokens at full precision, as HF's
``QuantizedCache`` does.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from ryzlab.config import CacheConfig
from ryzlab.models.rope import apply_rope, rope_cos_sin, rope_inv_freq
from ryzlab.models.transformer import Transformer
from ryzlab.kv.cache import PagedKVCache
from ryzlab.kv.store import KeyRope

log = logging.getLogger(__name__)

__all__ = ["capture_qkv", "reconstruction_error", "decode_logits", "compare_logits", "teacher_forced", "evaluate", "evaluate_hf",
           "dense_perplexity", "layout_label", "parse_layout", "STANDARD_LAYOUTS", "uncompressed",
           "hf_heldout_tokens", "layout_columns"]


def layout_columns(cfg: CacheConfig) -> dict[str, Any]:
    """The swept cache fields as flat columns."""
    cols = {k: getattr(cfg, k) for k in ("codec", "key_granularity", "value_granularity", "group_size",
                                         "residual", "block_size", "symmetric", "rotation")}
    return cols | {"layer_codecs": "/".join(cfg.layer_codecs)}


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
    paged = PagedKVCache(model_cfg, cache_cfg, dtype=k0.dtype, device=k0.device,
                         rope=KeyRope(rope_inv_freq(model_cfg, k0.device), rope_cos_sin, apply_rope))
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
def compare_logits(logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor, chunk: int = 64
                    ) -> dict[str, float]:
    """logits/ref [B, n, V] predicting targets [B, n] -> KL, perplexities, top-1 agreement, relative logit error.

    Accumulated over ``chunk`` positions at a time: with a 50k-token vocabulary the log-softmax
    copies of whole ``[B, n, V]`` tensors would be gigabytes.
    """
    kl_sum = kl_max = ce = ce_ref = agree = diff2 = ref2 = 0.0
    n = logits.shape[1]
    for a in range(0, n, chunk):
        lg, rf, tg = logits[:, a:a + chunk].float(), ref[:, a:a + chunk].float(), targets[:, a:a + chunk]
        lp, lr = lg.log_softmax(-1), rf.log_softmax(-1)
        kl = F.kl_div(lp, lr, log_target=True, reduction="none").sum(-1)  # [B, c] KL(ref || cache)
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        ce += F.cross_entropy(lp.flatten(0, 1), tg.flatten(), reduction="sum").item()
        ce_ref += F.cross_entropy(lr.flatten(0, 1), tg.flatten(), reduction="sum").item()
        agree += (lp.argmax(-1) == lr.argmax(-1)).sum().item()
        diff2 += (lg - rf).pow(2).sum().item()
        ref2 += rf.pow(2).sum().item()
    count = targets.numel()
    ppl, ppl_ref = math.exp(ce / count), math.exp(ce_ref / count)
    return {"kl_per_token": kl_sum / count, "kl_max": kl_max, "ppl": ppl, "ppl_ref": ppl_ref,
            "ppl_delta": ppl - ppl_ref, "top1_agree": agree / count,
            "rel_logit_err": math.sqrt(diff2 / max(ref2, 1e-30)), "tokens_scored": int(count)}


@torch.no_grad()
def decode_logits(model: Transformer, tokens: torch.Tensor, cache_cfg: CacheConfig, prefill: int
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Prefill ``tokens[:, :prefill]`` into a fresh paged cache, then decode the rest teacher-forced.

    tokens [B, L] -> (logits [B, L - prefill, V] float32 predicting ``tokens[:, prefill:]``, the
    cache's byte ledger at the end). Every decode step reads the (compressed) cache.
    """
    B, L = tokens.shape
    if not 0 < prefill < L:
        raise ValueError(f"prefill={prefill} must be in [1, {L - 1}] for sequences of {L} tokens")
    cfg = model.config if not hasattr(model, "local_config") else model.local_config
    paged = PagedKVCache(cfg, cache_cfg, dtype=model.tok_embeddings.weight.dtype, device=tokens.device,
                         rope=KeyRope(rope_inv_freq(cfg, tokens.device), rope_cos_sin, apply_rope))
    seqs = list(range(B))
    out = torch.empty(B, L - prefill, model.config.vocab_size, dtype=torch.float32, device=tokens.device)
    out[:, 0] = model(tokens[:, :prefill], cache=paged, seq_ids=seqs)[:, -1]
    for t in range(prefill, L - 1):
        out[:, t - prefill + 1] = model(tokens[:, t:t + 1], cache=paged, seq_ids=seqs)[:, 0]
    return out, paged.ledger()


def _ledger_columns(led: dict[str, float]) -> dict[str, float]:
    return {"kv_bytes_per_token": led["bytes_per_token"], "ratio_vs_bf16": led["ratio_vs_bf16"],
            "cache_total": led["total"], "cache_bytes_per_token": led["bytes_per_token"],
            "cache_ratio_vs_bf16": led["ratio_vs_bf16"]}


def uncompressed(cfg: CacheConfig) -> CacheConfig:
    """The reference layout for ``cfg``: the same pages (block size), codec ``none``."""
    return CacheConfig(codec="none", block_size=cfg.block_size)


@torch.no_grad()
def teacher_forced(model: Transformer, tokens: torch.Tensor, cache_cfg: CacheConfig, prefill: int,
                   ref_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Teacher-forced decode through ``cache_cfg``, compared with the uncompressed cache.

    tokens [B, L]; the scored predictions are positions ``prefill-1 .. L-2`` (targets
    ``tokens[:, prefill:]``). ``ref_logits`` [B, L - prefill, V]: the uncompressed cache's
    (:func:`decode_logits` with :func:`uncompressed`; computed if None).
    """
    B, L = tokens.shape
    if not 0 < prefill < L:
        raise ValueError(f"prefill={prefill} must be in [1, {L - 1}] for sequences of {L} tokens")
    ref = decode_logits(model, tokens, uncompressed(cache_cfg), prefill)[0] if ref_logits is None else ref_logits
    logits, led = decode_logits(model, tokens, cache_cfg, prefill)
    return {**compare_logits(logits, ref, tokens[:, prefill:]), **_ledger_columns(led)}


@torch.no_grad()
def dense_perplexity(model: Transformer, tokens: torch.Tensor, prefill: int) -> float:
    """Perplexity of a dense forward (no cache) on the positions teacher forcing scores; one window at a time."""
    nll, n = 0.0, 0
    for row in tokens:
        logits = model(row[None])[0, prefill - 1:-1]                       # [L - prefill, V]
        nll += F.cross_entropy(logits.float(), row[prefill:], reduction="sum").item()
        n += row.numel() - prefill
    return math.exp(nll / n)


def layout_label(cfg: CacheConfig) -> str:
    """A short name for a layout: ``int4 k=channel g32 r128 rot bs32`` (defaults left out).

    ``rot`` / ``rot±``: Hadamard rotation (with random signs); ``mixed 8xint4+22xint2``: per-layer codecs."""
    parts = [cfg.codec]
    if cfg.any_quantized:
        if cfg.key_granularity != "token_head":
            parts.append(f"k={cfg.key_granularity}")
        if cfg.value_granularity != "token_head":
            parts.append(f"v={cfg.value_granularity}")
        if "group" in (cfg.key_granularity, cfg.value_granularity):
            parts.append(f"g{cfg.group_size}")
        if cfg.residual:
            parts.append(f"r{cfg.residual}")
        if cfg.residual_dtype != "model":
            parts.append({"float16": "tail16", "bfloat16": "tailbf16"}[cfg.residual_dtype])
        if not cfg.symmetric:
            parts.append("asym")
        if cfg.rotation != "none":
            parts.append("rot" if cfg.rotation == "hadamard" else "rot±")
        if cfg.block_size != 16:
            parts.append(f"bs{cfg.block_size}")
        if cfg.layer_codecs:
            counts = {k: cfg.layer_codecs.count(k) for k in dict.fromkeys(cfg.layer_codecs)}
            parts[0] = "mixed " + "+".join(f"{n}x{k}" for k, n in counts.items())
    return " ".join(parts)


@torch.no_grad()
def evaluate(model: Transformer, cache_configs: Sequence[CacheConfig], tokens: torch.Tensor, prefill: int, *,
             model_name: str = "reference", reconstruction: bool = True,
             on_row: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Accuracy and bytes per token of each cache layout on ``model``: one row per layout.

    ``tokens`` [B, L] (windows of the model's tokens). The uncompressed reference run is made
    once per block size; a layout equal to it reuses it. ``reconstruction``: also the K/V and
    attention reconstruction errors (holds every layer's q/k/v of the windows in memory).
    ``on_row(layout label)``: called after each layout is measured (progress).
    """
    for cfg in cache_configs:
        cfg.check_head_dim(model.config.head_dim)
    qkv = capture_qkv(model, tokens) if reconstruction else None
    dense = dense_perplexity(model, tokens, prefill)
    runs: dict[CacheConfig, tuple[torch.Tensor, dict[str, float]]] = {}

    def run(cfg: CacheConfig) -> tuple[torch.Tensor, dict[str, float]]:
        if cfg not in runs:
            runs[cfg] = decode_logits(model, tokens, cfg, prefill)
        return runs[cfg]

    rows = []
    for cfg in cache_configs:
        ref, _ = run(uncompressed(cfg))
        logits, led = run(cfg)
        row = {**layout_columns(cfg), "layout": layout_label(cfg), "model": model_name, "batch": tokens.shape[0],
               "seq_len": tokens.shape[1], "prefill": prefill}
        if qkv is not None:
            row.update(reconstruction_error(model.config, cfg, qkv))
        row.update(compare_logits(logits, ref, tokens[:, prefill:]))
        row.update(_ledger_columns(led), ppl_dense=dense)
        rows.append(row)
        log.info("accuracy %s: ppl %.4f (delta %+.4f) KL %.2e top1 %.4f, %.1f B/token", row["layout"], row["ppl"],
                 row["ppl_delta"], row["kl_per_token"], row["top1_agree"], row["kv_bytes_per_token"])
        if on_row is not None:
            on_row(row["layout"])
        for key in [k for k in runs if k not in (uncompressed(c) for c in cache_configs)]:
            del runs[key]  # keep only the references (their logits are [B, L - prefill, V])
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- any HF checkpoint
def hf_heldout_tokens(path: str | Path, n: int, length: int, text: str | Path | None = None) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of ``text`` (default: the stdlib held-out text), with the
    tokenizer of a Hugging Face folder or a ``.gguf`` file."""
    from ryzlab.models.corpus import text_windows
    from ryzlab.models import load_tokenizer

    return text_windows(load_tokenizer(str(path)), n, length, text=text)


@torch.no_grad()
def evaluate_hf(model: Any, cache_options: Sequence[dict[str, Any]], tokens: torch.Tensor, prefill: int
                ) -> pd.DataFrame:
    """Accuracy of :class:`RyzlabCache` layouts on an HF causal LM (an instance or a local path).

    ``cache_options``: dicts of ``RyzlabCache`` keyword arguments (``codec`` plus
    CacheConfig fields). Same metrics as :func:`evaluate` except ``attn_rel_err`` (NaN: the
    HF attention's queries are not captured); exact K/V come from a ``DynamicCache`` prefill.
    """
    from transformers import DynamicCache

    from ryzlab.kv.hf import RyzlabCache, load_hf_causal_lm, model_config_from_hf
    from ryzlab.models.hf import rope_fields

    if isinstance(model, (str, Path)):
        model = load_hf_causal_lm(model)
    B, L = tokens.shape
    ref = model(tokens).logits.float()
    dyn = DynamicCache(config=model.config)
    model(tokens[:, :prefill], cache=dyn)
    qkv = [(None, layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in dyn.layers]
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    mcfg = dataclasses.replace(model_config_from_hf(model.config), **rope_fields(
        text.to_dict() if hasattr(text, "to_dict") else vars(text), "Hugging Face config"))
    rope = KeyRope(rope_inv_freq(mcfg, next(model.parameters()).device), rope_cos_sin, apply_rope)  # for pre_rope_keys
    rows = []
    for opts in cache_options:
        cache = RyzlabCache(model.config, rope=rope, **opts)
        steps = [model(tokens[:, :prefill], cache=cache).logits[:, -1:]]
        for t in range(prefill, L - 1):
            steps.append(model(tokens[:, t:t + 1], cache=cache).logits)
        row = {**layout_columns(cache.cache_config), "model": getattr(model.config, "_name_or_path", "") or
               type(model).__name__, "batch": B, "seq_len": L, "prefill": prefill}
        row.update(reconstruction_error(mcfg, cache.cache_config, qkv))
        row.update(compare_logits(torch.cat(steps, 1), ref[:, prefill - 1:L - 1], tokens[:, prefill:]))
        led = cache.ledger()
        row.update(cache_total=led["total"], cache_bytes_per_token=led["bytes_per_token"],
                   cache_ratio_vs_bf16=led["ratio_vs_bf16"])
        rows.append(row)
    return pd.DataFrame(rows)



STANDARD_LAYOUTS: tuple[dict[str, Any], ...] = (
    {"codec": "none"}, {"codec": "fp8_e4m3"}, {"codec": "fp8_e5m2"}, {"codec": "int8"},
    {"codec": "int4", "key_granularity": "token_head"},
    {"codec": "int4", "key_granularity": "group", "value_granularity": "group", "group_size": 32},
    {"codec": "int4", "key_granularity": "channel"}, {"codec": "int4", "key_granularity": "channel", "residual": 128},
    {"codec": "int4", "key_granularity": "token_head", "rotation": "hadamard"},
    {"codec": "int3", "symmetric": False, "rotation": "hadamard", "residual": 128},
    {"codec": "int2", "symmetric": False, "rotation": "hadamard", "residual": 128},
)
"""``--preset standard``: the uncompressed cache, both fp8s, int8, int4 per token and head, int4 with
groups of 32, int4 with per-channel keys (KIVI, the int4 default) without and with a 128-token
full-precision window, int4 per token after a Hadamard rotation, int3 and int2 (asymmetric,
rotated, 128-token window). Rotation needs a power-of-two head_dim."""


def parse_layout(text: str, defaults: dict[str, Any]) -> CacheConfig:
    """``codec[,field=value...]`` (e.g. ``int4,key_granularity=channel,residual=128``) -> CacheConfig.

    ``layer_codecs`` takes one codec per layer separated by ``/`` (``layer_codecs=int8/int4/int4``)."""
    from ryzlab.config import field_names, from_dict

    codec, *rest = [p.strip() for p in text.split(",") if p.strip()]
    values: dict[str, Any] = {**defaults, "codec": codec}
    for item in rest:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"layout {text!r}: {item!r} is not field=value; fields: {', '.join(field_names(CacheConfig))}")
        if key == "layer_codecs":  # one codec per layer, separated by "/": int8/int4/int4/...
            values[key] = tuple(c for c in raw.split("/") if c)
            continue
        values[key] = raw.lower() == "true" if raw.lower() in ("true", "false") else (int(raw) if raw.isdigit() else raw)
    return from_dict(CacheConfig, values, where=f"layout {text!r}")


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """``python -m ryzlab.evaluation.accuracy [--model SPEC] [--text FILE] [--codecs ...|--layout ...|--preset standard]``."""
    import argparse

    from ryzlab.config import CODECS, GRANULARITIES, ROTATIONS, from_dict
    from ryzlab.models.corpus import text_windows
    from ryzlab.models import MODEL_CHOICES, check_model, load_model

    ap = argparse.ArgumentParser(description="KV-cache accuracy vs the uncompressed cache (teacher-forced decode "
                                             "through ryzlab's paged cache) on held-out text")
    ap.add_argument("--model", "--hf", dest="model", default="reference",
                    help=f"{MODEL_CHOICES} (--hf is the old name; default: reference)")
    ap.add_argument("--text", default="", help="UTF-8 text file to score (default: the held-out stdlib text)")
    ap.add_argument("--codecs", default="fp8_e4m3,int8,int4", help=f"comma list of {', '.join(CODECS)}")
    ap.add_argument("--layout", action="append", default=[],
                    help="codec[,field=value...], repeatable (e.g. int4,key_granularity=channel); replaces --codecs")
    ap.add_argument("--preset", choices=["standard"], help="the 8 layouts of STANDARD_LAYOUTS; replaces --codecs")
    ap.add_argument("--key-granularity", default="auto",
                    help="auto (default: channel for int4/int3/int2, token_head otherwise) | " + ", ".join(GRANULARITIES))
    ap.add_argument("--value-granularity", default="token_head")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--asymmetric", action="store_true",
                    help="integer codecs store a zero point per scale (symmetric=False) unless a layout says otherwise")
    ap.add_argument("--rotation", default="none", help=f"{', '.join(ROTATIONS)} (default none)")
    ap.add_argument("--residual", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reconstruction", action="store_true", help="skip the K/V / attention reconstruction errors")
    ap.add_argument("--out", help="also write the table (.parquet or .csv)")
    a = ap.parse_args(argv)
    defaults = dict(key_granularity=a.key_granularity, value_granularity=a.value_granularity,
                    group_size=a.group_size, residual=a.residual, block_size=a.block_size,
                    symmetric=not a.asymmetric, rotation=a.rotation)
    try:  # every input checked before the model is loaded
        src = check_model(a.model)
        if a.preset:
            layouts = [from_dict(CacheConfig, {**defaults, **o}, where=f"--preset standard {o}")
                       for o in STANDARD_LAYOUTS]
        else:
            layouts = [parse_layout(t, defaults) for t in (a.layout or a.codecs.split(","))]
        for cfg in layouts:
            cfg.check_head_dim(src.config.head_dim)
            cfg.check_layers(src.config.n_layers)
        if not 0 < a.prefill < a.length:
            raise ValueError(f"--prefill {a.prefill} must be in [1, --length - 1 = {a.length - 1}]")
    except ValueError as e:
        ap.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device)
    windows = text_windows(tok, a.windows, a.length, text=a.text or None).to(a.device)
    df = evaluate(model, layouts, windows, a.prefill, model_name=src.name, reconstruction=not a.no_reconstruction)
    df["text"] = a.text or "heldout-stdlib"
    df["device"] = torch.device(a.device).type
    cols = ["layout", "ppl", "ppl_delta", "kl_per_token", "top1_agree", "kv_bytes_per_token", "ratio_vs_bf16",
            "k_rel_err", "v_rel_err", "attn_rel_err", "rel_logit_err"]
    print(f"model={src.name} ({src.kind}, {src.architecture}, {src.n_params / 1e6:.1f} M params) "
          f"dtype={str(model.tok_embeddings.weight.dtype).split('.')[-1]} device={df['device'].iloc[0]} "
          f"text={df['text'].iloc[0]}: {a.windows} windows x {a.length} tokens, prefill {a.prefill}, "
          f"{int(df['tokens_scored'].iloc[0])} positions scored; ppl_ref (uncompressed cache) "
          f"{df['ppl_ref'].iloc[0]:.4f}, ppl_dense (no cache) {df['ppl_dense'].iloc[0]:.4f}")
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if a.out:
        (df.to_parquet if a.out.endswith(".parquet") else df.to_csv)(a.out)
    return df


if __name__ == "__main__":
    main()
