"""How close the load generator's TTFT and TPOT come to what a server did (issue 24: the figure
that tests/test_serve_loadgen_http.py asserted within +-5% moved here; the tests now decide by
order only).

    .venv/bin/python benchmarks/loadgen_accuracy.py [--repeats 3] [--ttft 1.0] [--tpot 0.25]

A scripted OpenAI-compatible server sends token i of each stream at start + ttft + i * tpot and
records, on the same monotonic clock, when each request arrived and each chunk left. Each
repeat runs the closed-loop load of the test (4 users, 8 requests, 6 tokens) and prints the
load generator's p50 over the server's median, for TTFT and TPOT; then the median, lowest and
highest ratio over the repeats. 1.00 is exact; above 1, the client saw it later than the server
sent it (client-side scheduling on a loaded machine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from ryzlab.loadgen.client import openai_client, probe_endpoint  # noqa: E402
from ryzlab.loadgen.load import LoadSpec, run_load  # noqa: E402
from ryzlab.serve.local import serve_in_thread  # noqa: E402

SPEC = LoadSpec(arrival="closed", concurrency=4, num_requests=8, prompt_len=21, output_len=6, seed=0)


def scripted_app(ttft_s: float, tpot_s: float) -> FastAPI:
    app = FastAPI()
    app.state.streams = []

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "bench"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202 - a FastAPI route
        recv = time.monotonic()
        body = await request.json()
        n, n_prompt = body["max_tokens"], 1 + 2 * len(body["prompt"].split())
        use = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        if not body.get("stream"):
            return {"choices": [{"index": 0, "text": "t" * n, "finish_reason": "length"}], "usage": use}

        async def sse():  # noqa: ANN202
            loop = asyncio.get_running_loop()
            start, record = loop.time(), {"recv": recv, "sent": []}
            app.state.streams.append(record)
            for i in range(n):
                await asyncio.sleep(max(0.0, start + ttft_s + i * tpot_s - loop.time()))
                record["sent"].append(time.monotonic())
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 't ', 'finish_reason': None}]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'choices': [], 'usage': use})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def one_run(ttft_s: float, tpot_s: float) -> tuple[float, float]:
    app = scripted_app(ttft_s, tpot_s)
    with serve_in_thread(app) as root:
        profile = probe_endpoint(root + "/v1", "fake")
        res = asyncio.run(run_load(SPEC, openai_client(profile), timeout_s=120))
    s = res.summary()
    load = [r for r in app.state.streams if len(r["sent"]) == SPEC.output_len]
    true_ttft = statistics.median((r["sent"][0] - r["recv"]) * 1000 for r in load)
    true_tpot = statistics.median((r["sent"][-1] - r["sent"][0]) / (SPEC.output_len - 1) * 1000 for r in load)
    return s["ttft_ms_p50"] / true_ttft, s["tpot_ms_p50"] / true_tpot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft", type=float, default=1.0, help="scripted time to first token, s (default 1.0)")
    ap.add_argument("--tpot", type=float, default=0.25, help="scripted time per output token, s (default 0.25)")
    a = ap.parse_args()
    if a.repeats < 1 or a.ttft <= 0 or a.tpot <= 0:
        ap.error("--repeats must be >= 1 and --ttft, --tpot > 0")
    rows = []
    for i in range(a.repeats):
        rows.append(one_run(a.ttft, a.tpot))
        print(f"repeat {i}: TTFT client/server {rows[-1][0]:.3f}   TPOT client/server {rows[-1][1]:.3f}")
    for j, name in enumerate(("TTFT", "TPOT")):
        vals = [r[j] for r in rows]
        print(f"{name} client/server over {len(vals)} repeats: median {statistics.median(vals):.3f}, "
              f"lowest {min(vals):.3f}, highest {max(vals):.3f}")


if __name__ == "__main__":
    main()
