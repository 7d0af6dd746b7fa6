"""``ryzlab``: run sweeps of notebooks, build reports, describe this machine, serve a model."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import CODECS, ConfigError
from .spec import MAX_POINTS

EPILOG = """examples:
  ryzlab info                                  what this machine offers (python, torch, devices, health)
  ryzlab sweep specs/demo.yaml --jobs 2        run every point of a spec (resumes: ok points are skipped)
  ryzlab sweep specs/demo.yaml --dry-run       list the points it would run
  ryzlab sweep specs/demo.yaml --executor ray --address auto   the same points as tasks on a Ray cluster
  ryzlab report results/demo                   aggregate ok runs into results/demo/report.html
  ryzlab generate --prompt "def f(" --tp 2     complete a prompt with the model split over 2 ranks
  ryzlab serve --tp 2 --workers 2              2 replicas of 2 tensor-parallel ranks behind the router
"""


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

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
    from .sweep import default_out, is_done, manifest_status, plan, resolve_threads

    threads = resolve_threads(args.jobs, args.threads)
    spec, points = plan(args.spec, max_points=args.max_points, kernel_name=args.kernel)
    out = Path(args.out) if args.out else default_out(spec)
    latest = manifest_status(out)
    todo = 0
    for p in points:
        done = is_done(out, p.run_id, latest)
        todo += not done
        print(f"{'done' if done else 'todo'}  {p.run_id}  {p.label}")
    print(f"sweep {spec.name}: {len(points)} points, {len(points) - todo} done, {todo} to run -> {out} "
          f"(--jobs {args.jobs}, {threads} torch thread(s) per point; dry run: nothing ran)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    out = build_report(args.sweep_dir, kernel_name=args.kernel)
    print(f"report: {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .provenance import collect_env, nvidia_devices

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
        from .orchestrator.health import describe_health
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
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    g.add_argument("--json", action="store_true", help="print one JSON line with text and token_ids")
    g.set_defaults(fn=cmd_generate)
    return g


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerateRequest, generate

    req = GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens, tp=args.tp, cp=args.cp, codec=args.codec,
                          temperature=args.temperature, seed=args.seed, model=args.model, threads=args.threads,
                          dtype=args.dtype)
    out = generate(req)
    if not out:  # a torchrun rank other than 0
        return 0
    if args.json:
        print(json.dumps({"text": out["text"], "token_ids": out["token_ids"], "request": dataclasses.asdict(req)}))
    else:
        print(out["text"])
    return 0


def version() -> str:
    """The installed distribution's version, or the package's own in a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from . import __version__

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
    r.add_argument("--kernel", default="ryzlab", help="Jupyter kernel (default ryzlab)")
    r.set_defaults(fn=_cmd_report)

    i = sub.add_parser("info", help="python/torch versions, devices and their health readings")
    i.set_defaults(fn=_cmd_info)

    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    _add_generate_parser(sub)
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
