"""``ryzlab``: run sweeps of notebooks, build reports, describe this machine, serve and benchmark a model."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ryzlab.config import CODECS, ConfigError
from ryzlab.workbench.spec import MAX_POINTS

EPILOG = """examples:
  ryzlab info                                  what this machine offers (python, torch, devices, health)
  ryzlab sweep specs/demo.yaml --jobs 2        run every point of a spec (resumes: ok points are skipped)
  ryzlab sweep specs/demo.yaml --dry-run       list the points it would run
  ryzlab sweep specs/demo.yaml --executor ray --address auto   the same points as tasks on a Ray cluster
  ryzlab report results/demo                   aggregate ok runs into results/demo/report.html
  ryzlab compare results/A results/B           B/A per metric with bootstrap intervals (--fail-on-regression for CI)
  ryzlab generate --prompt "def f(" --tp 2     complete a prompt with the model split over 2 ranks
  ryzlab serve --tp 2 --workers 2              2 replicas of 2 tensor-parallel ranks behind the router
  ryzlab loadgen --url http://127.0.0.1:8000/v1 --rate 4 --out results/lg   benchmark any OpenAI endpoint
  ryzlab kv-plan --model M.gguf --text t.txt --max-kl 0.02   smallest KV layout within an accuracy budget
  ryzlab bench --model M.gguf -p 512 -n 128    prefill and decode tokens/s, median [min, max] of 5 repeats
  ryzlab project --model llama-3-8b --device h100-sxm --tp 1,2,4 --json   PROJECTED step time, latency, memory
  ryzlab plan --model llama-3-8b --slo-ttft-ms 500 --slo-tpot-ms 50 --rate 100 --devices h100-sxm,l4   PROJECTED plans
"""


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ryzlab.workbench.sweep import run_sweep

    if args.dry_run:
        return _dry_run(args)
    summary = run_sweep(args.spec, jobs=args.jobs, out=args.out, timeout=args.timeout,
                        kernel_name=args.kernel, progress=not args.no_progress, threads=args.threads,
                        max_points=args.max_points, executor=args.executor, address=args.address,
                        retries=args.retries)
    for line in summary.lines():
        print(line)
    return 0 if summary.failed + summary.timeout == 0 else 1


def _dry_run(args: argparse.Namespace) -> int:
    """Validate and list every point (done / to run) without running or writing anything."""
    from ryzlab.workbench.sweep import default_out, estimate_line, is_done, manifest_status, plan, resolve_threads

    threads = resolve_threads(args.jobs, args.threads)
    spec, points = plan(args.spec, max_points=args.max_points, kernel_name=args.kernel)
    out = Path(args.out) if args.out else default_out(spec)
    latest = manifest_status(out)
    todo = []
    for p in points:
        done = is_done(out, p.run_id, latest)
        todo += [] if done else [p]
        print(f"{'done' if done else 'todo'}  {p.run_id}  {p.label}")
    print(f"sweep {spec.name}: {len(points)} points, {len(points) - len(todo)} done, {len(todo)} to run -> {out} "
          f"(--jobs {args.jobs}, {threads} torch thread(s) per point; dry run: nothing ran)")
    estimate = estimate_line(todo, latest, jobs=args.jobs) if todo else None
    if estimate:
        print(estimate)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ryzlab.workbench.report import build_report

    out = build_report(args.sweep_dir, kernel_name=args.kernel, progress=not args.no_progress)
    print(f"report: {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ryzlab.workbench.compare import compare, html_page, terminal_table
    from ryzlab.io import write_bytes

    c = compare(args.a, args.b, min_change=args.min_change, confidence=args.confidence)
    print(terminal_table(c, args.confidence))
    out = Path(args.html) if args.html else Path(args.b) / f"compare-{Path(args.a).resolve().name}.html"
    write_bytes(out, html_page(c, min_change=args.min_change, confidence=args.confidence).encode())
    print(f"html: {out}")
    if len(c.table) == 0:
        print("no metric with per-step samples is present in both sweeps: nothing was judged", file=sys.stderr)
        return 1 if args.fail_on_regression else 0  # CI must not pass a comparison that compared nothing
    return 1 if args.fail_on_regression and len(c.regressions) else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ryzlab.provenance import collect_env, nvidia_devices

    env = collect_env()
    print(f"ryzlab      {Path(__file__).resolve().parent}")
    print(f"python      {env['python']}   torch {env['torch']}   CUDA {env['cuda']}")
    print(f"git         {env['git_sha']}{' (dirty)' if env['git_dirty'] else ''}")
    print(f"host        {env['host']}   {env['platform']}")
    print(f"cpu         {env['cpu_model']} x{env['cpu_count']}")
    if nvidia_devices():
        print(f"devices     {env['gpu_count']} CUDA device(s): {', '.join(env['device_names'])}")
    else:
        print("devices     no NVIDIA device: CPU ranks (gloo)")
    try:
        from ryzlab.orchestrator.health import describe_health
    except ImportError:
        return 0
    for line in describe_health():
        print(f"health      {line}")
    return 0


def _add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    g = subparsers.add_parser(
        "generate", help="complete one prompt with a model split over tp x cp ranks",
        description="Greedy (or sampled) completion of --prompt. Starts tp x cp ranks itself, or runs as the "
                    "rank torchrun made it: torchrun --nproc-per-node 2 -m ryzlab generate --tp 2 --prompt ...")
    g.add_argument("--prompt", required=True, help="text to complete")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    g.add_argument("--cp", type=int, default=1, help="context-parallel ranks (default 1)")
    g.add_argument("--codec", default="none", choices=CODECS, help="KV-cache storage format (default none)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--model", default="reference",
                   help="'reference' (default), 'random', a Hugging Face folder or a .gguf file")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32 on CPU, the checkpoint's on a GPU)")
    g.add_argument("--weights", default="float32", metavar="FORMAT",
                   help="weight format: float32 (default), bf16, int8, int8-g<N>, int4-g32/g64/g128/g256, ternary, "
                        "gguf (a GGUF file's own Q8_0/Q4_x blocks); add -f32 for float32 scales")
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    g.add_argument("--json", action="store_true", help="print one JSON line with text and token_ids")
    g.set_defaults(fn=cmd_generate)
    return g


def cmd_generate(args: argparse.Namespace) -> int:
    import os
    import time

    from ryzlab.models.quant import parse_weight_format
    from ryzlab.serve.generate import GenerateRequest, generate

    req = GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens, tp=args.tp, cp=args.cp, codec=args.codec,
                          temperature=args.temperature, seed=args.seed, model=args.model, threads=args.threads,
                          dtype=args.dtype, weights=parse_weight_format(args.weights).name)
    # progress on stderr (stdout stays the completion, or the JSON line): loading a checkpoint
    # and starting ranks takes seconds to minutes; one rank of a torchrun job says it
    talk = os.environ.get("RANK", "0") == "0"
    t0 = time.perf_counter()
    if talk:
        print(f"ryzlab generate: loading {args.model} on {req.tp * req.cp} rank(s) (tp {req.tp} x cp {req.cp}), "
              f"then up to {req.max_tokens} tokens ...", file=sys.stderr, flush=True)
    from ryzlab.orchestrator.nodes import NodeLostError

    try:
        out = generate(req)
    except NodeLostError as e:  # a whole node of a torchrun job went away: one line naming it, exit 1
        print(f"ryzlab generate: {e}", file=sys.stderr, flush=True)
        return 1
    if not out:  # a torchrun rank other than 0
        return 0
    if talk:
        print(f"ryzlab generate: {len(out['token_ids'])} tokens in {time.perf_counter() - t0:.1f} s (model load "
              f"included) on {out.get('device', '?')}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"text": out["text"], "token_ids": out["token_ids"], "request": dataclasses.asdict(req)}))
    else:
        print(out["text"])
    return 0


def _add_kv_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    k = subparsers.add_parser(
        "kv-plan", help="measure KV-cache layouts on a model and pick the smallest within a KL budget",
        description="Teacher-forced decode of --text through each candidate KV layout (and a per-layer mixed-"
                    "precision layout from a sensitivity scan) vs the uncompressed cache; prints the table, the "
                    "Pareto front (bytes vs KL) and the fewest bytes/token whose KL per token is <= --max-kl. "
                    "Exit status 1 when no layout is within the budget.")
    k.add_argument("--model", required=True, help="'reference', a Hugging Face folder or a .gguf file")
    k.add_argument("--text", default="", help="UTF-8 text file to score (default: the held-out stdlib text)")
    k.add_argument("--max-kl", type=float, required=True, help="budget: KL per token vs the uncompressed cache")
    k.add_argument("--layout", action="append", default=[],
                   help="codec[,field=value...], repeatable; replaces the built-in candidates "
                        "(e.g. int4,rotation=hadamard or int2,symmetric=false,residual=64)")
    k.add_argument("--mixed", default=None,
                   help="HIGH,LOW,N: scan per-layer sensitivity with LOW and measure the layout that keeps the N "
                        "most sensitive layers in HIGH; 'none' skips it (default int4,int2,N with N half the "
                        "model's layers, at most 8)")
    k.add_argument("--windows", type=int, default=4, help="text windows (default 4)")
    k.add_argument("--length", type=int, default=None,
                   help="tokens per window (default 512, or the model's context if shorter)")
    k.add_argument("--prefill", type=int, default=None,
                   help="tokens prefilled per window; the rest is scored (default half of --length)")
    k.add_argument("--weights", default="",
                   help="comma-separated weight formats to plan with the KV layouts (e.g. float32,int8,int4-g32): "
                        "every pair measured against float32 weights + uncompressed KV, weight bytes from the "
                        "weight ledger added to the budget; the pick is the fewest weights + KV bytes within --max-kl")
    k.add_argument("--tokens", type=int, default=None,
                   help="with --weights: KV tokens the budget holds (default: the model's context)")
    k.add_argument("--memory-mib", type=float, default=None,
                   help="with --weights: memory for weights + KV; the pick is the pair holding the most tokens")
    k.add_argument("--plot", help="write the Pareto plot here (.png)")
    k.add_argument("--out", help="write the table here (.parquet or .csv)")
    k.add_argument("--device", default="cpu")
    k.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    k.set_defaults(fn=cmd_kv_plan)
    return k


def cmd_kv_plan(args: argparse.Namespace) -> int:
    from ryzlab.evaluation.accuracy import parse_layout
    from ryzlab.evaluation.plan import plan_candidates, plan_kv

    cands = [parse_layout(t, {}) for t in args.layout] if args.layout else plan_candidates()
    mixed: tuple[str, str, int | None] | None = ("int4", "int2", None)  # N from the model
    if args.mixed == "none":
        mixed = None
    elif args.mixed is not None:
        parts = args.mixed.split(",")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"--mixed {args.mixed!r}: expected HIGH,LOW,N (e.g. int4,int2,8) or 'none'")
        mixed = (parts[0], parts[1], int(parts[2]))
    for name, v in (("--plot", args.plot), ("--out", args.out)):
        if v and not Path(v).expanduser().resolve().parent.is_dir():
            raise ValueError(f"{name} {v}: its folder does not exist")
    if args.out and not args.out.endswith((".parquet", ".csv")):
        raise ValueError(f"--out {args.out}: use a .parquet or .csv file")
    res = plan_kv(args.model, args.text or None, args.max_kl, candidates=cands, windows=args.windows,
                  length=args.length, prefill=args.prefill, mixed=mixed, device=args.device, threads=args.threads,
                  progress=True, weights=[w for w in args.weights.split(",") if w.strip()] or None,
                  tokens=args.tokens, memory_mib=args.memory_mib)
    t = res.table
    cols = ["layout", "kv_bytes_per_token", "bytes_vs_fp32", "kl_per_token", "ppl_delta", "top1_agree",
            "within_budget", "pareto"]
    if "weights" in t.columns:
        cols = ["weights", "weight_bytes", *cols[:3], "total_bytes",
                *(["tokens_in_budget"] if "tokens_in_budget" in t.columns else []), *cols[3:]]
    print(f"model={res.model} text={res.text} device={t['device'].iloc[0]}: {args.windows} windows x "
          f"{int(t['seq_len'].iloc[0])} tokens, prefill {int(t['prefill'].iloc[0])}, "
          f"{int(t['tokens_scored'].iloc[0])} positions scored")
    print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(res.sensitivity):
        s = res.sensitivity.sort_values("kl_per_token", ascending=False)
        print("layer sensitivity (KL/token, that layer alone in " + mixed[1] + "): " +  # type: ignore[index]
              ", ".join(f"L{int(r.layer)} {r.kl_per_token:.3g}" for r in s.itertuples()))
    print(res.summary())
    if args.out:
        out = t.drop(columns=["cache_config"])
        out.to_parquet(args.out) if args.out.endswith(".parquet") else out.to_csv(args.out, index=False)
    if args.plot:
        from ryzlab.plots.kv_compression import plan_figure

        plan_figure(res).savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"plot: {args.plot}")
    return 0 if res.best is not None else 1


def _add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", help="prefill and decode tokens/s of a model (like llama-bench): one number before a sweep",
        description="Prefill BATCH rows of --prompt-tokens into a fresh paged KV cache, then decode --output-tokens "
                    "greedy steps; --repeats times after one untimed warm-up. Prints tokens/s per test: median "
                    "and [min, max] over the repeats. The model and its cache only: no scheduler, no HTTP.")
    b.add_argument("--model", default="reference",
                   help="'reference' (default), 'random', a Hugging Face folder or a .gguf file")
    b.add_argument("--prompt-tokens", "-p", type=int, default=512, help="prefill tokens per row (default 512)")
    b.add_argument("--output-tokens", "-n", type=int, default=128, help="decode steps (default 128)")
    b.add_argument("--batch", "-b", type=int, default=1, help="rows prefilled and decoded together (default 1)")
    b.add_argument("--repeats", "-r", type=int, default=5, help="timed repeats (default 5)")
    b.add_argument("--codec", default="none", choices=CODECS, help="KV-cache storage format (default none)")
    b.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32 on CPU, the checkpoint's on a GPU)")
    b.add_argument("--device", default="auto", help="auto (cuda when present; default), cpu, cuda, cuda:1 ...")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--json", action="store_true", help="print one JSON line with every repeat's seconds")
    b.set_defaults(fn=cmd_bench)
    return b


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ryzlab.serve.bench import BenchConfig, check_bench, run_bench

    cfg = BenchConfig(model=args.model, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                      batch=args.batch, repeats=args.repeats, codec=args.codec, dtype=args.dtype, device=args.device,
                      threads=args.threads)
    check_bench(cfg)  # a bad size or model fails before the progress bar
    with tqdm(total=cfg.repeats, desc="bench: loading model, warm-up", unit="repeat", leave=False) as bar:
        def advance(i: int) -> None:
            bar.set_description("bench")
            bar.update(1)

        res = run_bench(cfg, on_repeat=advance)
    if args.json:
        print(json.dumps({"config": dataclasses.asdict(cfg), "model": res.model_name, "device": res.device,
                          "dtype": res.dtype, "threads": res.threads, "prefill_s": res.prefill_s,
                          "decode_s": res.decode_s, "prefill_tok_s": res.tokens_per_s("prefill"),
                          "decode_tok_s": res.tokens_per_s("decode")}))
    else:
        for line in res.lines():
            print(line)
    return 0


def version() -> str:
    """The installed distribution's version, or the package's own in a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from ryzlab import __version__

    try:
        return dist_version("ryzlab")
    except PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ryzlab", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Research and benchmarking workbench for distributed LLM inference: "
                    "KV-cache compression, paging, sharding, scaling and serving, measured.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    p.add_argument("--version", action="version", version=f"ryzlab {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("sweep", help="run a parameter grid of notebooks (papermill), one process + kernel per point",
                       description="Expand SPEC's grid, validate every point before anything runs, execute the "
                                   "missing points and record each in results/<sweep>/manifest.jsonl.")
    s.add_argument("spec", help="sweep spec (YAML), e.g. specs/demo.yaml")
    s.add_argument("--jobs", "-j", type=int, default=1, help="points run at once, each in its own process (default 1)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads per point (default: cores // jobs, so points do not slow each other down)")
    s.add_argument("--dry-run", action="store_true", help="validate and list the expanded points; run nothing")
    s.add_argument("--max-points", type=int, default=MAX_POINTS, metavar="N",
                   help=f"refuse specs that expand to more than N points (default {MAX_POINTS})")
    s.add_argument("--out", help="sweep directory (default results/<spec name>)")
    s.add_argument("--timeout", type=float, help="seconds a point may run before it is killed and marked timeout")
    s.add_argument("--kernel", default="ryzlab", help="Jupyter kernel to run notebooks in (default ryzlab)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="local: --jobs processes on this machine (default); ray: one Ray task per point")
    s.add_argument("--address", help="--executor ray: the cluster, 'auto' (RAY_ADDRESS or a running `ray start`), "
                                     "HOST:PORT or ray://HOST:PORT (default: start a local Ray instance)")
    s.add_argument("--retries", type=int, help="--executor ray: times a point is submitted again after its worker, "
                                               "node or process died (default 2)")
    s.set_defaults(fn=_cmd_sweep)

    r = sub.add_parser("report", help="aggregate a sweep's ok runs into an offline report.html",
                       description="Aggregate every ok run of SWEEP_DIR, execute notebooks/report.ipynb on it "
                                   "and export SWEEP_DIR/report.html (no code, images embedded, no network).")
    r.add_argument("sweep_dir", help="a folder written by `ryzlab sweep`, e.g. results/demo")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--kernel", default="ryzlab", help="Jupyter kernel (default ryzlab)")
    r.set_defaults(fn=_cmd_report)

    c = sub.add_parser("compare", help="B vs A per metric with bootstrap intervals; flags changes beyond noise",
                       description="Match the points of two sweeps by parameters; per metric with per-step samples, "
                                   "median(B)/median(A) with a bootstrap confidence interval. A change is flagged when "
                                   "the whole interval lies beyond --min-change.")
    c.add_argument("a", help="baseline sweep folder, e.g. results/A")
    c.add_argument("b", help="sweep folder to judge against it, e.g. results/B")
    c.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged (for CI)")
    c.add_argument("--min-change", type=float, default=0.05,
                   help="smallest relative change worth flagging (default 0.05 = 5%%)")
    c.add_argument("--confidence", type=float, default=0.99, help="confidence of the interval (default 0.99)")
    c.add_argument("--html", help="where to write the HTML table (default B/compare-<A name>.html)")
    c.set_defaults(fn=_cmd_compare)

    i = sub.add_parser("info", help="python/torch versions, devices and their health readings")
    i.set_defaults(fn=_cmd_info)

    from ryzlab.serve.cli import add_parser as add_serve_parser
    from ryzlab.loadgen.cli import add_parser as add_loadgen_parser

    add_serve_parser(sub)
    add_loadgen_parser(sub)
    from ryzlab.projection.cli import add_parser as add_projection_parsers

    add_projection_parsers(sub)
    _add_generate_parser(sub)
    _add_kv_plan_parser(sub)
    _add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ConfigError, ValueError) as e:  # bad input: one clear message, no traceback
        print(f"ryzlab {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a port in use...: the OS's words, no traceback
        print(f"ryzlab {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished points are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
