"""Router over real worker processes: policies place requests, a killed worker's requests are
re-routed (streams continue) or answered with an error -- never lost."""
import asyncio
import json
import time

import pytest

from ryzlab.config import ModelConfig
from ryzlab.serve.api import json_safe
from ryzlab.serve.client import backend_client
from ryzlab.serve.engine import SamplingParams
from ryzlab.serve.loadgen import LoadSpec, run_load
from ryzlab.serve.router import Router

MC = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512)
KW = {"model": "random", "model_config": MC, "block_size": 8, "num_blocks": 128,
      "config": {"max_model_len": 256}}


def test_unknown_policy_names_valid_ones():
    with pytest.raises(ValueError, match="least_outstanding"):
        Router(workers=2, policy="fastest", engine_kwargs=KW)
    with pytest.raises(ValueError, match="a .gguf file"):  # names what is supported, before any process starts
        Router(workers=2, engine_kwargs={**KW, "model": "no/such/file.safetensors"})
    with pytest.raises(ValueError, match="int8"):
        Router(workers=2, engine_kwargs={**KW, "codec": "int9"})


def test_kill_one_of_two_workers_under_load_loses_nothing():
    router = Router(workers=2, policy="round_robin", engine_kwargs=KW, heartbeat_timeout_s=1.0)
    with router:
        # same greedy tokens from either worker: both built from the same seed
        async def one():
            out = []
            async for t in router.generate("probe", [1, 2, 3], SamplingParams(max_tokens=8)):
                out += t
            return out

        probe = asyncio.run(one())

        async def kill_mid_stream():
            # the event is made, not timed: kill worker 0 once one of its streams is under way
            while not any(r.worker == 0 and len(r.emitted) >= 5 for r in list(router._reqs.values())):
                await asyncio.sleep(0.002)
            router.kill_worker(0)

        async def main():
            killer = asyncio.create_task(kill_mid_stream())
            spec = LoadSpec(arrival="closed", concurrency=8, num_requests=40, prompt_len=8, output_len=60,
                            vocab_size=64, seed=0)
            res = await run_load(spec, backend_client(router), timeout_s=60)
            await asyncio.wait_for(killer, 30)  # fails loudly if no stream of worker 0 ever started
            return res

        res = asyncio.run(main())
        events = [e["event"] for e in router.events]
        assert "kill" in events and "detected" in events
        assert router.counters["rerouted"] > 0
        s = res.summary()
        assert s["requests"] == 40
        assert s["requests_completed"] + s["requests_failed"] == 40 and s["requests_lost"] == 0
        ok = [r for r in res.records if r.ok]
        assert all(r.output_tokens == 60 for r in ok)  # re-routed streams are complete
        assert len(ok) >= 30
        # the killed worker is restarted and serves again
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not router.workers[0].healthy:
            time.sleep(0.1)
        assert router.workers[0].healthy and router.workers[0].restarts == 1

        async def again():
            out = []
            async for t in router.generate("probe2", [1, 2, 3], SamplingParams(max_tokens=8)):
                out += t
            return out

        assert asyncio.run(again()) == probe
        h = router.health()
        assert h["healthy"] and h["healthy_workers"] == 2
        m = json.loads(json.dumps(json_safe(router.metrics()), allow_nan=False))  # what /metrics serves
        assert m["completed"] >= 30 and m["latency"][0]["scope"] == "all" and m["latency"][0]["requests"] >= 40
