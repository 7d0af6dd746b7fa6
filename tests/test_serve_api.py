"""HTTP API on a real uvicorn server (127.0.0.1, free port): validation (4xx), streaming,
client disconnect frees the blocks, /health turns 503 when the engine stalls."""
import json
import threading
import time

import httpx
import pytest
import torch

from ryzlab.config import ModelConfig
from ryzlab.serve.api import create_app
from ryzlab.serve.client import serve_in_thread
from ryzlab.serve.engine import AsyncEngine, EngineConfig
from ryzlab.serve.replica import build_engine

MC = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=1024)
NUM_BLOCKS = 64


@pytest.fixture
def served():
    torch.set_num_threads(1)
    eng = build_engine(model="random", model_config=MC, block_size=8, num_blocks=NUM_BLOCKS,
                       config=EngineConfig(max_model_len=500, stall_timeout_s=0.5))
    backend = AsyncEngine(eng)
    with serve_in_thread(create_app(backend)) as url:
        yield url, backend
    backend.shutdown()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_completion_and_stream(served):
    url, backend = served
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"][0]["token_ids"]) == 5 and body["usage"]["prompt_tokens"] == 9
    n, done = 0, False
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 7, "stream": True},
                      timeout=30) as resp:
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                n += len(json.loads(line[6:])["choices"][0]["token_ids"])
    assert n == 7 and done
    m = httpx.get(f"{url}/metrics").json()
    assert m["kv_cache_usage_perc"] == 0.0 and "preemptions" in m and "prefix_cache_hit_rate" in m


@pytest.mark.parametrize("body,needle", [
    ({"max_tokens": 3}, "missing field 'prompt'"),
    ({"prompt": "", "max_tokens": 3}, "empty"),
    ({"prompt": [1, 999], "max_tokens": 3}, "[0, 256)"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x" * 490, "max_tokens": 20}, "maximum length 500"),
    ({"prompt": "hi", "temperature": 9}, "temperature"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "frobnicate": 1}, "valid fields"),
    ({"prompt": "hi", "model": "gpt-9"}, "choose one of"),
    ({"prompt": 12}, "string or a list"),
])
def test_bad_requests_get_4xx_and_server_stays_up(served, body, needle):
    url, _ = served
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert 400 <= r.status_code < 500
    assert needle in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30).status_code == 400
    assert httpx.get(f"{url}/health").status_code == 200


def test_client_disconnect_mid_stream_frees_blocks(served):
    url, backend = served
    eng = backend.engine
    real = eng.runner.forward

    def slow(*a, **k):  # test-only slowdown so the stream is surely still running when we leave
        time.sleep(0.01)
        return real(*a, **k)

    eng.runner.forward = slow
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": [5] * 40, "max_tokens": 400, "stream": True},
                      timeout=30) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break
        assert eng.cache.pool.num_free_blocks < NUM_BLOCKS  # it holds blocks while streaming
    # the client is gone: the request is aborted and every block is free again
    assert _wait(lambda: eng.cache.pool.num_free_blocks == NUM_BLOCKS and not eng.has_work())
    assert eng.counters["aborted"] == 1 and eng.counters["generated_tokens"] < 400


def test_health_turns_unhealthy_when_engine_stalls(served):
    url, backend = served
    eng = backend.engine
    release = threading.Event()
    real = eng.runner.forward

    def stuck(*a, **k):  # a hung forward (test-only)
        release.wait(20)
        return real(*a, **k)

    assert httpx.get(f"{url}/health").status_code == 200
    eng.runner.forward = stuck
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "r", httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30)))
    t.start()
    assert _wait(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=10)
    h = httpx.get(f"{url}/health").json()
    assert not h["healthy"] and "no engine step" in h["reason"]
    eng.runner.forward = real
    release.set()
    t.join(30)
    assert result["r"].status_code == 200
    assert _wait(lambda: httpx.get(f"{url}/health").status_code == 200)


def test_failing_request_does_not_take_the_server_down(served):
    url, backend = served
    eng = backend.engine
    real = eng.runner.forward

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    eng.runner.forward = boom
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    eng.runner.forward = real
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and eng.cache.pool.num_free_blocks == NUM_BLOCKS


def test_load_generator_over_http(served):
    import asyncio

    from ryzlab.serve.client import http_client
    from ryzlab.serve.loadgen import LoadSpec, run_load

    url, backend = served
    spec = LoadSpec(arrival="poisson", rate=20.0, num_requests=8, prompt_len=6, output_len=5, seed=2)
    res = asyncio.run(run_load(spec, http_client(url), timeout_s=60))
    s = res.summary("tpot:10000")
    assert s["requests_completed"] == 8 and s["output_tokens"] == 40 and s["goodput"] > 0
    assert backend.engine.cache.pool.num_free_blocks == NUM_BLOCKS
