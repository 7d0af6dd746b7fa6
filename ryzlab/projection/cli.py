"""``ryzlab project`` and ``ryzlab plan``: projections of ryzlab's graph to named hardware.

Building the parsers imports no torch (device names come from the YAML catalog). Every input is
checked before any projection runs: an unknown device or model, a layout that does not fit the
model, a bad number, each refused with the valid choices.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ryzlab.config import CODECS, ConfigError
from ryzlab.projection.formats import WEIGHT_FORMATS
from ryzlab.projection.hardware import OVERRIDABLE

__all__ = ["add_parser", "cmd_project", "cmd_plan"]


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return vals


MAX_TOKENS = 1 << 20
"""Prompt or output tokens one projected request may ask for (a 2**20-token context is beyond every
catalog model; larger values only made the step loop run for minutes)."""


def _finite(text: str, *, zero_ok: bool) -> float:
    """A finite number > 0 (>= 0 with ``zero_ok``): nan / inf / 1e400 / negatives refused by the parser."""
    want = "a finite number >= 0" if zero_ok else "a finite number > 0"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {want}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {want}")
    return v


def _positive(text: str) -> float:
    """A bandwidth, an SLO, a rate."""
    return _finite(text, zero_ok=False)


def _non_negative(text: str) -> float:
    """A host overhead, a KL budget."""
    return _finite(text, zero_ok=True)


def _tokens(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer number of tokens") from None
    if not 1 <= v <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 to {MAX_TOKENS} tokens")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a folder holding a Hugging Face config.json (weights optional), a shipped config "
                        "(llama-2-7b, llama-2-70b, llama-3-8b, llama-3-70b, mistral-7b, qwen2-7b), 'reference' "
                        "or a .gguf file")
    p.add_argument("--prompt-tokens", type=_tokens, default=512, help="prompt tokens per request (default 512)")
    p.add_argument("--output-tokens", type=_tokens, default=128, help="output tokens per request (default 128)")
    p.add_argument("--slo-ttft-ms", type=_positive, default=None, help="time-to-first-token SLO at p99 (ms)")
    p.add_argument("--slo-tpot-ms", type=_positive, default=None, help="time-per-output-token SLO at p99 (ms)")
    p.add_argument("--calibration", default=None, metavar="FILE.json",
                   help="a calibration file (default: the shipped one of each device; see calibrations.yaml)")
    p.add_argument("--host-overhead-ms", type=_non_negative, default=None,
                   help="per-step host time of the engine modelled (default: the calibration's, a captured graph)")
    p.add_argument("--devices-file", default=None, metavar="FILE.yaml",
                   help="extra or replacement devices, same fields as ryzlab/projection/devices.yaml")
    for f in OVERRIDABLE:
        p.add_argument("--" + f.replace("_", "-"), type=_positive, default=None, dest=f,
                       help=f"override the device's {f}" if f != "hbm_gbps" else
                       "override the device's memory bandwidth, GB/s (e.g. --hbm-gbps 1700)")


def add_parser(subparsers: Any) -> None:
    """Add ``project`` and ``plan`` to ``ryzlab``'s subparsers."""
    p = subparsers.add_parser(
        "project", help="project step time, latency, throughput and memory of a model on named GPUs (projected)",
        description="A cost model of ryzlab's own graph on a catalog device, calibrated and labelled "
                    "basis=projected (never a measurement). One row per tp size; --rate / --concurrency run the "
                    "real scheduler on a virtual clock for TTFT / TPOT / E2EL percentiles.")
    _common(p)
    p.add_argument("--device", required=True, help="catalog device (h100-sxm, h100-pcie, h200, a100-40gb, "
                                                   "a100-80gb, l40s, l4, mi300x, cpu) or one from --devices-file")
    p.add_argument("--tp", type=_ints, default=[1], help="tensor-parallel sizes, comma-separated (default 1)")
    p.add_argument("--cp", type=_ints, default=[1], help="context-parallel sizes, comma-separated (default 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--weights", default="bf16", choices=WEIGHT_FORMATS,
                   help="weight format (default bf16); fp8 is projected only (W8A8 on fp8 tensor cores, as "
                        "TensorRT-LLM / vLLM run it; ryzlab's engine does not run fp8 weights)")
    p.add_argument("--int4-group", type=int, default=128, help="int4 columns per scale (default 128)")
    p.add_argument("--codec", default="none", choices=CODECS, help="KV-cache codec (default none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=_positive, default=None, help="Poisson requests/s: serving projection")
    g.add_argument("--concurrency", type=int, default=None, help="requests in flight: serving projection")
    p.add_argument("--num-requests", type=int, default=200, help="requests in a serving projection (default 200)")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration, one per line")
    p.set_defaults(fn=cmd_project)

    q = subparsers.add_parser(
        "plan", help="rank GPU types, counts and tp x cp x replicas / weights / codec meeting an SLO at a rate",
        description="For each device, weight format, codec and layout, the serving projection's highest rate "
                    "meeting the SLO at p99 sets the replicas needed; configurations are ranked by devices "
                    "(then by cost with --prices). Every row is projected.")
    _common(q)
    q.add_argument("--rate", type=_positive, required=True, help="requests/s the deployment must serve")
    q.add_argument("--devices", required=True, help="comma-separated catalog devices, e.g. h100-sxm,a100-80gb,l4")
    q.add_argument("--max-devices", type=int, default=None, help="drop configurations needing more devices")
    q.add_argument("--weights", default="bf16,int8,int4",
                   help=f"weight formats to try, from {','.join(WEIGHT_FORMATS)} (default bf16,int8,int4; "
                        "fp8 only on devices with fp8 tensor cores)")
    q.add_argument("--codecs", default="none,fp8_e4m3,int8,int4",
                   help="KV codecs to try (default none,fp8_e4m3,int8,int4; --max-kl filters them)")
    q.add_argument("--cp", type=_ints, default=[1], help="context-parallel sizes to try (default 1)")
    q.add_argument("--max-kl", type=_non_negative, default=None,
                   help="keep only codecs whose KL per token was MEASURED <= this on the model: read from "
                        "--kl-results, else measured now on --kl-model / --model (which then needs weights)")
    q.add_argument("--kl-results", default=None, metavar="DIR",
                   help="a results folder with kv_compression runs of the model (e.g. results/demo)")
    q.add_argument("--kl-model", default=None,
                   help="the model whose KV accuracy counts: its name in --kl-results, or the weights to "
                        "measure on (default: --model as given; a config-only model needs one of the two)")
    q.add_argument("--prices", default=None, help="device:$/hour pairs, e.g. h100-sxm:2.5,l4:0.4")
    q.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    q.add_argument("--json", action="store_true", help="one JSON object per configuration, one per line")
    q.set_defaults(fn=cmd_plan, slo_required=True)


def _overrides(args: argparse.Namespace) -> dict[str, float | None]:
    return {f: getattr(args, f) for f in OVERRIDABLE}


def _calibrations(args: argparse.Namespace, keys: list[str]) -> dict[str, Any]:
    from ryzlab.projection.calibration import default_calibration, load_calibration

    if args.calibration:
        cal = load_calibration(args.calibration)
        return {k: cal for k in keys}
    return {k: default_calibration(k) for k in keys}


def _print_table(rows: list[dict[str, Any]], cols: list[str], title: str) -> None:
    print(title)
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def cmd_project(args: argparse.Namespace) -> int:
    from ryzlab.projection.cost import Deployment, weights_problem
    from ryzlab.projection.hardware import get_device
    from ryzlab.projection.project import Workload, check_layouts, project_row
    from ryzlab.projection.shapes import load_shape

    # everything is checked before any projection runs
    wl = Workload(batch=args.batch, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                  rate=args.rate, concurrency=args.concurrency, slo_ttft_ms=args.slo_ttft_ms,
                  slo_tpot_ms=args.slo_tpot_ms, num_requests=args.num_requests)
    dev = get_device(args.device, _overrides(args), args.devices_file)
    if problem := weights_problem(dev, args.weights):
        raise ConfigError([problem], where="ryzlab project")
    model, label = load_shape(args.model)
    check_layouts(model, args.tp, args.cp)
    deps = [Deployment(tp=tp, cp=cp, weights=args.weights, codec=args.codec, int4_group=args.int4_group)
            for cp in args.cp for tp in args.tp]
    cal = _calibrations(args, [dev.key])[dev.key]
    rows = [project_row(model, label, dev, cal, d, wl, host_overhead_ms=args.host_overhead_ms) for d in deps]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    cols = ["tp", "cp", "batch", "weights", "codec", "step_ms", "decode_tokens_per_s", "throughput_tokens_per_s",
            "ttft_ms", "tpot_ms", "memory_gb_per_device", "kv_capacity_tokens", "max_batch", "fits"]
    extra = [c for c in ("ttft_ms_p99", "tpot_ms_p99", "e2el_ms_p99", "slo_met", "max_rate_under_slo_rps")
             if any(c in r for r in rows)]
    _print_table(rows, cols + extra, f"PROJECTED (not measured): {label} on {dev.spec()}\n"
                                     f"calibration: {cal.name} ({cal.fitted_from or 'defaults'}); "
                                     f"prompt {wl.prompt_tokens} + output {wl.output_tokens} tokens")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ryzlab.projection.cost import weights_problem
    from ryzlab.projection.hardware import get_device
    from ryzlab.projection.planner import kl_model_problem, measure_kl, measured_kl, plan
    from ryzlab.projection.shapes import load_shape

    problems = []
    if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
        problems.append("plan needs both --slo-ttft-ms and --slo-tpot-ms")
    if not args.rate > 0:
        problems.append(f"--rate must be > 0 requests/s, got {args.rate}")
    weights = [w for w in args.weights.split(",") if w]
    codecs = [c for c in args.codecs.split(",") if c]
    problems += [f"weights {w!r} is not valid; choose from {', '.join(WEIGHT_FORMATS)}" for w in weights
                 if w not in WEIGHT_FORMATS]
    problems += [f"codec {c!r} is not valid; choose from {', '.join(CODECS)}" for c in codecs if c not in CODECS]
    if args.max_kl is not None and not args.kl_results:   # measured now, on weights: there must be some
        if why := kl_model_problem(args.kl_model or args.model):
            problems.append(f"--max-kl keeps codecs whose accuracy was measured: {why}")
    prices: dict[str, float] = {}
    for item in (args.prices or "").split(","):
        if item:
            k, _, v = item.partition(":")
            try:
                prices[k] = float(v)
            except ValueError:
                problems.append(f"--prices {item!r}: expected device:dollars_per_hour")
    if problems:
        raise ConfigError(problems, where="ryzlab plan")
    devs = [get_device(d, _overrides(args), args.devices_file) for d in args.devices.split(",") if d]
    # a format no listed device can run is an error; one that some cannot run is skipped there (said so)
    for w in weights:
        why = [p for d in devs if (p := weights_problem(d, w))]
        if len(why) == len(devs):
            raise ConfigError(why, where="ryzlab plan")
        for p in why:
            print(f"plan: skipped: {p}", file=sys.stderr)
    model, label = load_shape(args.model)
    if args.max_kl is not None:
        if args.kl_results:
            kl, how = measured_kl(args.kl_results, args.kl_model or args.model), f"in {args.kl_results}"
        else:
            print(f"--max-kl: measuring the KL of {', '.join(c for c in codecs if c != 'none')} on "
                  f"{args.kl_model or args.model} (held-out text, teacher forcing)...", file=sys.stderr)
            kl, how = measure_kl(args.kl_model or args.model, codecs), f"now on {args.kl_model or args.model}"
        kept = [c for c in codecs if kl.get(c, math.inf) <= args.max_kl]
        print(f"--max-kl {args.max_kl}: KL/token measured {how}: "
              f"{', '.join(f'{k}={v:.3g}' for k, v in sorted(kl.items()))}; kept {kept}", file=sys.stderr)
        codecs = kept
    cals = _calibrations(args, [d.key for d in devs])
    rows = plan(model, label, devs, cals, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                rate=args.rate, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                max_devices=args.max_devices, weights=tuple(weights), codecs=tuple(codecs), cps=tuple(args.cp),
                prices=prices, host_overhead_ms=args.host_overhead_ms, progress=True)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0 if rows else 1
    if not rows:
        print(f"PROJECTED: no configuration meets TTFT p99 <= {args.slo_ttft_ms} ms and TPOT p99 <= "
              f"{args.slo_tpot_ms} ms at {args.rate} req/s")
        return 1
    cols = ["device", "devices", "replicas", "tp", "cp", "weights", "codec", "max_rate_per_replica_rps",
            "ttft_ms_p99", "tpot_ms_p99", "cost_per_hour", "calibration"]
    _print_table(rows[:args.top], cols, f"PROJECTED (not measured) plans for {label}: {args.rate} req/s, TTFT p99 <= "
                                        f"{args.slo_ttft_ms} ms, TPOT p99 <= {args.slo_tpot_ms} ms, prompt "
                                        f"{args.prompt_tokens} + output {args.output_tokens}")
    return 0
