"""HTTP API on a real uvicorn server (127.0.0.1, free port): completions and streaming, bounded
admission (429/503 with Retry-After), per-request timeout, client disconnects (streaming or
not) free the blocks, /health turns 503 when the engine stalls, one failing request fails alone."""
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving import MAX_MODEL_LEN, NUM_BLOCKS, PausedForward, serve_app, wait_for


@pytest.fixture
def served():
    with serve_app() as (url, backend, app):
        yield url, backend, app


def _stream_tokens(url, body):
    ids, done, finish = [], False, None
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                if ev["choices"]:
                    ids += ev["choices"][0]["token_ids"]
                    finish = ev["choices"][0]["finish_reason"] or finish
    return ids, done, finish


def test_completion_and_stream_agree(served):
    url, backend, _ = served
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = body["choices"][0]["token_ids"]
    assert len(ids) == 5 and body["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert body["choices"][0]["text"] == bytes(ids).decode("utf-8", errors="replace")
    assert body["choices"][0]["finish_reason"] == "length"
    streamed, done, finish = _stream_tokens(url, {"prompt": list(b"def f(x):"), "max_tokens": 5})
    assert streamed == ids and done and finish == "length"  # greedy: the same tokens either way
    s = httpx.get(f"{url}/stats").json()  # the backend's numbers as JSON
    assert s["kv_cache_usage_perc"] == 0.0 and s["preemptions"] == 0 and s["pending"] == 0
    assert backend.engine.cache.pool.num_free_blocks == NUM_BLOCKS


def _first_seen(ids):
    """The longest prefix of ``ids`` whose last token appears nowhere before it."""
    return next(k for k in range(len(ids), 0, -1) if ids[k - 1] not in ids[:k - 1])


def test_finish_reason_is_the_engines_a_stop_token_at_max_tokens_is_a_stop(served):
    """The engine says why a sequence ended: when the max_tokens-th token is a stop token the
    engine stopped on it, so the reason is 'stop' (vLLM's order), not 'length' counted from the
    number of tokens; without the stop token the same request ends on 'length'."""
    url, _, _ = served
    ids = httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8},
                     timeout=60).json()["choices"][0]["token_ids"]
    k = _first_seen(ids)
    body = {"prompt": "def f(x):", "max_tokens": k, "stop_token_ids": [ids[k - 1]]}
    ch = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert ch["token_ids"] == ids[:k] and ch["finish_reason"] == "stop"
    streamed, done, finish = _stream_tokens(url, body)
    assert streamed == ids[:k] and done and finish == "stop"
    ch = httpx.post(f"{url}/v1/completions", json={**body, "stop_token_ids": []}, timeout=60).json()["choices"][0]
    assert ch["token_ids"] == ids[:k] and ch["finish_reason"] == "length"


def test_list_prompts_and_n_give_one_choice_each(served):
    url, _, _ = served
    single = [httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 4}, timeout=60).json()
              for p in ("ab", "xyz")]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["ab", "xyz"], "max_tokens": 4, "n": 2}, timeout=60)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"]
    assert [c["index"] for c in ch] == [0, 1, 2, 3]
    # greedy: both samples of a prompt equal that prompt alone
    assert [c["token_ids"] for c in ch] == [single[0]["choices"][0]["token_ids"]] * 2 + \
        [single[1]["choices"][0]["token_ids"]] * 2
    assert r.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    ids = httpx.post(f"{url}/v1/completions", json={"prompt": [[1, 2], [3]], "max_tokens": 2}, timeout=60).json()
    assert len(ids["choices"]) == 2


def test_seeded_sampling_repeats_and_n_samples_differ(served):
    url, _, _ = served
    body = {"prompt": "hello", "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 2}
    a = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"]
    b = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["token_ids"] for c in a] == [c["token_ids"] for c in b]
    assert a[0]["token_ids"] != a[1]["token_ids"]


def test_queue_full_gets_429_with_retry_after_then_recovers():
    with serve_app(max_pending=2) as (url, backend, app), PausedForward(backend.engine) as paused:
        streams = []
        with httpx.Client(timeout=60) as c:
            for _ in range(2):  # admitted: their response headers came back
                s = c.stream("POST", f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
                streams.append((s, s.__enter__()))
            assert app.state.pending == 2
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            r = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}, timeout=60)
            assert r.status_code == 400  # three sequences never fit: a client error (issue 24: was 429)
            assert r.json()["error"]["code"] == "too_many_sequences"
            paused.release.set()
            for s, resp in streams:
                assert sum(1 for line in resp.iter_lines() if line.startswith("data: {")) == 4  # 3 tokens + finish
                s.__exit__(None, None, None)
        assert wait_for(lambda: app.state.pending == 0)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60).status_code == 200


def test_request_timeout_answers_504_and_frees_blocks():
    with serve_app(request_timeout_s=0.5) as (url, backend, app), PausedForward(backend.engine) as paused:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert app.state.pending == 0
        paused.release.set()
        eng = backend.engine
        assert wait_for(lambda: eng.cache.pool.num_free_blocks == NUM_BLOCKS and not eng.has_work())
        assert eng.counters["aborted"] == 1


def test_client_disconnect_mid_stream_frees_blocks(served):
    url, backend, app = served
    eng = backend.engine
    with PausedForward(eng) as paused:
        with httpx.stream("POST", f"{url}/v1/completions",
                          json={"prompt": [5] * 40, "max_tokens": 400, "stream": True}, timeout=60) as resp:
            assert resp.status_code == 200
            assert paused.entered.wait(30)
            assert eng.cache.pool.num_free_blocks < NUM_BLOCKS  # it holds blocks while running
        # the client is gone: the API notices without waiting for a token, and aborts
        assert wait_for(lambda: app.state.pending == 0)
    assert wait_for(lambda: eng.cache.pool.num_free_blocks == NUM_BLOCKS and not eng.has_work())
    assert eng.counters["aborted"] == 1 and eng.counters["generated_tokens"] <= 1


def test_client_disconnect_without_streaming_frees_blocks(served):
    url, backend, app = served
    eng = backend.engine
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": [5] * 40, "max_tokens": 400}).encode()
    with PausedForward(eng) as paused:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        assert paused.entered.wait(30) and app.state.pending == 1
        sock.close()
        assert wait_for(lambda: app.state.pending == 0)  # noticed while the engine is still paused
    assert wait_for(lambda: eng.cache.pool.num_free_blocks == NUM_BLOCKS and not eng.has_work())
    assert eng.counters["aborted"] == 1 and eng.counters["generated_tokens"] <= 1


def test_health_turns_unhealthy_when_engine_stalls_and_new_requests_get_503():
    result = {}
    with serve_app(stall_timeout_s=0.5) as (url, backend, _), PausedForward(backend.engine) as paused:
        assert httpx.get(f"{url}/health").status_code == 200
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=60)))
        t.start()
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 503)
        h = httpx.get(f"{url}/health").json()
        assert not h["healthy"] and "no engine step" in h["reason"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "unhealthy"
        paused.release.set()
        t.join(60)
        assert result["r"].status_code == 200
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)


def test_failing_request_does_not_take_the_server_down(served):
    url, backend, _ = served
    eng = backend.engine
    real = eng.execute

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    eng.execute = boom
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True},
                      timeout=60) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert "injected failure" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"
    eng.execute = real
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and eng.cache.pool.num_free_blocks == NUM_BLOCKS
    s = httpx.get(f"{url}/stats").json()
    assert s["http_errors_5xx"] == 2  # the 500 and the stream that failed after its 200


def test_tiny_temperature_poisons_nobody(served):
    """The reported defect: temperature 1e-40 beside 4 innocent requests -> all 5 answer 200."""
    url, _, _ = served
    bodies = [{"prompt": f"req {i}", "max_tokens": 6} for i in range(4)] + \
        [{"prompt": "req 0", "max_tokens": 6, "temperature": 1e-40}]
    with ThreadPoolExecutor(5) as ex:
        rs = list(ex.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=60), bodies))
    assert [r.status_code for r in rs] == [200] * 5
    assert rs[4].json()["choices"][0]["token_ids"] == rs[0].json()["choices"][0]["token_ids"]  # ~greedy


def test_load_generator_over_http(served):
    import asyncio

    from ryzlab.loadgen.client import http_client
    from ryzlab.loadgen.load import LoadSpec, run_load

    url, backend, _ = served
    spec = LoadSpec(arrival="poisson", rate=20.0, num_requests=8, prompt_len=6, output_len=5, seed=2)
    res = asyncio.run(run_load(spec, http_client(url), timeout_s=60))
    s = res.summary("tpot:10000")
    assert s["requests_completed"] == 8 and s["output_tokens"] == 40 and s["goodput"] > 0
    assert backend.engine.cache.pool.num_free_blocks == NUM_BLOCKS


def test_max_model_len_is_reported(served):
    url, _, _ = served
    m = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert m["max_model_len"] == MAX_MODEL_LEN and m["id"] == "ryzlab-random"


def test_batch_cap_is_reported_as_the_engine_runs_it(served):
    """The peer benchmark reads each server's cap back (equal caps, issue 20)."""
    url, backend, _ = served
    m = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert m["max_num_seqs"] == backend.engine.config.max_num_seqs == backend.engine.scheduler.config.max_num_seqs


def test_an_unexpected_server_error_uses_the_openai_body_and_is_counted(served):
    url, backend, app = served

    def broken():
        raise KeyError("injected")

    backend.health = broken  # test-only: a bug inside the app
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert app.state.metrics.counts["http_errors_5xx"] == 1


def test_stream_past_its_deadline_ends_with_an_error_event_and_frees_blocks():
    with serve_app(request_timeout_s=0.5) as (url, backend, app), PausedForward(backend.engine) as paused:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True},
                          timeout=60) as resp:
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2][6:])["error"]["code"] == 504 and events[-1] == "data: [DONE]"
        assert wait_for(lambda: app.state.pending == 0)
        paused.release.set()
        eng = backend.engine
        assert wait_for(lambda: eng.cache.pool.num_free_blocks == NUM_BLOCKS and not eng.has_work())


def test_no_worker_left_is_503_with_retry_after_not_500(served, monkeypatch):
    """The soak found requests in flight when the last worker died answered 500: nothing is broken,
    the server is briefly unavailable (503 + Retry-After), in a plain answer and in a stream."""
    from ryzlab.serve.engine import NoWorkerAvailable

    url, backend, _ = served

    async def no_worker(*a, **k):
        raise NoWorkerAvailable("worker 0 died; no healthy worker left")
        yield  # an async generator, like the real one

    monkeypatch.setattr(backend, "generate", no_worker)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 503 and r.headers.get("retry-after") and r.json()["error"]["code"] == "no_worker"
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True},
                      timeout=60) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == 503 and err["type"] == "service_unavailable", err


def test_async_engine_build_runs_the_factory_in_the_stepping_thread():
    """AsyncEngine.build: the engine is built in the thread that steps it (one OpenMP pool), its
    steps run there, and a factory that fails raises in the caller's thread."""
    import threading

    import pytest
    import torch

    from ryzlab.config import CacheConfig
    from ryzlab.serve.async_engine import AsyncEngine
    from ryzlab.serve.replica import ReplicaSpec, build_engine
    from ryzlab.serve.sampling import SamplingParams
    from ryzlab.serve.scheduler import EngineConfig
    from tests.serving import MC

    seen: dict[str, str] = {}

    def factory():
        seen["built"] = threading.current_thread().name
        eng = build_engine(ReplicaSpec(model="random", model_config=MC, cache=CacheConfig(block_size=8, num_blocks=16),
                                       engine=EngineConfig(max_model_len=64)))
        real = eng.step

        def step():
            seen["stepped"] = threading.current_thread().name
            return real()

        eng.step = step
        return eng

    torch.set_num_threads(1)
    backend = AsyncEngine.build(factory, model_name="m")
    try:
        import asyncio

        async def one() -> list:
            return [c async for c in backend.generate("r0", [1, 2, 3], SamplingParams(max_tokens=3))]

        chunks = asyncio.run(one())
        assert sum(len(c) for c in chunks) == 3
        assert seen == {"built": "ryzlab-engine", "stepped": "ryzlab-engine"}
        assert backend._thread.name == "ryzlab-engine" and backend.vocab_size == MC.vocab_size
    finally:
        backend.shutdown()

    def broken():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.build(broken)
