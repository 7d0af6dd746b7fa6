"""``ryzlab loadgen``: benchmark any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, ryzlab).

    ryzlab loadgen --url http://127.0.0.1:8000/v1 --model NAME --rate 4 --num-requests 64 \\
        --prompt-len 256 --output-len 64 --slo ttft:1000,tpot:50 --out results/lg

Every flag is checked before the first request. The endpoint is probed first (tokens per
prompt word, stream usage, accepted length controls: see
:func:`ryzlab.loadgen.client.probe_endpoint`), then the load runs and ``--out DIR`` gets
``requests.parquet`` (one row per request), ``metrics.parquet`` (the serving experiment's tidy
rows: summary + timeline), ``slo.parquet`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

from ryzlab.loadgen.load import ARRIVALS, LENGTH_DISTS

__all__ = ["add_parser", "cmd_loadgen"]

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``loadgen`` subcommand to ``ryzlab``'s subparsers."""
    from ryzlab.loadgen.client import APIS

    g = subparsers.add_parser(
        "loadgen", help="benchmark any OpenAI-compatible endpoint: TTFT/TPOT/ITL/E2EL, throughput, goodput",
        description="Offer an open-loop (Poisson/gamma), closed-loop (concurrency) or trace-replay load to an "
                    "OpenAI-compatible /v1 endpoint with text prompts of target token lengths; TTFT from the first "
                    "streamed token, TPOT from the server's token counts (usage).")
    g.add_argument("--url", required=True, help="base URL of the API, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", default=None, help="model name at the endpoint (default: the first of GET /models)")
    g.add_argument("--api", default="completions", choices=APIS, help="/completions or /chat/completions")
    g.add_argument("--arrival", default="poisson", choices=ARRIVALS, help="arrival process (default poisson)")
    g.add_argument("--rate", type=float, default=4.0, help="requests/s for poisson and gamma (default 4)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: < 1 burstier (default 1)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight for closed (default 4)")
    g.add_argument("--num-requests", type=int, default=64, help="requests to send (default 64)")
    g.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (default 128)")
    g.add_argument("--prompt-dist", default="fixed", choices=LENGTH_DISTS, help="prompt length distribution")
    g.add_argument("--output-len", type=int, default=64, help="mean output tokens, max_tokens (default 64)")
    g.add_argument("--output-dist", default="fixed", choices=LENGTH_DISTS, help="output length distribution")
    g.add_argument("--shared-prefix-len", type=int, default=0, help="tokens every prompt shares (default 0)")
    g.add_argument("--trace", default=None, help="JSONL trace (arrival_s, prompt_len, output_len per line) "
                                                 "for --arrival trace")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompt words (default 0)")
    g.add_argument("--slo", default="ttft:1000,tpot:50", help="SLOs in ms, KEY:MS with KEY of ttft, tpot, itl, "
                                                              "e2el (default ttft:1000,tpot:50)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds the whole run may take (default 600)")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    g.add_argument("--api-key", default=None, help="Bearer token (default: $OPENAI_API_KEY if set)")
    g.add_argument("--out", default=None, help="directory for requests.parquet, metrics.parquet, slo.parquet, "
                                               "summary.json")
    g.set_defaults(fn=cmd_loadgen)
    return g


def check_url(url: str) -> str:
    """The URL without a trailing slash; ValueError unless it is http(s)://host[:port]/..."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--url {url!r}: expected http(s)://HOST:PORT/v1 (an OpenAI-compatible base URL)")
    return url.rstrip("/")


def _plain(v: Any) -> Any:
    """numpy scalar -> Python; NaN/inf -> None (strict JSON)."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """The command's flags as data for ``summary.json``: no handler function, no API key."""
    return {k: v for k, v in vars(args).items() if not callable(v)} | {"api_key": None}


def counted(client: Any, done: Callable[[], None]) -> Any:
    """``client`` that calls ``done()`` when each request ends (answered, failed or cancelled): progress."""
    async def stream(req: Any) -> AsyncIterator[Any]:
        try:
            async for item in client(req):
                yield item
        finally:
            done()

    return stream


def cmd_loadgen(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ryzlab.io import write_json, write_parquet
    from ryzlab.loadgen.client import openai_client, probe_endpoint, served_models
    from ryzlab.loadgen.load import LoadSpec, make_requests, run_load, run_sync
    from ryzlab.loadgen.metrics import parse_slo, slo_table

    # every check before the first request
    url = check_url(args.url)
    slo = parse_slo(args.slo)
    spec = LoadSpec(arrival=args.arrival, rate=args.rate, burstiness=args.burstiness, concurrency=args.concurrency,
                    num_requests=args.num_requests, prompt_len=args.prompt_len, prompt_dist=args.prompt_dist,
                    output_len=args.output_len, output_dist=args.output_dist,
                    shared_prefix_len=args.shared_prefix_len, trace=args.trace, seed=args.seed,
                    vocab_size=1 << 16)
    requests = make_requests(spec)  # a bad trace fails here
    if not args.timeout > 0 or not args.request_timeout > 0:
        raise ValueError(f"--timeout and --request-timeout must be > 0, got {args.timeout}, {args.request_timeout}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    key = args.api_key or os.environ.get("OPENAI_API_KEY")

    model = args.model or served_models(url, api_key=key)[0]
    profile = probe_endpoint(url, model, api=args.api, timeout_s=args.request_timeout, api_key=key)
    print(f"endpoint {url} model={model} api={args.api}: {profile.tokens_per_word:.2f} tokens/word "
          f"({profile.prompt_overhead_tokens:+.0f} per prompt; {profile.prompt_count}), stream usage: {profile.stream_usage}, "
          f"length controls: {', '.join(profile.length_fields) or 'none'} "
          f"({'exact' if profile.length_controlled else 'NOT exact: see output_len_match_frac'})")
    client = openai_client(profile, timeout_s=args.request_timeout, api_key=key)
    with tqdm(total=len(requests), desc="loadgen", unit="req", leave=False) as bar:
        result = run_sync(lambda: run_load(spec, counted(client, lambda: bar.update(1)), requests=requests,
                                           timeout_s=args.timeout))
    result.extra.update(profile.as_dict())
    tidy = result.tidy(slo, engine=f"endpoint:{model}", device="remote", via="http")
    summary = {k: _plain(v) for k, v in tidy[tidy["kind"] == "summary"].iloc[0].to_dict().items()}
    table = slo_table({k: math.nan if v is None else v for k, v in summary.items()}, slo)

    def f(k: str) -> str:
        v = summary.get(k)
        return "n/a" if v is None else f"{v:.1f}"

    print(f"requests {summary['requests']:.0f}: completed {summary['requests_completed']:.0f}, failed "
          f"{summary['requests_failed']:.0f}; {summary['request_throughput']:.2f} req/s, "
          f"{summary['output_token_throughput']:.1f} output tok/s (achieved send rate "
          f"{summary['achieved_rate']:.2f}/s)")
    for m in ("ttft", "tpot", "itl", "e2el"):
        print(f"  {m:5s} ms  p50 {f(m + '_ms_p50'):>8s}  p90 {f(m + '_ms_p90'):>8s}  p99 {f(m + '_ms_p99'):>8s}")
    itl = summary["itl_measurable_frac"]
    if itl is None or itl < 1.0:
        print(f"  ITL measurable for {itl or 0:.0%} of requests: the server sends several tokens per chunk "
              f"(TPOT uses its token counts and stays valid)")
    print(f"  output tokens counted by: {summary['count_source']}; requests with exactly max_tokens: "
          f"{summary['output_len_match_frac'] or 0:.0%}")
    print(table.to_string(index=False))
    if out is not None:
        write_parquet(out / "requests.parquet", result.frame())
        write_parquet(out / "metrics.parquet", tidy)
        write_parquet(out / "slo.parquet", table)
        write_json(out / "summary.json", {"summary": summary, "spec": flags(args)})
        print(f"results: {out}")
    return 0 if summary["requests_failed"] == 0 else 1
