"""KV budget planner: the smallest cache within an accuracy budget, measured on the model itself.

``plan_kv(model, text, max_kl)`` measures candidate layouts (:data:`CANDIDATES`, plus a
per-layer mixed-precision layout built from a sensitivity scan) with the accuracy harness
(:func:`ryzlab.evaluation.accuracy.evaluate`: teacher-forced decode through each compressed cache vs the
uncompressed one, bytes from the cache's ledger) and returns the table, its Pareto front
(bytes vs KL) and the layout with the fewest bytes per token whose KL per token is within
``max_kl``. ``ryzlab kv-plan --model PATH --text FILE --max-kl X`` prints the same.

Weights and KV together (``weights=["bf16", "int8", "int4-g32"]``, ``--weights``): every weight
format x every KV layout (plus the uncompressed cache) is measured against ONE reference, float32
weights with an uncompressed cache, so the KL is the pair's. Each row adds ``weight_bytes`` (the
weight ledger of the loaded, packed model: :func:`ryzlab.models.quant.weight_ledger`) and
``total_bytes`` = weights + KV bytes per token x ``tokens``; the pick is the fewest total bytes
within ``max_kl``. With ``memory_mib`` the pick is instead the pair holding the most tokens in
that memory (``tokens_in_budget`` = (budget - weights) / KV bytes per token), fewer bytes breaking ties.

Mixed precision: :func:`layer_sensitivity` compresses one layer at a time (every other layer
uncompressed) and records the KL that layer alone causes; :func:`mixed_layout` then gives the
``n_high`` most sensitive layers the higher-precision codec and the rest the lower one.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ryzlab.config import CODECS, CacheConfig, check_choice
from ryzlab.evaluation.accuracy import evaluate, layout_label

log = logging.getLogger(__name__)

__all__ = ["CANDIDATES", "DEFAULT_LENGTH", "DEFAULT_N_HIGH", "PlanResult", "default_length", "default_n_high", "layer_sensitivity", "mixed_layout", "pareto_front", "plan_kv",
           "plan_candidates"]

# Candidates span the bytes axis: int8 and fp8 (near lossless), int4 in the outlier-aware
# layouts (Hadamard rotation; KIVI keys per channel within a block, values per token; groups of
# 32 after rotation with a float16 window), int3, and int2 (asymmetric: four levels) with a
# full-precision window of recent tokens. On SmolLM2-135M (benchmarks/kv_vs_hf.py) the rotated
# layouts are the Pareto front below int8.
CANDIDATES: tuple[dict[str, Any], ...] = (
    {"codec": "int8"},
    {"codec": "fp8_e4m3"},
    {"codec": "int4", "key_granularity": "token_head"},
    {"codec": "int4", "key_granularity": "token_head", "rotation": "hadamard"},
    {"codec": "int4", "key_granularity": "channel", "block_size": 32},
    {"codec": "int4", "key_granularity": "channel", "block_size": 32, "rotation": "hadamard"},
    {"codec": "int4", "key_granularity": "token_head", "rotation": "hadamard", "residual": 64},
    {"codec": "int4", "key_granularity": "group", "value_granularity": "group", "group_size": 32, "rotation": "hadamard",
     "residual": 128, "residual_dtype": "float16"},
    {"codec": "int3", "key_granularity": "token_head", "symmetric": False, "rotation": "hadamard"},
    {"codec": "int3", "key_granularity": "token_head", "symmetric": False, "rotation": "hadamard", "residual": 64},
    {"codec": "int2", "key_granularity": "token_head", "symmetric": False, "rotation": "hadamard", "residual": 64},
    {"codec": "int2", "symmetric": False, "key_granularity": "channel", "block_size": 32, "residual": 48,
     "rotation": "hadamard"},
)

# Defaults that depend on the model are derived from it (a fixed 512-token window and 8 high layers
# fail on the 4-layer reference model): windows of 512 tokens, or the model's context if shorter;
# half of each window prefilled, half scored; the 8 most sensitive layers kept in the high codec
# (what SmolLM2-135M's 30 layers got), at most half the layers.
DEFAULT_LENGTH = 512
DEFAULT_N_HIGH = 8


def default_length(max_seq_len: int) -> int:
    """Tokens per window when none is asked for: :data:`DEFAULT_LENGTH`, capped by the model's context."""
    return min(DEFAULT_LENGTH, max_seq_len)


def default_n_high(n_layers: int) -> int:
    """Layers in the high codec when none is asked for: :data:`DEFAULT_N_HIGH`, at most half the layers
    (0 for a one-layer model: there is nothing to mix)."""
    return min(DEFAULT_N_HIGH, n_layers // 2)


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan_kv` found. ``table``: one row per measured layout (``layout``, ``codec``...,
    ``kv_bytes_per_token``, ``bytes_vs_fp32``, ``kl_per_token``, ``ppl_delta``, ``top1_agree``,
    ``within_budget``, ``pareto``), sorted by bytes. ``best``: the chosen row (None when no
    layout is within the budget). ``sensitivity``: per-layer KL (empty without mixed precision)."""

    table: pd.DataFrame
    best: pd.Series | None
    max_kl: float
    sensitivity: pd.DataFrame
    model: str
    text: str

    def best_config(self) -> CacheConfig | None:
        return None if self.best is None else self.best["cache_config"]

    def summary(self) -> str:
        head = (f"model={self.model} text={self.text} max_kl={self.max_kl:g}: ")
        if self.best is not None and "weights" in self.table.columns:
            b = self.best
            fit = (f", {int(b['tokens_in_budget'])} tokens in {b['memory_mib']:g} MiB"
                   if "tokens_in_budget" in b.index else "")
            return head + (f"weights {b['weights']} ({b['weight_bytes'] / 2**20:.2f} MiB) + KV {b['layout']} at "
                           f"{b['kv_bytes_per_token']:.1f} B/token: {b['total_bytes'] / 2**20:.2f} MiB at "
                           f"{int(b['tokens'])} tokens{fit}, KL/token {b['kl_per_token']:.4g} vs float32 weights + "
                           f"uncompressed KV, ppl delta {b['ppl_delta']:+.3f}")
        if self.best is None:
            return head + "no measured layout is within the budget; the most accurate compressed one is " + \
                str(self.table.sort_values("kl_per_token").iloc[0]["layout"])
        b = self.best
        return head + (f"{b['layout']} at {b['kv_bytes_per_token']:.1f} B/token ({b['bytes_vs_fp32']:.3f}x fp32), "
                       f"KL/token {b['kl_per_token']:.4g}, ppl delta {b['ppl_delta']:+.3f}")


def pareto_front(df: pd.DataFrame, x: str = "kv_bytes_per_token", y: str = "kl_per_token") -> pd.Series:
    """Boolean mask of the rows not dominated in (lower ``x``, lower ``y``)."""
    order = df.sort_values([x, y]).index
    best, keep = float("inf"), set()
    for i in order:
        if df.at[i, y] < best:
            keep.add(i)
            best = df.at[i, y]
    return df.index.isin(list(keep))


def layer_sensitivity(model: Any, tokens: torch.Tensor, prefill: int, layout: CacheConfig, *,
                      on_row: Callable[[str], None] | None = None) -> pd.DataFrame:
    """KL per token when only layer ``i`` stores ``layout.codec`` (every other layer uncompressed).

    One row per layer: ``layer``, ``kl_per_token``, ``ppl_delta``. The sum over layers
    approximates the KL of compressing them all (errors add to first order).
    """
    n = model.config.n_layers
    cfgs = [dataclasses.replace(layout, layer_codecs=tuple(layout.codec if j == i else "none" for j in range(n)))
            for i in range(n)]
    df = evaluate(model, cfgs, tokens, prefill, reconstruction=False, on_row=on_row)
    return pd.DataFrame({"layer": range(n), "kl_per_token": df["kl_per_token"].to_numpy(),
                         "ppl_delta": df["ppl_delta"].to_numpy()})


def mixed_layout(layout: CacheConfig, sensitivity: pd.DataFrame, high: str, n_high: int) -> CacheConfig:
    """``layout`` with its ``n_high`` most sensitive layers stored in codec ``high`` instead."""
    check_choice("high", high, CODECS)
    n = len(sensitivity)
    if not 0 <= n_high <= n:
        raise ValueError(f"n_high={n_high} must be in [0, {n}] (layers)")
    top = set(sensitivity.sort_values("kl_per_token", ascending=False)["layer"].head(n_high))
    return dataclasses.replace(layout, layer_codecs=tuple(high if i in top else layout.codec for i in range(n)))


def plan_candidates(options: Sequence[dict[str, Any]] | None = None) -> list[CacheConfig]:
    """CacheConfigs of ``options`` (default :data:`CANDIDATES`); every problem reported at once."""
    from ryzlab.config import ConfigError, from_dict

    cfgs, problems = [], []
    for o in (CANDIDATES if options is None else options):
        try:
            cfgs.append(from_dict(CacheConfig, dict(o), where=f"candidate {o}"))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems, "kv-plan candidates")
    return cfgs


def plan_kv(model: str | Path, text: str | Path | None, max_kl: float, *, candidates: Sequence[CacheConfig] | None = None,
            windows: int = 4, length: int | None = None, prefill: int | None = None,
            mixed: tuple[str, str, int | None] | None = ("int4", "int2", None), device: str = "cpu", threads: int = 1,
            progress: bool = False, weights: Sequence[str] | None = None, tokens: int | None = None,
            memory_mib: float | None = None) -> PlanResult:
    """Measure ``candidates`` on ``model`` over ``windows`` x ``length`` tokens of ``text``; pick the smallest within ``max_kl``.

    ``mixed = (high, low, n_high)``: also scan per-layer sensitivity with codec ``low`` (the
    layout of the first candidate using it) and measure the layout that stores the ``n_high``
    most sensitive layers in ``high``. None skips it. Every input is checked before the model
    loads. From the model when None: ``length`` (:func:`default_length`), ``prefill`` (half of
    ``length``), ``n_high`` (:func:`default_n_high`; mixed precision is skipped on a one-layer
    model). ``progress``: a progress bar on stderr (model load, then one step per layout measured).
    ``weights``: weight formats to plan jointly with the KV layouts (module docstring); ``tokens``
    (default the model's context) and ``memory_mib`` then size the budget. Mixed precision is
    scanned on the first weight format and its layout measured under every format.
    """
    from tqdm.auto import tqdm

    from ryzlab.models.corpus import text_windows
    from ryzlab.models import check_model, load_model

    if not max_kl > 0:
        raise ValueError(f"max_kl must be > 0 (KL per token vs the uncompressed cache), got {max_kl}")
    if text and not Path(text).expanduser().is_file():
        raise ValueError(f"text={str(text)!r}: no such file (empty = the held-out stdlib text)")
    src = check_model(str(model))
    length = default_length(src.config.max_seq_len) if length is None else length
    prefill = length // 2 if prefill is None else prefill
    if length > src.config.max_seq_len:
        raise ValueError(f"length={length} exceeds {src.name}'s context of {src.config.max_seq_len} tokens")
    if not 0 < prefill < length:
        raise ValueError(f"prefill={prefill} must be in [1, length - 1 = {length - 1}]")
    if windows <= 0:
        raise ValueError(f"windows must be > 0, got {windows}")
    cands = list(plan_candidates() if candidates is None else candidates)
    if not cands:
        raise ValueError("no candidate layouts to measure")
    for c in cands:
        c.check_head_dim(src.config.head_dim)
        c.check_layers(src.config.n_layers)
    base = None
    if mixed is not None:
        high, low, n_high = mixed
        if n_high is None:
            n_high = default_n_high(src.config.n_layers)
        check_choice("mixed high codec", high, CODECS)
        check_choice("mixed low codec", low, CODECS)
        if n_high == 0 and mixed[2] is None:
            log.warning("%s has %d layer(s): no per-layer mixed precision to measure", src.name, src.config.n_layers)
        elif not 0 < n_high < src.config.n_layers:
            raise ValueError(f"mixed n_high={n_high} must be in [1, {src.config.n_layers - 1}] (layers)")
        else:
            base = next((c for c in cands if c.codec == low and not c.layer_codecs), CacheConfig(codec=low))
    fmts = _check_weights(src, weights, tokens, memory_mib)
    if threads:
        torch.set_num_threads(threads)
    if fmts:
        return _plan_with_weights(src, str(model), text, max_kl, cands, fmts, windows, length, prefill, base,
                                  mixed, device, tokens or src.config.max_seq_len, memory_mib, progress)
    steps = len(cands) + (src.config.n_layers + 1 if base is not None else 0)
    with tqdm(total=steps, desc="kv-plan: loading model", unit="layout", disable=not progress, leave=False) as bar:
        def advance(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        net, tok = load_model(str(model), device=device)
        tokens = text_windows(tok, windows, length, text=text or None).to(device)
        sens = pd.DataFrame(columns=["layer", "kl_per_token", "ppl_delta"])
        if base is not None:
            bar.set_description(f"kv-plan: {low} sensitivity per layer")
            sens = layer_sensitivity(net, tokens, prefill, base, on_row=advance)
            cands.append(mixed_layout(base, sens, high, n_high))
        bar.set_description("kv-plan: layouts")
        df = evaluate(net, cands, tokens, prefill, model_name=src.name, reconstruction=False, on_row=advance)
    df["cache_config"] = cands
    fp32 = 2.0 * src.config.n_layers * src.config.n_kv_heads * src.config.head_dim * 4
    df["bytes_vs_fp32"] = df["kv_bytes_per_token"] / fp32
    df["within_budget"] = df["kl_per_token"] <= max_kl
    df["pareto"] = pareto_front(df)
    df["text"] = str(text) if text else "heldout-stdlib"
    df["device"] = torch.device(device).type
    df = df.sort_values("kv_bytes_per_token").reset_index(drop=True)
    ok = df[df["within_budget"]]
    best = ok.iloc[0] if len(ok) else None
    return PlanResult(df, best, max_kl, sens, src.name, df["text"].iloc[0])



def _check_weights(src: Any, weights: Sequence[str] | None, tokens: int | None, memory_mib: float | None
                   ) -> list[str]:
    """The weight formats asked for, each checked against the model's shapes before anything loads."""
    from ryzlab.models.quant import WEIGHT_FORMAT_CHOICES, check_weight_format

    if not weights:
        if tokens is not None or memory_mib is not None:
            raise ValueError("tokens / memory_mib size a joint weights + KV budget: give weights too "
                             f"(e.g. --weights float32,int8,int4-g32; choices {', '.join(WEIGHT_FORMAT_CHOICES)})")
        return []
    if tokens is not None and tokens <= 0:
        raise ValueError(f"tokens must be > 0 (KV tokens the budget holds), got {tokens}")
    if memory_mib is not None and not memory_mib > 0:
        raise ValueError(f"memory_mib must be > 0, got {memory_mib}")
    problems, out = [], []
    for w in weights:
        try:
            fmt = check_weight_format(src.config, w)
            if fmt.kind == "gguf" and src.kind != "gguf":
                raise ValueError(f"weights=gguf keeps a GGUF file's own blocks; {src.name} is a {src.kind} model")
        except ValueError as e:
            problems.append(str(e))
            continue
        if fmt.name not in out:
            out.append(fmt.name)
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _plan_with_weights(src: Any, model: str, text: Any, max_kl: float, cands: list[CacheConfig], fmts: list[str],
                       windows: int, length: int, prefill: int, base: CacheConfig | None, mixed: Any, device: str,
                       tokens: int, memory_mib: float | None, progress: bool) -> PlanResult:
    """Every weight format x (uncompressed cache + every layout) vs float32 weights + uncompressed KV."""
    from tqdm.auto import tqdm

    from ryzlab.evaluation.accuracy import compare_logits, decode_logits, layout_columns
    from ryzlab.models import load_model
    from ryzlab.models.corpus import text_windows
    from ryzlab.models.quant import weight_ledger

    ref_net, tok = load_model(model, device=device)
    ids = text_windows(tok, windows, length, text=text or None).to(device)
    ref = decode_logits(ref_net, ids, CacheConfig(codec="none"), prefill)[0]
    sens = pd.DataFrame(columns=["layer", "kl_per_token", "ppl_delta"])
    layouts = [CacheConfig(codec="none")] + [c for c in cands if c.codec != "none"]
    rows = []
    with tqdm(total=len(fmts) * (len(layouts) + (base is not None)), desc="kv-plan: weights x layouts",
              unit="pair", disable=not progress, leave=False) as bar:
        for i, w in enumerate(fmts):
            net = ref_net if w == "float32" else load_model(model, device=device, weights=w)[0]
            wbytes = weight_ledger(net)["total"]
            if i == 0 and base is not None:   # the sensitivity scan once, on the first format
                sens = layer_sensitivity(net, ids, prefill, base)
                layouts.append(mixed_layout(base, sens, mixed[0], mixed[2] or default_n_high(src.config.n_layers)))
            for c in layouts:
                logits, led = decode_logits(net, ids, c, prefill)
                kv = led["bytes_per_token"]
                rows.append({**layout_columns(c), "layout": layout_label(c), "weights": w, "weight_bytes": wbytes,
                             "kv_bytes_per_token": kv, "tokens": tokens, "total_bytes": wbytes + kv * tokens,
                             "model": src.name, "batch": ids.shape[0], "seq_len": ids.shape[1], "prefill": prefill,
                             **compare_logits(logits, ref, ids[:, prefill:]), "cache_config": c})
                bar.update(1)
            del net
    df = pd.DataFrame(rows)
    fp32 = 2.0 * src.config.n_layers * src.config.n_kv_heads * src.config.head_dim * 4
    df["bytes_vs_fp32"] = df["kv_bytes_per_token"] / fp32
    df["within_budget"] = df["kl_per_token"] <= max_kl
    key = "total_bytes"
    if memory_mib is not None:
        df["memory_mib"] = memory_mib
        room = memory_mib * 2**20 - df["weight_bytes"]
        df["tokens_in_budget"] = (room.clip(lower=0) // df["kv_bytes_per_token"]).astype(int)
        df["within_budget"] &= df["tokens_in_budget"] > 0
    df["pareto"] = pareto_front(df, x=key)
    df["text"] = str(text) if text else "heldout-stdlib"
    df["device"] = torch.device(device).type
    df = df.sort_values(key).reset_index(drop=True)
    ok = df[df["within_budget"]]
    if memory_mib is not None and len(ok):
        ok = ok.sort_values(["tokens_in_budget", "total_bytes"], ascending=[False, True])
    best = ok.iloc[0] if len(ok) else None
    return PlanResult(df, best, max_kl, sens, src.name, df["text"].iloc[0])
