"""Where one decode step of the serving engine spends its time, at batch 1 and 16.

The engine is built as ``ryzlab serve`` builds it (:func:`ryzlab.serve.replica.build_engine`,
same cache and scheduler), ``batch`` requests are prefilled, then ``--steps`` decode steps are
timed. Each step is split by wrapping the engine's parts with wall-clock timers (no library
change; nested ranges are subtracted from their parent):

* ``scheduling``  - :meth:`Scheduler.schedule` (the cache's ``allocate_slots`` included)
* ``step plan``   - :meth:`PagedKVCache.extend` (block tables, positions, gather indices)
* ``kv write``    - per-layer writes of the new K/V into the pages (a decode step over plain
  pages: :meth:`PagedKVCache.write_gather`, the write and the page gather; under ``--compile``
  a plain decode writes and gathers inside the compiled graph: ``model math``)
* ``attention``   - per-layer attention over the pages (gather + matmuls / kernel; under
  ``--compile`` a plain decode's attention math is inside the compiled graph: ``model math``)
* ``model math``  - the rest of the forward (embedding, projections, MLP, norms, head)
* ``sampling``    - choosing the next token from the logits
* ``engine rest`` - the rest of :meth:`Engine.step` (bookkeeping, outputs)
* ``detokenize``  - what the HTTP layer does per new token (:class:`ryzlab.serve.output.ChoiceText`),
  timed after the step: it runs on the API's event loop, not inside ``Engine.step``
* ``ipc``         - pickling + unpickling the step's outputs as a worker sends them to the router

``torch ops/step`` counts the ATen operators one decode step dispatches (a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` over two more steps, after the timed
ones): unlike the times it does not move with the machine's load, so it shows the fixed cost
of a change on a shared machine.

Each figure is the median over ``--repeats`` runs (fresh engine each) of the mean per step,
with the min-max spread. ``--compile`` / ``--no-compile`` choose the engine's compiled step when
the engine has that option. Printed as a table; ``--json`` writes the numbers.

    python benchmarks/step_profile.py --batches 1,16 --steps 32 --repeats 3
    python benchmarks/step_profile.py --model smollm2        # the real SmolLM2-135M GGUF, if installed
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("scheduling", "step plan", "kv write", "attention", "model math", "sampling", "engine rest",
         "detokenize", "ipc")


class Timers:
    """Wall-clock ranges with nesting: time spent in a child is not counted in its parent."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, child time]

    def wrap(self, obj: object, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            self._stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*a, **kw)
            finally:
                n, t0, child = self._stack.pop()
                dt = time.perf_counter() - t0
                self.acc[n] += dt - child
                if self._stack:
                    self._stack[-1][2] += dt

        setattr(obj, attr, timed)


def _model_path(name: str) -> str:
    if name != "smollm2":
        return name
    from ryzlab.models import smollm2_gguf_path

    p = smollm2_gguf_path()
    if p is None:
        raise SystemExit("SmolLM2 is not installed (make real-model)")
    return str(p)


def one_run(model: str, batch: int, steps: int, prompt_len: int, threads: int, compile_step: bool | None,
            seed: int, weights: str | None = None, dtype: str | None = None) -> dict[str, float]:
    """Seconds per decode step of each part (mean over ``steps``) for one fresh engine."""
    import dataclasses

    from ryzlab.config import CacheConfig
    from ryzlab.serve.output import ChoiceText
    from ryzlab.serve.replica import build_engine
    from ryzlab.serve.sampling import SamplingParams
    from ryzlab.serve.scheduler import EngineConfig
    from ryzlab.serve.spec import ReplicaSpec

    ekw = {"max_num_seqs": max(batch, 1), "max_num_batched_tokens": max(256, batch),
           "max_model_len": prompt_len + steps + 8}
    if compile_step is not None and "compile" in {f.name for f in dataclasses.fields(EngineConfig)}:
        ekw["compile"] = compile_step
    spec = ReplicaSpec(model=model, weights=weights, dtype=dtype, cache=CacheConfig(num_blocks=max(64, batch * (-(-(prompt_len + steps + 8) // 16)))),
                       engine=EngineConfig(**ekw))
    eng = build_engine(spec, threads=threads)
    tok = eng.tokenizer
    g = torch.Generator().manual_seed(seed)
    vocab = eng.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        # max_tokens covers the warm-up + timed steps; no stop token so every sequence runs on
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=steps + 6))
    while any(s.pending > 1 or s.num_computed == 0 for s in eng.running) or eng.waiting:
        eng.step()                                      # prefill (not timed)
    for _ in range(2):
        eng.step()                                      # warm-up decode steps
    texts = {f"r{i}": ChoiceText(i, tok) for i in range(batch)}
    t = Timers()
    cache, store = eng.cache, eng.cache.store
    t.wrap(eng, "step", "engine rest")
    t.wrap(eng.scheduler, "schedule", "scheduling")
    t.wrap(eng, "_forward", "model math")
    t.wrap(cache, "extend", "step plan")
    t.wrap(cache, "write", "kv write")
    t.wrap(cache, "attend", "attention")
    if hasattr(cache, "write_attend"):  # the model's one call per layer; a decode over plain pages
        t.wrap(cache, "write_attend", "attention")  # writes and gathers in write_gather ("kv write")
        t.wrap(cache, "write_gather", "kv write")
    if hasattr(eng, "_sample"):
        t.wrap(eng, "_sample", "sampling")
    if hasattr(eng, "_sample_batch"):
        t.wrap(eng, "_sample_batch", "sampling")
    del store
    for _ in range(steps):
        outs = eng.step()
        t0 = time.perf_counter()
        for o in outs:
            texts[o.request_id].add(o.new_tokens)
        t1 = time.perf_counter()
        msg = pickle.dumps(("step", [(o.request_id, o.new_tokens, o.finish_reason, o.error) for o in outs]))
        pickle.loads(msg)
        t2 = time.perf_counter()
        t.acc["detokenize"] += t1 - t0
        t.acc["ipc"] += t2 - t1
    res = {k: t.acc.get(k, 0.0) / steps for k in PARTS}
    res["ops"] = count_ops(eng, 2) / 2
    return res


def count_ops(eng, steps: int) -> int:
    """ATen operators dispatched by ``steps`` engine steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        for _ in range(steps):
            eng.step()
    return Count.n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="'reference', 'smollm2', or a model path")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", dest="compile_step", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile_step", action="store_false")
    p.add_argument("--weights", default=None, help="weight format (ryzlab serve --weights; default float32)")
    p.add_argument("--dtype", default=None, help="activation dtype (ryzlab serve --dtype; default the model's)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    model = _model_path(a.model)
    torch.set_num_threads(a.threads)
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        runs = [one_run(model, b, a.steps, a.prompt_len, a.threads, a.compile_step, seed=r,
                        weights=a.weights, dtype=a.dtype) for r in range(a.repeats)]
        total = [sum(r[k] for k in PARTS) for r in runs]
        print(f"\nmodel={a.model} weights={a.weights or 'float32'} dtype={a.dtype or 'model'} batch={b} threads={a.threads} steps={a.steps} repeats={a.repeats} "
              f"device=cpu torch={torch.__version__}")
        print(f"{'part':<12} {'ms/step':>9} {'min':>8} {'max':>8} {'share':>7}")
        med_total = statistics.median(total)
        for k in PARTS:
            v = [r[k] * 1e3 for r in runs]
            print(f"{k:<12} {statistics.median(v):>9.3f} {min(v):>8.3f} {max(v):>8.3f} "
                  f"{100 * statistics.median(v) / (med_total * 1e3):>6.1f}%")
        print(f"{'total':<12} {med_total * 1e3:>9.3f} {min(total) * 1e3:>8.3f} {max(total) * 1e3:>8.3f}  "
              f"-> {b / med_total:.1f} tok/s")
        print(f"{'torch ops/step':<14} {statistics.median(r['ops'] for r in runs):.0f}")
        rows.append({"model": a.model, "weights": a.weights or "float32", "dtype": a.dtype or "model", "batch": b, "threads": a.threads, "device": "cpu",
                     **{k + "_ms": statistics.median([r[k] * 1e3 for r in runs]) for k in PARTS},
                     "total_ms": med_total * 1e3, "ops_per_step": statistics.median(r["ops"] for r in runs)})
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
