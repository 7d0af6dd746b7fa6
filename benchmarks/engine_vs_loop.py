"""The engine's own cost at batch 1: decode tok/s of the serving engine vs a bare greedy loop.

Both sides use the same loaded model, the same paged-cache configuration and the same torch
threads, and each repeat starts from fresh state (a new cache; a new engine). One repeat
prefills the same ``--prompt-len`` random prompt, then decodes ``--tokens`` greedy tokens:

* **loop**: ``logits = model(next, cache=cache, seq_ids=[0])`` and ``argmax`` - the model and its
  cache with nothing around them (what ``ryzlab bench`` times);
* **engine**: :meth:`Engine.step` until the request finishes (scheduler, step plan, sampler and
  outputs included), as ``ryzlab serve`` runs it - without HTTP.

Only the decode phase is timed (from the first sampled token to the last). Repeats alternate
the two sides (loop, engine, loop, engine, ...) so drift in the machine's load hits both; the
ratio engine / loop is reported per pair, median and min-max. The greedy tokens of the two
sides are compared: they must be identical (the script fails otherwise).

``torch ops/token`` counts the ATen operators each side dispatches per decoded token (a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` over a separate short run): it does not
move with the load of a shared machine, where the timed ratio swings by +-10%.

Target (issue 20): engine >= 0.95x the loop.

    python benchmarks/engine_vs_loop.py --tokens 128 --repeats 7
    python benchmarks/engine_vs_loop.py --model smollm2 --tokens 32 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loop_side(model: torch.nn.Module, cache_cfg, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from ryzlab.kv.cache import PagedKVCache

    cache = PagedKVCache(model.config, cache_cfg, dtype=next(model.parameters()).dtype)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, seq_ids=[0])
        nxt = logits[:, -1].argmax(-1, keepdim=True)                    # [1, 1]
        out = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            logits = model(nxt, cache=cache, seq_ids=[0])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
        return time.perf_counter() - t0, out


def engine_side(model: torch.nn.Module, cache_cfg, engine_cfg, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.serve.engine import Engine
    from ryzlab.serve.sampling import SamplingParams

    cache = PagedKVCache(model.config, cache_cfg, dtype=next(model.parameters()).dtype)
    eng = Engine(model, cache, engine_cfg)
    eng.add_request("r", prompt, SamplingParams(max_tokens=n))
    out: list[int] = []
    t0 = None
    while eng.has_work():
        for o in eng.step():
            out.extend(o.new_tokens)
        if t0 is None and out:
            t0 = time.perf_counter()                                   # first token sampled: decode starts
    return time.perf_counter() - t0, out


def ops_per_token(side, n: int = 9) -> float:
    """ATen operators per decoded token of ``side(n)`` (prefill excluded: a run of 1 is subtracted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for tokens in (1, n):
        Count.n = 0
        with Count():
            side(tokens)
        counts.append(Count.n)
    return (counts[1] - counts[0]) / (n - 1)


def main(argv: list[str] | None = None) -> int:
    from ryzlab.config import CacheConfig
    from ryzlab.models import load_model
    from ryzlab.serve.scheduler import EngineConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="'reference', 'smollm2', or a model path")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--codec", default="none")
    p.add_argument("--compile", dest="compile_step", action="store_true", default=None,
                   help="engine compiles its step (when the engine has the option)")
    p.add_argument("--no-compile", dest="compile_step", action="store_false")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    model_name = a.model
    if a.model == "smollm2":
        from ryzlab.models import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise SystemExit("SmolLM2 is not installed (make real-model)")
        model_name = str(path)
    torch.set_num_threads(a.threads)
    model, _ = load_model(model_name, device="cpu")
    cache_cfg = CacheConfig(codec=a.codec, num_blocks=None)
    ekw = {"max_num_seqs": 1, "max_model_len": a.prompt_len + a.tokens + 1}
    if a.compile_step is not None and "compile" in {f.name for f in dataclasses.fields(EngineConfig)}:
        ekw["compile"] = a.compile_step
    engine_cfg = EngineConfig(**ekw)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (a.prompt_len,), generator=g).tolist()
    # warm-up of both sides (first forward of each shape allocates; a compiled step compiles)
    loop_side(model, cache_cfg, prompt, 4)
    engine_side(model, cache_cfg, engine_cfg, prompt, 4)
    loops, engines, ratios = [], [], []
    for _ in range(a.repeats):
        tl, out_l = loop_side(model, cache_cfg, prompt, a.tokens)
        te, out_e = engine_side(model, cache_cfg, engine_cfg, prompt, a.tokens)
        if out_l != out_e:
            raise SystemExit(f"greedy tokens differ between the loop and the engine:\n{out_l}\n{out_e}")
        rl, re_ = (a.tokens - 1) / tl, (a.tokens - 1) / te
        loops.append(rl)
        engines.append(re_)
        ratios.append(re_ / rl)
    ops_l = ops_per_token(lambda k: loop_side(model, cache_cfg, prompt, k))
    ops_e = ops_per_token(lambda k: engine_side(model, cache_cfg, engine_cfg, prompt, k))
    med = statistics.median
    print(f"model={a.model} threads={a.threads} device=cpu torch={torch.__version__} codec={a.codec} "
          f"prompt={a.prompt_len} tokens={a.tokens} repeats={a.repeats} engine_config={engine_cfg}")
    print(f"{'side':<8} {'tok/s median':>13} {'min':>9} {'max':>9}")
    for name, v in (("loop", loops), ("engine", engines)):
        print(f"{name:<8} {med(v):>13.1f} {min(v):>9.1f} {max(v):>9.1f}")
    print(f"ratio engine/loop: median {med(ratios):.3f}  [min {min(ratios):.3f}, max {max(ratios):.3f}]  "
          f"(target >= 0.95: {'met' if med(ratios) >= 0.95 else 'NOT met'})")
    print(f"torch ops/token: loop {ops_l:.0f}, engine {ops_e:.0f} (engine/loop {ops_e / ops_l:.3f})")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "threads": a.threads, "device": "cpu",
                                      "loop_tok_s": loops, "engine_tok_s": engines, "ratio": ratios,
                                      "ops_per_token": {"loop": ops_l, "engine": ops_e}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
