"""The load generator against a scripted OpenAI-compatible server with known delays and chunking.

The fake server (allowed here: it lives in tests/) sends token i of a stream at *absolute*
time start + ttft + i * tpot (sleeping to deadlines, so scheduling noise never accumulates),
in chunks of ``chunk`` tokens, and counts prompt tokens as ``overhead + tokens_per_word *
words``. Delays are large (1 s, 250 ms) against the noise of a loaded 2-core machine.

On a loaded machine the server itself can send late; so the tests compare the load generator
with what the server *did* (it records, on the same monotonic clock, when each request arrived
and each chunk left) by order only (the client's TTFT is never below the server's), and check
that nothing came earlier than scripted. How close the figures come is not asserted here.
"""
import asyncio
import json
import logging
import statistics
import time

import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from ryzlab.loadgen.client import openai_client, probe_endpoint, prompt_text  # noqa: E402
from ryzlab.serve.local import serve_in_thread  # noqa: E402
from ryzlab.loadgen.load import LoadSpec, run_load, run_sync  # noqa: E402
from ryzlab.loadgen.metrics import REQUEST_COLUMNS  # noqa: E402


def fake_app(*, ttft_s: float, tpot_s: float, chunk: int = 1, usage: bool = True, token_ids: bool = False,
             reject: tuple[str, ...] = (), tokens_per_word: int = 2, overhead: int = 1) -> tuple[FastAPI, list]:
    app = FastAPI()
    bodies: list[dict] = []
    app.state.streams = []  # per streamed request: {"recv": t, "sent": [t per chunk]} (time.monotonic)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "tests"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await completions(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, chat: bool = False):
        recv = time.monotonic()
        body = await request.json()
        bodies.append(body)
        if chat:  # a template around the message costs 5 tokens; the stream opens with a role-only delta
            body["prompt"] = body["messages"][0]["content"]
        bad = [k for k in reject if k in body]
        if bad:
            return JSONResponse({"error": {"message": f"unknown field(s) {bad}", "type": "invalid_request_error",
                                           "param": bad[0], "code": None}}, status_code=400)
        n_prompt = overhead + 5 * chat + tokens_per_word * len(body["prompt"].split())
        n = body["max_tokens"]
        use = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        if not body.get("stream"):
            choice = {"message": {"role": "assistant", "content": "t" * n}} if chat else {"text": "t" * n}
            return {"choices": [{"index": 0, **choice, "finish_reason": "length"}], **({"usage": use} if usage else {})}

        async def sse():
            loop = asyncio.get_running_loop()
            start = loop.time()
            record = {"recv": recv, "sent": []}
            app.state.streams.append(record)
            if chat:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            for first in range(0, n, chunk):
                last = min(n, first + chunk) - 1
                await asyncio.sleep(max(0.0, start + ttft_s + last * tpot_s - loop.time()))
                piece = "t " * (last - first + 1)
                choice = {"index": 0, **({"delta": {"content": piece}} if chat else {"text": piece}),
                          "finish_reason": None}
                if token_ids:
                    choice["token_ids"] = list(range(first, last + 1))
                record["sent"].append(time.monotonic())
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if usage and (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'choices': [], 'usage': use})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app, bodies


def _run(url: str, spec: LoadSpec):
    profile = probe_endpoint(url, "fake")
    return profile, asyncio.run(run_load(spec, openai_client(profile), timeout_s=120))


SPEC = LoadSpec(arrival="closed", concurrency=4, num_requests=8, prompt_len=21, output_len=6, seed=0)


def test_ttft_and_tpot_are_measured_against_what_the_server_did():
    app, bodies = fake_app(ttft_s=1.0, tpot_s=0.25)
    with serve_in_thread(app) as root:
        profile, res = _run(root + "/v1", SPEC)
    s = res.summary()
    assert s["requests_completed"] == 8
    # what the server did, request by request (its own clock = ours): arrival -> first chunk, chunk gaps
    load = [r for r in app.state.streams if len(r["sent"]) == 6]
    assert len(load) == 8
    true_ttft = statistics.median((r["sent"][0] - r["recv"]) * 1000 for r in load)
    true_tpot = statistics.median((r["sent"][-1] - r["sent"][0]) / 5 * 1000 for r in load)
    # decided by order, not by a tolerance (issue 24: +-5% failed on a loaded machine): each request
    # was scheduled before the server received it and its first chunk read after the server sent it,
    # so the client's TTFT is never below the server's; how close it comes is a figure for a benchmark
    assert s["ttft_ms_p50"] >= true_ttft and s["itl_measurable_frac"] == 1.0
    assert s["tpot_ms_p50"] > 0 and s["itl_ms_p50"] > 0 and true_tpot > 0
    # and the server never ran early: the scripted delays are floors of what was measured
    assert true_ttft >= 1000.0 * 0.99 and s["ttft_ms_p50"] >= 1000.0 * 0.99
    assert min(r.tpot_s for r in res.records) * 1000 >= 250.0 * 0.8  # deadlines: a late first chunk shortens one
    assert s["count_source"] == "usage" and s["output_len_match_frac"] == 1.0
    # prompt sizing from usage: 2 tokens/word + 1 -> 10 words make the 21 tokens asked for
    assert profile.tokens_per_word == 2.0 and profile.prompt_overhead_tokens == 1.0
    assert profile.stream_usage and profile.length_fields == ("ignore_eos", "min_tokens")
    assert [r.prompt_tokens for r in res.records] == [21] * 8
    streamed = [b for b in bodies if b.get("stream") and b["max_tokens"] == 6]
    assert len(streamed) == 8 and all(b["ignore_eos"] is True and b["min_tokens"] == 6 for b in streamed)
    assert all(b["stream_options"] == {"include_usage": True} for b in streamed)


def test_chunked_stream_counts_tokens_from_usage_and_says_itl_is_unmeasurable():
    app, _ = fake_app(ttft_s=1.0, tpot_s=0.25, chunk=3)
    with serve_in_thread(app) as root:
        _, res = _run(root + "/v1", SPEC)
    s = res.summary()
    df = res.frame()
    assert list(df["output_tokens"]) == [6] * 8 and list(df["chunks"]) == [2] * 8
    assert not df["itl_measurable"].any() and s["itl_measurable_frac"] == 0.0
    assert pd.isna(s["itl_ms_p50"])
    # first chunk at ttft + 2 tpot (scripted 1500 ms), last at ttft + 5 tpot: TPOT over the usage
    # count = 3 * 250 / 5 = 150 ms scripted; compared with what the server did (see the module doc)
    load = [r for r in app.state.streams if len(r["sent"]) == 2]
    true_ttft = statistics.median((r["sent"][0] - r["recv"]) * 1000 for r in load)
    true_tpot = statistics.median((r["sent"][-1] - r["sent"][0]) / 5 * 1000 for r in load)
    assert len(load) == 8 and true_ttft >= 1500 * 0.99
    assert s["ttft_ms_p50"] >= true_ttft  # by order (see the first test), not a tolerance
    assert s["tpot_ms_p50"] > 0 and true_tpot > 0


def test_no_usage_falls_back_to_chunks_and_says_so(caplog):
    app, _ = fake_app(ttft_s=0.05, tpot_s=0.02, usage=False)
    with caplog.at_level(logging.WARNING, logger="ryzlab.loadgen.client"), serve_in_thread(app) as root:
        profile, res = _run(root + "/v1", SPEC)
    assert profile.prompt_count == "assumed" and not profile.stream_usage
    df = res.frame()
    assert set(df["count_source"]) == {"chunks"} and list(df["output_tokens"]) == [6] * 8
    assert list(df["prompt_tokens"]) == [21] * 8  # the target: the server never said
    assert "one per chunk" in caplog.text and "no usage" in caplog.text


def test_token_ids_in_chunks_are_exact_counts():
    app, _ = fake_app(ttft_s=0.05, tpot_s=0.02, chunk=2, usage=False, token_ids=True)
    with serve_in_thread(app) as root:
        _, res = _run(root + "/v1", SPEC)
    df = res.frame()
    assert set(df["count_source"]) == {"token_ids"} and list(df["output_tokens"]) == [6] * 8
    assert list(df["chunks"]) == [3] * 8 and not df["itl_measurable"].any()


@pytest.mark.parametrize("reject,kept", [(("min_tokens",), ("ignore_eos",)), (("ignore_eos",), ("min_tokens",)),
                                         (("ignore_eos", "min_tokens"), ())])
def test_refused_length_controls_are_dropped_and_recorded(reject, kept):
    app, bodies = fake_app(ttft_s=0.01, tpot_s=0.01, reject=reject)
    with serve_in_thread(app) as root:
        profile, res = _run(root + "/v1", SPEC)
    assert profile.length_fields == kept and profile.length_controlled
    load = [b for b in bodies if b.get("stream") and b["max_tokens"] == 6]
    assert len(load) == 8 and all(set(b) & {"ignore_eos", "min_tokens"} == set(kept) for b in load)
    assert res.summary()["requests_completed"] == 8


def test_chat_api_counts_content_deltas_and_fits_the_template_overhead():
    app, bodies = fake_app(ttft_s=1.0, tpot_s=0.1)
    with serve_in_thread(app) as root:
        profile = probe_endpoint(root + "/v1", "fake", api="chat")
        res = asyncio.run(run_load(SPEC, openai_client(profile), timeout_s=120))
    assert profile.prompt_overhead_tokens == 6.0 and profile.tokens_per_word == 2.0
    df = res.frame()
    # 21 tokens at 6 + 2 per word is 7.5 words: the nearest reachable size is 22 (8 words), as the server says
    assert df["ok"].all() and (df["prompt_tokens"] == 22).all() and (df["chunks"] == 6).all()
    # the role-only delta (sent at once) is no token: TTFT is the first content chunk's
    true_ttft = statistics.median((r["sent"][0] - r["recv"]) * 1000 for r in app.state.streams if len(r["sent"]) == 6)
    assert res.summary()["ttft_ms_p50"] >= true_ttft and true_ttft >= 1000 * 0.99  # by order, not a tolerance
    assert all("messages" in b and "prompt" in b for b in bodies)  # (the fake copies the message to prompt)


def test_prompt_text_shares_prefix_words():
    class P:
        tokens_per_word, prompt_overhead_tokens = 2.0, 1.0
    a = prompt_text((5, 6, 7, 8, 9, 10, 11), 7, P)
    b = prompt_text((5, 6, 7, 1, 2, 3, 4), 7, P)
    assert len(a.split()) == 3 and a.split()[:3] == b.split()[:3]


def test_loadgen_cli_writes_requests_parquet_and_tidy_metrics(tmp_path):
    from ryzlab.cli import main

    app, _ = fake_app(ttft_s=0.02, tpot_s=0.01)
    out = tmp_path / "lg"
    with serve_in_thread(app) as root:
        rc = main(["loadgen", "--url", root + "/v1", "--model", "fake", "--arrival", "poisson", "--rate", "20",
                   "--num-requests", "6", "--prompt-len", "9", "--output-len", "4", "--slo", "ttft:5000,tpot:1000",
                   "--out", str(out)])
    assert rc == 0
    req = pd.read_parquet(out / "requests.parquet")
    assert tuple(req.columns) == REQUEST_COLUMNS and len(req) == 6
    assert req["ok"].dtype == bool and req["ttft_ms"].dtype == "float64" and req["output_tokens"].dtype == "int64"
    assert req["ok"].all() and (req["output_tokens"] == 4).all() and (req["prompt_tokens"] == 9).all()
    assert (req["ttft_ms"] >= 20).all() and (req["e2el_ms"] >= req["ttft_ms"]).all()
    tidy = pd.read_parquet(out / "metrics.parquet")
    summ = tidy[tidy["kind"] == "summary"]
    assert len(summ) == 1 and (tidy["kind"] == "timeline").sum() >= 1
    assert summ["requests_completed"].iloc[0] == 6 and summ["engine"].iloc[0] == "endpoint:fake"
    slo = pd.read_parquet(out / "slo.parquet")
    assert list(slo["metric"]) == ["ttft_ms", "tpot_ms"] and slo["p99_met"].all()
    data = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["summary"]["requests"] == 6 and data["summary"]["tokens_per_word"] == 2.0
    # the flags as data: no "<function cmd_loadgen ...>" (issue 23), no API key
    assert "fn" not in data["spec"] and data["spec"]["rate"] == 20 and data["spec"]["api_key"] is None
    assert "<function" not in (out / "summary.json").read_text()


def test_progress_counts_every_request_answered_failed_or_cancelled():
    from ryzlab.loadgen.cli import counted

    async def client(req):
        if req == "fail":
            raise RuntimeError("boom")
        for i in range(3):
            yield 1
            if req == "slow":
                await asyncio.sleep(10)

    done = []
    wrapped = counted(client, lambda: done.append(1))

    async def drain(req):
        try:
            return [x async for x in wrapped(req)]
        except RuntimeError:
            return "failed"

    async def main():
        slow = asyncio.create_task(drain("slow"))
        got = [await drain("ok"), await drain("fail")]
        await asyncio.sleep(0.05)
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        return got

    assert asyncio.run(main()) == [[1, 1, 1], "failed"] and len(done) == 3


def test_probe_and_ryzlab_serve_agree_on_length_controls(caplog):
    """The probe reported min_tokens accepted while `ryzlab serve` logged 'ignoring unknown field(s)
    ['min_tokens']' on every request (issue 23). The server now honours it, so both say the same."""
    import httpx

    from serving import serve_app

    with caplog.at_level(logging.WARNING, logger="ryzlab.serve.protocol"), serve_app() as (url, _, _):
        profile = probe_endpoint(url + "/v1", "ryzlab-random")
        client = openai_client(profile, timeout_s=60)
        load = run_sync(lambda: run_load(LoadSpec(arrival="closed", concurrency=2, num_requests=3, prompt_len=6,
                                                  output_len=5, vocab_size=256), client))
        body = {"model": "ryzlab-random", "prompt": "def f(", "max_tokens": 5}
        exact = httpx.post(url + "/v1/completions", json={**body, "min_tokens": 5}, timeout=60)
        between = httpx.post(url + "/v1/completions", json={**body, "min_tokens": 2}, timeout=60)
    assert profile.length_fields == ("ignore_eos", "min_tokens") and profile.length_controlled
    frame = load.frame()
    assert frame["ok"].all() and (frame["output_tokens"] == 5).all(), frame
    assert exact.status_code == 200 and exact.json()["usage"]["completion_tokens"] == 5
    assert between.status_code == 400 and between.json()["error"]["param"] == "min_tokens"
    assert "unknown field" not in caplog.text, caplog.text


@pytest.mark.parametrize("flags,needle", [
    (["--arrival", "uniform"], "poisson"),
    (["--prompt-dist", "zipf"], "lognormal"),
    (["--api", "embeddings"], "chat"),
    (["--slo", "latency:3"], "ttft, tpot, itl, e2el"),
    (["--rate", "0"], "rate must be > 0"),
    (["--arrival", "trace"], "trace=<path"),
])
def test_bad_flags_fail_before_any_request_naming_the_choices(flags, needle, capsys):
    from ryzlab.cli import main

    app, bodies = fake_app(ttft_s=0.01, tpot_s=0.01)
    with serve_in_thread(app) as root:
        try:
            rc = main(["loadgen", "--url", root + "/v1", "--model", "fake", *flags])
        except SystemExit as e:  # argparse choices
            rc = e.code
    assert rc == 2 and needle in capsys.readouterr().err
    assert bodies == []


def test_bad_url_is_rejected_with_the_expected_form(capsys):
    from ryzlab.cli import main

    assert main(["loadgen", "--url", "ftp://127.0.0.1/v1"]) == 2
    assert "http(s)://HOST:PORT/v1" in capsys.readouterr().err


def test_serving_experiment_measures_an_endpoint():
    from ryzlab.experiments.serving import Config, run

    app, bodies = fake_app(ttft_s=0.02, tpot_s=0.01)
    with serve_in_thread(app) as root:
        df = run(Config(endpoint=root + "/v1", rate=20.0, num_requests=5, prompt_len=9, output_len=3,
                        slo="ttft:5000,tpot:1000"))
    s = df[df["kind"] == "summary"].iloc[0]
    assert s["engine"] == "endpoint:fake" and s["via"] == "http" and s["device"] == "remote"
    assert s["requests_completed"] == 5 and s["output_tokens"] == 15 and s["tokens_per_word"] == 2.0
    assert (df["kind"] == "timeline").any()
    assert len([b for b in bodies if b.get("stream") and b["max_tokens"] == 3]) == 5


@pytest.mark.parametrize("kw,needle", [
    (dict(endpoint="http://127.0.0.1:9/v1", workers=2), "workers=2"),
    (dict(endpoint="http://127.0.0.1:9/v1", engine="transformers"), "nothing is started"),
    (dict(engine="transformers", codec="int8"), "codec='int8'"),
    (dict(engine="vllm"), "transformers"),
    (dict(endpoint="localhost:8000"), "http(s)://HOST:PORT/v1"),
    (dict(api="embeddings"), "chat"),
])
def test_serving_experiment_rejects_what_an_endpoint_cannot_do(kw, needle):
    from ryzlab.experiments.serving import Config

    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Config(**kw)


def test_report_puts_engines_side_by_side_with_ratios():
    from ryzlab.plots.serving import engines_side_by_side, slo_table

    def row(engine, rate, tpot, ttft, tput):
        return {"kind": "summary", "device": "cpu", "engine": engine, "workers": 1, "policy": "-", "codec": "none",
                "rate": rate, "tpot_ms_p99": tpot, "ttft_ms_p99": ttft, "output_token_throughput": tput,
                "request_throughput": tput / 10, "requests_failed": 0}

    df = pd.DataFrame([row("ryzlab", 4, 20, 100, 120), row("ryzlab", 8, 40, 300, 240), row("ryzlab", 16, 90, 900, 300),
                       row("transformers", 4, 30, 200, 110), row("transformers", 8, 45, 1500, 200)])
    side = engines_side_by_side(df).set_index("engine")
    assert side.loc["ryzlab", "max_rate_under_slo"] == 8 and side.loc["transformers", "max_rate_under_slo"] == 4
    assert side.loc["transformers", "max_rate_under_slo_vs_ryzlab"] == 0.5
    assert side.loc["transformers", "output_token_throughput_there_vs_ryzlab"] == pytest.approx(110 / 240)
    assert engines_side_by_side(df[df.engine == "ryzlab"]).empty
    t = slo_table(df)  # scaling baselines do not mix engines
    assert set(t["engine"]) == {"ryzlab", "transformers"} and (t["scaling_vs_1_worker"] == 1.0).all()


def test_engines_are_compared_only_as_they_were_measured_alike():
    """ryzlab driven in-process is never set against the peer measured over HTTP; its own
    one-thread server over HTTP is (constructed rows)."""
    from ryzlab.plots.serving import engines_side_by_side

    def row(engine, via, rate, tput):
        return {"kind": "summary", "device": "cpu", "engine": engine, "via": via, "workers": 1, "policy": "-",
                "codec": "none", "rate": rate, "tpot_ms_p99": 10, "ttft_ms_p99": 100,
                "output_token_throughput": tput, "request_throughput": tput / 10, "requests_failed": 0}

    mixed = pd.DataFrame([row("ryzlab", "in-process", 8, 400), row("transformers", "http", 8, 200)])
    assert engines_side_by_side(mixed).empty  # in-process vs HTTP: not compared
    alike = pd.concat([mixed, pd.DataFrame([row("ryzlab", "http", 8, 250)])])
    side = engines_side_by_side(alike).set_index("engine")
    assert side.loc["ryzlab", "output_token_throughput_there"] == 250  # the HTTP point, not the in-process one
    assert side.loc["transformers", "output_token_throughput_there_vs_ryzlab"] == pytest.approx(200 / 250)


def test_via_names_how_the_engine_is_driven():
    from ryzlab.experiments.serving import Config

    assert not Config().over_http and Config(via="http").over_http and Config(engine="transformers").over_http
    with pytest.raises(ValueError, match="via='in-process' drives ryzlab's own engine only"):
        Config(engine="transformers", via="in-process")
    with pytest.raises(ValueError, match="via='http'.*workers=2"):
        Config(via="http", workers=2)
    with pytest.raises(ValueError, match="via"):
        Config(via="grpc")
