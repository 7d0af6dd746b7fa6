"""ryzlab's engine vs the transformers peer: highest Poisson rate under the SLO, same model, same load.

    .venv/bin/python benchmarks/serving_peer.py                      # reference model, 3 repeats
    .venv/bin/python benchmarks/serving_peer.py --repeats 5 --out /tmp/peer

Each side is a fresh server process per repeat (no cache, no warm state carried over): ryzlab
(``ryzlab serve``) and the peer (:mod:`ryzlab.serve.peer`: transformers'
``ContinuousBatchingManager`` on the same weights, same block size and number of blocks), both
with ``--threads`` torch threads, both measured by the same load generator over HTTP with the
same text prompts (sized from each server's own ``usage.prompt_tokens``) and the same
``ignore_eos`` outputs. The two sides alternate which goes first per repeat, so drift in the
machine's load hits both alike.

Per side and repeat: the highest offered Poisson rate with p99 TPOT < ``--tpot-ms`` (50) and
p99 TTFT < ``--ttft-ms`` (1000) and no failed request (doubling, then bisection:
:func:`ryzlab.loadgen.load.max_rate_search`), and the output-token throughput measured at that
rate. Printed: median and [min, max] per side over repeats, and the ratios ryzlab/peer (of the
medians, and the spread of the per-repeat ratios). Everything is measured on the device named in
the header; nothing is projected.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from ryzlab.io import write_json, write_parquet  # noqa: E402
from ryzlab.provenance import collect_env  # noqa: E402
from ryzlab.loadgen.client import (ENGINES, free_port, openai_client, probe_endpoint, serve_subprocess,  # noqa: E402
                                 served_models, server_argv)
from ryzlab.loadgen.metrics import median_range as spread  # noqa: E402
from ryzlab.loadgen.load import LoadSpec, max_rate_search, run_load  # noqa: E402


def served_cap(url: str) -> int | None:
    """The batch cap a server reports it runs with (``max_num_seqs`` in ``GET /v1/models``), not
    the flag it was given: the peer's transformers may resolve its own."""
    import httpx

    return httpx.get(url.rstrip("/") + "/models", timeout=30).json()["data"][0].get("max_num_seqs")


def trial(client, rate: float, args: argparse.Namespace, seed: int) -> dict:
    # about --trial-s seconds of arrivals, at least 8 requests
    n = max(8, int(rate * args.trial_s))
    spec = LoadSpec(arrival="poisson", rate=rate, num_requests=n, prompt_len=args.prompt_len,
                    output_len=args.output_len, seed=seed)
    res = asyncio.run(run_load(spec, client, timeout_s=n / rate + args.trial_timeout))
    return res.summary(f"ttft:{args.ttft_ms},tpot:{args.tpot_ms}")


def one_side(engine: str, repeat: int, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    port = free_port()
    argv = server_argv(engine, model=args.model, port=port, threads=args.threads, block_size=16,
                       num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs, max_model_len=1024)
    t = time.monotonic()
    with serve_subprocess(argv, port=port) as url:
        startup = time.monotonic() - t
        cap = served_cap(url)
        if cap != args.max_num_seqs:  # unequal caps make the comparison meaningless: stop, do not print a ratio
            raise SystemExit(f"{engine} server runs with a batch cap of {cap!r} sequences, not the "
                             f"{args.max_num_seqs} asked of both sides (its GET /v1/models max_num_seqs)")
        profile = probe_endpoint(url, served_models(url)[0])
        client = openai_client(profile)
        trial(client, 2.0, argparse.Namespace(**{**vars(args), "trial_s": 2.0}), 99)  # warm-up, not counted

        def held(s: dict) -> bool:
            return s["tpot_ms_p99"] < args.tpot_ms and s["ttft_ms_p99"] < args.ttft_ms and s["requests_failed"] == 0

        seeds = iter(range(1000))
        good, bad, trials = max_rate_search(lambda r: trial(client, r, args, next(seeds)), held,
                                            start_rate=args.start_rate, max_rate=args.max_rate,
                                            min_rate=args.min_rate, bisect=args.bisect)
    at = next((s for r, s, ok in trials if ok and r == good), None)
    row = {"engine": engine, "repeat": repeat, "max_rate": good if good is not None else math.nan,
           "first_failing_rate": bad if bad is not None else math.nan,
           "output_token_throughput": at["output_token_throughput"] if at else math.nan,
           "request_throughput": at["request_throughput"] if at else math.nan,
           "tpot_ms_p99": at["tpot_ms_p99"] if at else math.nan, "ttft_ms_p99": at["ttft_ms_p99"] if at else math.nan,
           "startup_s": startup, "max_num_seqs_served": cap, "count_source": at["count_source"] if at else "",
           "output_len_match_frac": at["output_len_match_frac"] if at else math.nan,
           "tokens_per_word": profile.tokens_per_word}
    low_rate, low, _ = min(trials, key=lambda t: t[0])  # latency where load matters least (also when none held)
    row.update(lowest_rate=low_rate, tpot_ms_p99_lowest_rate=low["tpot_ms_p99"],
               ttft_ms_p99_lowest_rate=low["ttft_ms_p99"])
    trail = "  ".join(f"{r:.3g}/s:tpot {s['tpot_ms_p99']:.0f}/ttft {s['ttft_ms_p99']:.0f}{'' if ok else '!'}"
                      for r, s, ok in trials)
    print(f"  {engine:12s} repeat {repeat} (batch cap {cap} as served): max rate {row['max_rate']:.3g} req/s, "
          f"{row['output_token_throughput']:.1f} output tok/s there   [{trail}]", flush=True)
    rows = [{**s, "kind": "summary", "engine": engine, "repeat": repeat, "rate": r, "held": ok, "via": "http",
             "workers": 1, "policy": "-", "codec": "none"} for r, s, ok in trials]
    return row, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="ryzlab model spec both sides load (default reference)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (default 1)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="batch cap of BOTH servers (default: from the KV capacity, min(--num-blocks, 256))")
    p.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--ttft-ms", type=float, default=1000.0)
    p.add_argument("--start-rate", type=float, default=4.0)
    p.add_argument("--max-rate", type=float, default=256.0)
    p.add_argument("--min-rate", type=float, default=0.25)
    p.add_argument("--bisect", type=int, default=2)
    p.add_argument("--trial-s", type=float, default=4.0, help="seconds of arrivals per trial (default 4)")
    p.add_argument("--trial-timeout", type=float, default=60.0)
    p.add_argument("--out", default=str(ROOT / "results" / "serving_peer"))
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_num_seqs is None:
        from ryzlab.serve.scheduler import max_num_seqs_for

        args.max_num_seqs = max_num_seqs_for(args.num_blocks)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = collect_env()
    load = os.getloadavg()
    print(f"device={env['device']} ({', '.join(env['device_names'])}, {env['cpu_count']} cores, load average "
          f"{load[0]:.1f} at start: shared machine), torch {env['torch']}, model={args.model}, "
          f"threads/server={args.threads}, max batch {args.max_num_seqs} sequences on both servers")
    print(f"SLO: p99 TPOT < {args.tpot_ms:g} ms and p99 TTFT < {args.ttft_ms:g} ms; prompt {args.prompt_len}, "
          f"output {args.output_len} tokens (ignore_eos), Poisson arrivals, {args.repeats} repeats, fresh server each")
    rows, trials = [], []
    for rep in range(args.repeats):
        order = ENGINES if rep % 2 == 0 else ENGINES[::-1]
        for engine in order:
            row, tr = one_side(engine, rep, args)
            rows.append(row)
            trials.extend(tr)
    df = pd.DataFrame(rows)
    ours, peer = df[df.engine == "ryzlab"], df[df.engine == "transformers"]
    print("results (median [min, max] over repeats):")
    for name, g in (("ryzlab", ours), ("transformers", peer)):
        print(f"  {name:12s} max rate {spread(list(g.max_rate))} req/s   output tok/s there "
              f"{spread(list(g.output_token_throughput))}   p99 TPOT at the lowest rate tried "
              f"({spread(list(g.lowest_rate))} req/s) {spread(list(g.tpot_ms_p99_lowest_rate))} ms")
    ratios = {}
    for col in ("max_rate", "output_token_throughput", "tpot_ms_p99_lowest_rate"):
        a, b = ours[col].median(), peer[col].median()
        per = [x / y for x, y in zip(ours.sort_values("repeat")[col], peer.sort_values("repeat")[col]) if y > 0]
        ratios[col] = {"ratio_of_medians": a / b if b > 0 else math.nan, "per_repeat": per}
        print(f"  ratio ryzlab/peer {col:24s}: {spread(per)}x per repeat (median [min, max]; "
              f"ratio of the medians {ratios[col]['ratio_of_medians']:.2f}x)")
    out = Path(args.out)
    write_parquet(out / "peer_maxrate.parquet", df)
    write_parquet(out / "peer_trials.parquet", pd.DataFrame(trials).assign(device=env["device"]))
    write_json(out / "serving_peer.json", {"env": env, "args": vars(args), "loadavg_start": load,
                                           "loadavg_end": os.getloadavg(), "rows": rows, "ratios": ratios})
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
