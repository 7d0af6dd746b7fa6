"""ryzlab KV codecs vs Hugging Face transformers caches, same model and tokens, one run.

Peer: ``../shared/peers/hf_cache_baseline.py`` (DynamicCache and optimum-quanto
QuantizedCache int4/int2). Without ``--model`` this script uses the same random Llama config
(REFERENCE), batch, context, tokens (``torch.manual_seed(0)`` then the same ``randint``) and
teacher forcing: every cache is prefilled with the same ``context`` tokens, then fed the same
next tokens one at a time, so logit errors vs DynamicCache do not compound through different
generations. With ``--model`` (a Hugging Face folder or a ``.gguf`` file, e.g. the SmolLM2 GGUF
of ``ryzlab.models.smollm2_gguf_path()``) the tokens are ``--batch`` windows of real text
(``--text``, default the held-out stdlib text) in the model's own tokenizer: a real model's KL
on random ids measures noise. ``ppl_delta`` (perplexity of the next tokens vs DynamicCache's)
and ``top1_agree`` are reported too.

Rotated ryzlab layouts run with ``use_rotated_attention(model)`` (``ryzlab_sdpa``: sdpa plus a
rotation of the step's queries and output when a rotated RyzlabCache asked for it, plain sdpa
for every other cache), so every cache in one run uses the same attention function.

Differences from the peer, all in the direction of a fairer comparison:
* decode steps are timed round-robin (step i of every cache, then step i+1), so a burst of
  load from other processes on a shared machine hits every cache alike; ``step_ms`` is the
  median over steps (``step_ms_mean`` is there too);
* prefill asks for the last position's logits only (``logits_to_keep=1``): the cache
  contents are identical, without a ``[B, context, vocab]`` float32 tensor;
* quanto is warmed up on a short context (its kernels are built on first use);
* the prefill runs once (DynamicCache); its K/V are stored into every other cache layer by
  layer (:func:`fill_from`), which gives exactly the caches a prefill would (``--own-prefill``
  runs the model's prefill per cache instead).

Bytes: HF caches with the peer's own counter (packed data + scales + shifts + residual
window; tensors held in tuples/lists/dicts of a layer are counted too); ryzlab caches with ``RyzlabCache.ledger()["total"]`` (payload + scales + residual +
block padding + metadata). Ratios: vs DynamicCache (float32 model -> ``bytes_vs_fp32``) and
vs the same tokens in bf16/fp16 (``bytes_vs_bf16`` = bytes / (fp32 bytes / 2)).

    .venv/bin/python benchmarks/kv_vs_hf.py --context 4096 --steps 16 --json kv_vs_hf.json

The real-model table of issue 15 (SmolLM2-135M GGUF, 2 windows of held-out text, 1024-token
prefill, 64 teacher-forced decode steps, 126 scored tokens), with the per-layer ranking from
``ryzlab.evaluation.plan.layer_sensitivity`` (1 window of 192 tokens, prefill 128, int2 rotated KIVI
asymmetric, block 32) saved as JSON (``sens.to_json("sens.json")``)::

    .venv/bin/python benchmarks/kv_vs_hf.py --model $GGUF --context 1024 --batch 2 --steps 64 \
        --sensitivity sens.json --mixed-layers 8 --mixed-residual 32 --caches hf_quanto_int4,hf_quanto_int2,...
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ryzlab.evaluation.accuracy import hf_heldout_tokens  # noqa: E402
from ryzlab.kv.hf import RyzlabCache, load_hf_causal_lm, use_rotated_attention  # noqa: E402
from ryzlab.evaluation.peers import hf_cache_bytes, peer_cache  # noqa: E402
from ryzlab.provenance import cpu_model  # noqa: E402

# Same as the peer's REFERENCE (checked against the peer file when it is present).
REFERENCE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768)
PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "hf_cache_baseline.py"

# name -> RyzlabCache options. int4 variants: plain token_head (fewest bytes), asymmetric
# (a zero point, as quanto), group-wise scales, and KIVI-like (keys per channel per block,
# values per token, a full-precision residual window like quanto's 128 tokens); then the
# outlier-aware layouts (Hadamard rotation, per-channel keys) and int3/int2.
RYZLAB: dict[str, dict] = {
    "ryzlab_none": dict(codec="none"),
    "ryzlab_fp8_e4m3": dict(codec="fp8_e4m3", key_granularity="head", value_granularity="head"),
    "ryzlab_fp8_e4m3_tokhead": dict(codec="fp8_e4m3"),
    "ryzlab_int8": dict(codec="int8"),
    "ryzlab_int4": dict(codec="int4", key_granularity="token_head"),
    "ryzlab_int4_asym": dict(codec="int4", key_granularity="token_head", symmetric=False),
    "ryzlab_int4_g32": dict(codec="int4", key_granularity="group", value_granularity="group", group_size=32),
    "ryzlab_int4_asym_r128": dict(codec="int4", key_granularity="token_head", symmetric=False, residual=128),
    "ryzlab_int4_kivi": dict(codec="int4", key_granularity="channel", block_size=32),
    "ryzlab_int4_kivi_r128": dict(codec="int4", key_granularity="channel", block_size=32, residual=128),
    "ryzlab_int4_rot": dict(codec="int4", key_granularity="token_head", rotation="hadamard"),
    "ryzlab_int4_rot_kivi": dict(codec="int4", key_granularity="channel", block_size=32, rotation="hadamard"),
    "ryzlab_int4_prerope_kivi": dict(codec="int4", key_granularity="channel", block_size=32, pre_rope_keys=True),
    "ryzlab_int4_rot_r64": dict(codec="int4", key_granularity="token_head", rotation="hadamard", residual=64),
    "ryzlab_int4_rot_g32_r64": dict(codec="int4", key_granularity="group", value_granularity="group", group_size=32,
                                    rotation="hadamard", residual=64),
    "ryzlab_int4_rots_r64": dict(codec="int4", key_granularity="token_head", rotation="hadamard_signs", residual=64),
    "ryzlab_int4_rot_r128_tail16": dict(codec="int4", key_granularity="token_head", rotation="hadamard", residual=128,
                                        residual_dtype="float16"),
    "ryzlab_int4_rot_kivi_r128_tail16": dict(codec="int4", key_granularity="channel", block_size=32,
                                             rotation="hadamard", residual=128, residual_dtype="float16"),
    "ryzlab_int4_rot_g32_r128_tail16": dict(codec="int4", key_granularity="group", value_granularity="group",
                                            group_size=32, rotation="hadamard", residual=128, residual_dtype="float16"),
    "ryzlab_int4_rot_kivi_r64": dict(codec="int4", key_granularity="channel", block_size=32, rotation="hadamard",
                                     residual=64),
    "ryzlab_int4_rot_kivi_r48": dict(codec="int4", key_granularity="channel", block_size=32, rotation="hadamard",
                                     residual=48),
    "ryzlab_int2_rot_kivi_asym_r48": dict(codec="int2", symmetric=False, key_granularity="channel", block_size=32,
                                          rotation="hadamard", residual=48),
    "ryzlab_int4_rot_r128": dict(codec="int4", key_granularity="token_head", rotation="hadamard", residual=128),
    "ryzlab_int4_rot_asym_r128": dict(codec="int4", key_granularity="token_head", symmetric=False,
                                      rotation="hadamard", residual=128),
    "ryzlab_int3_rot_asym_r128": dict(codec="int3", key_granularity="token_head", symmetric=False,
                                      rotation="hadamard", residual=128),
    "ryzlab_int2_asym_r128": dict(codec="int2", key_granularity="token_head", symmetric=False, residual=128),
    "ryzlab_int2_rot_asym_r128": dict(codec="int2", key_granularity="token_head", symmetric=False,
                                      rotation="hadamard", residual=128),
    "ryzlab_int2_kivi_asym_r128": dict(codec="int2", symmetric=False, key_granularity="channel", block_size=32,
                                       residual=128),
    "ryzlab_int2_rot_kivi_asym_r128": dict(codec="int2", symmetric=False, key_granularity="channel", block_size=32,
                                           rotation="hadamard", residual=128),
}
# (rotated layout, the same layout without rotation): the rotation's share of a decode step
ROTATION_PAIRS = (("ryzlab_int4_rot", "ryzlab_int4"), ("ryzlab_int4_rot_kivi", "ryzlab_int4_kivi"),
                  ("ryzlab_int2_rot_asym_r128", "ryzlab_int2_asym_r128"))


def cache_bytes(cache) -> float:
    return cache.ledger()["total"] if isinstance(cache, RyzlabCache) else float(hf_cache_bytes(cache))


def fill_from(cache, dynamic: DynamicCache) -> None:
    """Store a DynamicCache's prefill K/V into ``cache`` layer by layer, as the model's prefill would.

    Exact, not an approximation: during a prefill both QuantizedCache (first update) and
    RyzlabCache (a step's own tokens) hand the fresh K/V back to attention unchanged, so the
    prefill's hidden states, hence the K/V each layer stores, are the DynamicCache's.
    ``tests/test_hf.py`` checks that both ways give the same cache. Saves one long prefill
    per cache at 4k context on a CPU.
    """
    for i, layer in enumerate(dynamic.layers):
        cache.update(layer.keys, layer.values, i)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local HF checkpoint dir or .gguf file (default: random reference Llama)")
    ap.add_argument("--text", default="", help="with --model: UTF-8 text to score (default: held-out stdlib text)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--caches", default="all",
                    help=f"comma list of {', '.join(['hf_dynamic', 'hf_quanto_int4', 'hf_quanto_int2', *RYZLAB])}")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--own-prefill", action="store_true",
                    help="run the model's prefill for every cache (default: prefill once with DynamicCache "
                         "and store its K/V into the others: the same cache contents, see fill_from)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--sensitivity", help="per-layer KL JSON (ryzlab.evaluation.plan.layer_sensitivity, columns layer and "
                                          "kl_per_token): adds ryzlab_int2_mixed, the int2 KIVI layout with the "
                                          "--mixed-layers most sensitive layers in int4, and ryzlab_int4_rot_r64_mixed "
                                          "(the 3 most sensitive layers in int8)")
    ap.add_argument("--mixed-layers", type=int, default=6)
    ap.add_argument("--mixed-residual", type=int, default=32)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if PEER.exists():
        src = PEER.read_text()
        assert "hidden_size=512, intermediate_size=1408, num_hidden_layers=8" in src, \
            f"{PEER} changed its REFERENCE config; update REFERENCE here"
    if a.sensitivity:
        import pandas as pd

        from ryzlab.config import CacheConfig
        from ryzlab.evaluation.plan import mixed_layout

        base = CacheConfig(codec="int2", symmetric=False, key_granularity="channel", block_size=32,
                           rotation="hadamard", residual=a.mixed_residual)
        mixed = mixed_layout(base, pd.read_json(a.sensitivity), "int4", a.mixed_layers)
        RYZLAB["ryzlab_int2_mixed"] = dict(codec="int2", symmetric=False, key_granularity="channel", block_size=32,
                                           rotation="hadamard", residual=a.mixed_residual,
                                           layer_codecs=mixed.layer_codecs)
        # int4 rotated with a 64-token window, its 3 most sensitive layers in int8 (same ranking)
        int8_layers = mixed_layout(CacheConfig(codec="int4", key_granularity="token_head"),
                                   pd.read_json(a.sensitivity), "int8", 3).layer_codecs
        RYZLAB["ryzlab_int4_rot_r64_mixed"] = dict(codec="int4", key_granularity="token_head", rotation="hadamard",
                                                   residual=64, layer_codecs=int8_layers)
    all_names = ["hf_dynamic", "hf_quanto_int4", "hf_quanto_int2", *RYZLAB]
    names = all_names if a.caches == "all" else ["hf_dynamic"] + [n for n in a.caches.split(",") if n != "hf_dynamic"]
    if bad := [n for n in names if n not in all_names]:
        ap.error(f"unknown caches {bad}; valid: {', '.join(all_names)}")

    if a.text and not a.model:
        ap.error("--text needs --model (the random reference model has no tokenizer)")
    if a.text and not Path(a.text).is_file():
        ap.error(f"--text {a.text}: no such file")
    if a.model and not Path(a.model).exists():
        ap.error(f"--model {a.model}: no such folder or .gguf file")
    torch.manual_seed(0)  # same model and tokens as the peer
    if a.model:
        model = load_hf_causal_lm(a.model)
        ids = hf_heldout_tokens(a.model, a.batch, a.context + a.steps, text=a.text or None)
        text = a.text or "heldout-stdlib"
    else:
        model = LlamaForCausalLM(LlamaConfig(**REFERENCE)).eval()
        ids = torch.randint(0, model.config.vocab_size, (a.batch, a.context + a.steps))
        text = "random-ids"
    cfg = model.config
    if any(RYZLAB.get(n, {}).get("rotation", "none") != "none" for n in names):
        use_rotated_attention(model)  # identical to sdpa for every cache but a rotated RyzlabCache

    def make(name: str):
        if name == "hf_dynamic":
            return DynamicCache(config=cfg)
        if name.startswith("hf_quanto_int"):
            return peer_cache(cfg, name.removeprefix("hf_"))
        return RyzlabCache(cfg, **{"block_size": a.block_size, **RYZLAB[name]})

    with torch.no_grad():
        for n in names:  # warm-up on a short context: kernels, allocator, first-call paths
            c = make(n)
            model(ids[:, :64], cache=c, use_cache=True, logits_to_keep=1)
            model(ids[:, 64:65], cache=c, use_cache=True)
        caches, prefill_s = {}, {}
        for n in names:
            t0 = time.perf_counter()
            caches[n] = make(n)
            if a.own_prefill or n == "hf_dynamic":
                model(ids[:, :a.context], cache=caches[n], use_cache=True, logits_to_keep=1)
            else:
                fill_from(caches[n], caches["hf_dynamic"])
            prefill_s[n] = time.perf_counter() - t0
            print(f"{'prefill' if a.own_prefill or n == 'hf_dynamic' else 'fill'} {n:24s} "
                  f"{prefill_s[n]:7.1f} s", flush=True)
        times = {n: [] for n in names}
        logits = {n: [] for n in names}
        for i in range(a.steps):
            tok = ids[:, a.context + i:a.context + i + 1]
            for n in names:
                t0 = time.perf_counter()
                out = model(tok, cache=caches[n], use_cache=True)
                times[n].append(time.perf_counter() - t0)
                logits[n].append(out.logits[:, -1].float())
    base = torch.stack(logits["hf_dynamic"], 1)  # [B, steps, V]
    # targets: the token that follows each decoded one (the last step has none)
    targets = ids[:, a.context + 1:a.context + a.steps]
    ce = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), targets.flatten()).item()
    ppl_base = math.exp(ce(base)) if a.steps > 1 else float("nan")
    rows = []
    for n in names:
        lg = torch.stack(logits[n], 1)
        kl = torch.nn.functional.kl_div(lg.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        ppl = math.exp(ce(lg)) if a.steps > 1 else float("nan")
        step_spread = statistics.quantiles(times[n], n=4) if len(times[n]) > 1 else [times[n][0]] * 3
        rows.append(dict(cache=n, step_ms=statistics.median(times[n]) * 1e3,
                         step_ms_mean=statistics.fmean(times[n]) * 1e3,
                         step_ms_p25=step_spread[0] * 1e3, step_ms_p75=step_spread[2] * 1e3, prefill_s=prefill_s[n],
                         bytes=cache_bytes(caches[n]), rel_logit_err=((lg - base).norm() / base.norm()).item(),
                         kl_per_token=kl, ppl=ppl, ppl_delta=ppl - ppl_base,
                         top1_agree=(lg.argmax(-1) == base.argmax(-1)).float().mean().item(),
                         options=json.dumps(RYZLAB.get(n, {}))))
    fp32 = rows[0]["bytes"]
    for r in rows:
        r.update(context=a.context, batch=a.batch, steps=a.steps, threads=torch.get_num_threads(),
                 bytes_vs_fp32=r["bytes"] / fp32, bytes_vs_bf16=r["bytes"] / (fp32 / 2),
                 step_vs_dynamic=r["step_ms"] / rows[0]["step_ms"], device="cpu", device_name=cpu_model(),
                 model=a.model or "random-reference-llama", text=text)
        opts = RYZLAB.get(r["cache"])
        if opts is not None:  # asymptotic bytes/token of the codec alone (no residual, padding, tables)
            c = caches[r["cache"]]
            r["codec_vs_fp32"] = c.paged.bytes_per_token_codec() / (4.0 * 2 * c.model_config.n_layers *
                                                                     c.model_config.n_kv_heads * c.model_config.head_dim)
    by = {r["cache"]: r for r in rows}
    for rot, plain in ROTATION_PAIRS:
        if rot in by and plain in by:
            by[rot]["rotation_step_cost"] = by[rot]["step_ms"] / by[plain]["step_ms"] - 1
    print(f"\nmodel={a.model or 'random reference Llama'} text={text} context={a.context} batch={a.batch} "
          f"steps={a.steps} threads={torch.get_num_threads()} device=cpu ({cpu_model()}); ppl of DynamicCache "
          f"{ppl_base:.3f} over {targets.numel()} next tokens; step ms = median (p25-p75) over {a.steps} steps")
    print(f"{'cache':26s} {'ms/step':>8s} {'p25-p75':>11s} {'x dyn':>6s} {'MB':>7s} {'x fp32':>7s} {'codec':>6s} "
          f"{'KL/tok':>9s} {'ppl d':>8s} {'top1':>6s}")
    for r in rows:
        print(f"{r['cache']:26s} {r['step_ms']:8.1f} {r['step_ms_p25']:5.1f}-{r['step_ms_p75']:<5.1f} "
              f"{r['step_vs_dynamic']:6.2f} {r['bytes'] / 1e6:7.2f} {r['bytes_vs_fp32']:7.3f} "
              f"{r.get('codec_vs_fp32', float('nan')):6.3f} {r['kl_per_token']:9.2e} {r['ppl_delta']:+8.3f} "
              f"{r['top1_agree']:6.3f}")
    for rot, plain in ROTATION_PAIRS:
        if rot in by and plain in by:
            print(f"rotation cost: {rot} vs {plain}: {100 * by[rot]['rotation_step_cost']:+.1f}% of a decode step")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
