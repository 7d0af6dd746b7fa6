"""Serving benchmark: continuous batching vs sequential, max rate under a p99 TPOT SLO, worker kill.

    .venv/bin/python benchmarks/serving_bench.py            # all three parts (~3-5 min on 2 cores)
    .venv/bin/python benchmarks/serving_bench.py --parts batching

1. **batching**: the same model generates 16 requests (a) together, continuous batching, and
   (b) one at a time; token throughput ratio (target >= 4x on this CPU). Like for like: each side
   runs on a *fresh* engine with prefix caching off (no side reuses the other's prompt blocks),
   the sides alternate which goes first, and the whole comparison is repeated ``--repeats`` times;
   the median and [min, max] of the per-repeat ratios are printed.
2. **maxrate**: per config (workers x codec), the highest offered Poisson rate whose p99
   TPOT stays under 50 ms: doubling from ``--start-rate`` until the SLO breaks (halving
   when the start rate already breaks it), then bisection between the good and bad rates.
   TPOT alone cannot break once admission is capped (``max_num_seqs``): past saturation the
   queue grows and only TTFT shows it. So a rate also counts as held only while p99 TTFT stays
   under ``--ttft-bound-ms`` (default 1000 ms: the engine keeps up with the offered load); the
   TPOT-only figure is printed beside it. Each repeat starts fresh workers; spread over repeats
   is printed. (ryzlab vs the transformers peer: ``benchmarks/serving_peer.py``.)
3. **fault**: 2 workers under open-loop load, worker 0 SIGKILLed mid-run: requests lost (must
   be 0), time to detect, goodput dip and time to recover (the timeline is saved as parquet
   for the serving notebook's plot).

Every number printed is measured on the device named in the header; nothing is projected.
Results go to ``results/serving_bench/`` (JSON + parquet).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ryzlab.io import write_json, write_parquet  # noqa: E402
from ryzlab.models.transformer import REFERENCE_CHECKPOINT  # noqa: E402
from ryzlab.provenance import collect_env  # noqa: E402
from ryzlab.config import CacheConfig  # noqa: E402
from ryzlab.serve.engine import EngineConfig, SamplingParams  # noqa: E402
from ryzlab.serve.local import backend_client  # noqa: E402
from ryzlab.serve.replica import ReplicaSpec, build_engine  # noqa: E402
from ryzlab.loadgen.metrics import median_range as spread  # noqa: E402
from ryzlab.loadgen.load import LoadSpec, max_rate_search, run_load  # noqa: E402
from ryzlab.serve.router import Router  # noqa: E402

PARTS = ("batching", "maxrate", "fault")
SLO_MS = 50.0


def pick_model(name: str) -> str:
    if name != "auto":
        return name
    if REFERENCE_CHECKPOINT.exists():
        return "reference"
    print("  (no reference checkpoint yet: a randomly initialised model of the same shape; timing only)")
    return "random"


def _batching_side(model: str, prompts: list[list[int]], sp: SamplingParams, batched: bool) -> tuple[float, list]:
    """A fresh engine, prefix caching off, warmed up on other prompts; seconds and outputs of one side."""
    eng = build_engine(ReplicaSpec(model=model, cache=CacheConfig(block_size=16, num_blocks=1024),
                                   engine=EngineConfig(max_num_seqs=16, max_model_len=1024, enable_prefix_caching=False)))
    eng.generate([[1, 2, 3, 4], [5, 6, 7, 8]], SamplingParams(max_tokens=4))  # warm-up (kernels, allocator)
    t = time.perf_counter()
    out = eng.generate(prompts, sp) if batched else [eng.generate([p], sp)[0] for p in prompts]
    return time.perf_counter() - t, out


def part_batching(args: argparse.Namespace, model: str) -> dict:
    torch.set_num_threads(args.threads)
    vocab = build_engine(ReplicaSpec(model=model, cache=CacheConfig(block_size=16, num_blocks=8))).vocab_size
    sp = SamplingParams(max_tokens=args.output_len)
    reps = []
    for rep in range(args.repeats):
        g = torch.Generator().manual_seed(rep)
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(16)]
        sides = {}
        for batched in ((False, True) if rep % 2 == 0 else (True, False)):
            sides[batched] = _batching_side(model, prompts, sp, batched)
        (seq_s, seq_out), (bat_s, bat_out) = sides[False], sides[True]
        ntok = sum(map(len, bat_out))
        reps.append({"sequential_tok_s": ntok / seq_s, "batched_tok_s": ntok / bat_s, "ratio": seq_s / bat_s,
                     "same_tokens": seq_out == bat_out})
        print(f"  repeat {rep}: sequential {ntok / seq_s:7.1f} tok/s, batched {ntok / bat_s:7.1f} tok/s, "
              f"ratio {seq_s / bat_s:.2f}x, greedy tokens identical: {seq_out == bat_out}", flush=True)
    res = {"requests": 16, "prompt_len": args.prompt_len, "output_len": args.output_len, "threads": args.threads,
           "repeats": reps, "prefix_caching": False, "fresh_engine_per_side": True,
           "ratio_median": statistics.median(r["ratio"] for r in reps),
           "ratio_min": min(r["ratio"] for r in reps), "ratio_max": max(r["ratio"] for r in reps),
           "same_tokens": all(r["same_tokens"] for r in reps)}
    print(f"  sequential one-at-a-time : {spread([r['sequential_tok_s'] for r in reps])} output tok/s")
    print(f"  continuous batching (16) : {spread([r['batched_tok_s'] for r in reps])} output tok/s")
    print(f"  ratio                    : {spread([r['ratio'] for r in reps])}x over {len(reps)} repeats "
          f"(median [min, max]; target >= 4x), greedy tokens identical: {res['same_tokens']}")
    return res


async def _trial(router: Router, rate: float, args: argparse.Namespace, seed: int) -> dict:
    # about 3 s of arrivals at high rates, at least 8 requests (and at most ~8/rate s) at low ones
    n = max(min(args.trial_requests, max(8, int(rate * 8))), int(rate * 3))
    spec = LoadSpec(arrival="poisson", rate=rate, num_requests=n,
                    prompt_len=args.prompt_len, output_len=args.output_len, seed=seed,
                    vocab_size=router.vocab_size)
    res = await run_load(spec, backend_client(router), timeout_s=n / rate + args.trial_timeout)
    return res.summary(f"tpot:{SLO_MS}")


def _holds(s: dict, args: argparse.Namespace) -> bool:
    return (s["tpot_ms_p99"] < SLO_MS and s["ttft_ms_p99"] < args.ttft_bound_ms
            and s["requests_failed"] == 0)


def part_maxrate(args: argparse.Namespace, model: str) -> list[dict]:
    rows = []
    for workers in args.workers:
        for codec in args.codecs:
            spec = ReplicaSpec(model=model, cache=CacheConfig(codec=codec, block_size=16, num_blocks=512),
                               engine=EngineConfig(max_num_seqs=16, max_model_len=1024))
            per_repeat = []
            for rep in range(args.repeats):  # fresh workers each repeat
                with Router(workers=workers, policy=args.policy, spec=spec,
                            threads_per_worker=args.threads) as router:
                    asyncio.run(_trial(router, 2.0, argparse.Namespace(**{**vars(args), "trial_requests": 4}), 99))
                    seeds = iter(range(rep * 1000, rep * 1000 + 1000))
                    good, bad, trials = max_rate_search(
                        lambda r: asyncio.run(_trial(router, r, args, next(seeds))), lambda s: _holds(s, args),
                        start_rate=args.start_rate, max_rate=args.max_rate, min_rate=args.min_rate, bisect=args.bisect)
                tpot_only = max((r for r, s, _ in trials if s["tpot_ms_p99"] < SLO_MS and s["requests_failed"] == 0),
                                default=math.nan)
                trail = "  ".join(f"{r:g}/s->tpot {s['tpot_ms_p99']:.0f}/ttft {s['ttft_ms_p99']:.0f}ms"
                                  f"{'' if ok else '!'}" for r, s, ok in trials)
                print(f"    workers={workers} codec={codec} repeat {rep}: "
                      f"{'none' if good is None else f'{good:g} req/s'}  [{trail}]", flush=True)
                per_repeat.append({"max_rate": good if good is not None else math.nan, "tpot_only": tpot_only,
                                   "first_failing_rate": bad if bad is not None else math.nan,
                                   "trials": [{"rate": r, "tpot_ms_p99": s["tpot_ms_p99"],
                                               "ttft_ms_p99": s["ttft_ms_p99"], "achieved_rate": s["achieved_rate"],
                                               "request_throughput": s["request_throughput"], "ok": ok}
                                              for r, s, ok in trials]})
            best = [r["max_rate"] for r in per_repeat]
            print(f"  workers={workers} codec={codec:8s} max rate with p99 TPOT < {SLO_MS:g} ms and p99 TTFT < "
                  f"{args.ttft_bound_ms:g} ms: {spread(best)} req/s (median [min, max] of {args.repeats}; "
                  f"p99 TPOT alone: {spread([r['tpot_only'] for r in per_repeat])} req/s)")
            finite = [x for x in best if not math.isnan(x)]
            rows.append({"workers": workers, "codec": codec, "policy": args.policy,
                         "max_rate_p99_tpot_under_50ms": statistics.median(finite) if finite else math.nan,
                         "max_rate_min": min(finite, default=math.nan), "max_rate_max": max(finite, default=math.nan),
                         "ttft_bound_ms": args.ttft_bound_ms, "repeats": per_repeat})
    return rows


def part_fault(args: argparse.Namespace, model: str, out: Path) -> dict:
    from ryzlab.experiments.serving import Config, run

    # short outputs and a kill well into the run, so there is a steady state before and after
    cfg = Config(workers=2, policy=args.policy, rate=args.fault_rate, num_requests=int(args.fault_rate * 14),
                 prompt_len=args.prompt_len, output_len=16, model=model, fault="kill",
                 fault_at_s=5.0, bin_s=1.0, slo=args.fault_slo)
    df = run(cfg)
    write_parquet(out / "fault_timeline.parquet", df)
    s = df[df["kind"] == "summary"].iloc[0].to_dict()
    lost = int(s["requests_lost"])
    print(f"  requests {int(s['requests'])}: completed {int(s['requests_completed'])}, answered with an error "
          f"{int(s['requests_failed'])}, re-routed {int(s['requests_rerouted'])}, LOST {lost} (must be 0)")
    print(f"  time to detect {s['time_to_detect_s']:.2f} s, worker restarted after {s['worker_restart_s']:.1f} s")
    print(f"  goodput before the kill {s.get('goodput_before_fault', math.nan):.2f} req/s, dip to "
          f"{s.get('goodput_dip', math.nan):.2f} req/s, recovered (>= 80%) after "
          f"{s.get('time_to_recover_s', math.nan):.2f} s")
    print(f"  timeline: {out / 'fault_timeline.parquet'}")
    return {k: (v if not isinstance(v, float) or not math.isnan(v) else None) for k, v in s.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--model", default="auto", help="auto (reference if shipped, else random of the same shape), "
                                                   "reference, random, or a checkpoint path")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each comparison, fresh engines each (default 3)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--codecs", nargs="+", default=["none", "int8"])
    p.add_argument("--policy", default="least_outstanding")
    p.add_argument("--start-rate", type=float, default=2.0)
    p.add_argument("--max-rate", type=float, default=256.0)
    p.add_argument("--min-rate", type=float, default=0.25)
    p.add_argument("--bisect", type=int, default=2)
    p.add_argument("--trial-requests", type=int, default=24)
    p.add_argument("--ttft-bound-ms", type=float, default=1000.0,
                   help="a rate counts as held only while p99 TTFT stays under this (the engine keeps up)")
    p.add_argument("--trial-timeout", type=float, default=60.0,
                   help="seconds a trial may run past its last scheduled arrival")
    p.add_argument("--fault-rate", type=float, default=4.0)
    p.add_argument("--fault-slo", default="ttft:2000,tpot:250",
                   help="SLO of the goodput plotted around the kill (one the healthy pair meets here)")
    p.add_argument("--out", default=str(ROOT / "results" / "serving_bench"))
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = collect_env()
    out = Path(args.out)
    model = pick_model(args.model)
    load = os.getloadavg()
    print(f"device={env['device']} ({', '.join(env['device_names'])}, {env['cpu_count']} cores, load average "
          f"{load[0]:.1f} at start: shared machine), torch {env['torch']}, model={model}, "
          f"threads/engine={args.threads}")
    results: dict = {"env": env, "model": model, "args": vars(args), "loadavg_start": load}
    if "batching" in args.parts:
        print(f"[1] continuous batching vs sequential: 16 requests, prompt {args.prompt_len}, "
              f"output {args.output_len} tokens")
        results["batching"] = part_batching(args, model)
    if "maxrate" in args.parts:
        print(f"[2] highest Poisson rate with p99 TPOT < {SLO_MS:g} ms (policy {args.policy})")
        results["maxrate"] = part_maxrate(args, model)
    if "fault" in args.parts:
        print(f"[3] kill 1 of 2 workers under {args.fault_rate:g} req/s (goodput SLO {args.fault_slo})")
        results["fault"] = part_fault(args, model, out)
    results["loadavg_end"] = os.getloadavg()
    print(f"load average at the end: {results['loadavg_end'][0]:.1f} (other jobs share these cores)")
    write_json(out / "serving_bench.json", results)
    print(f"results: {out / 'serving_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
