"""One engine per rank: `ryzlab generate` (own ranks, torchrun, in-process) and serving replicas of
tp x cp ranks behind the router give the tokens one rank gives; a dead rank restarts its replica."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time

import psutil
import pytest
from procs import live_descendants, run_in_own_session

from ryzlab.cli import main
from ryzlab.config import CacheConfig, ModelConfig, ParallelConfig
from ryzlab.serve.generate import GenerateRequest, generate
from ryzlab.orchestrator.launch import free_port
from ryzlab.serve.engine import EngineConfig, SamplingParams
from ryzlab.serve.replica import ReplicaSpec, build_engine
from ryzlab.serve.router import Router

PROMPT = "def parse(path):\n    with open("


@pytest.fixture(scope="module")
def one_rank():
    return generate(GenerateRequest(prompt=PROMPT, max_tokens=24, codec="int8"))


def test_cli_json_line_at_one_rank(capsys, one_rank):
    assert main(["generate", "--prompt", PROMPT, "--max-tokens", "24", "--codec", "int8", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    row = json.loads(out[0])
    assert row["token_ids"] == one_rank["token_ids"] and len(row["token_ids"]) == 24
    assert row["text"] == one_rank["text"] == bytes(row["token_ids"]).decode("utf-8", errors="replace")


@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2)])
def test_own_ranks_give_the_one_rank_tokens(tp, cp, one_rank):
    out = generate(GenerateRequest(prompt=PROMPT, max_tokens=24, codec="int8", tp=tp, cp=cp, threads=1))
    assert out["token_ids"] == one_rank["token_ids"] and (out["tp"], out["cp"]) == (tp, cp)


def test_torchrun_ranks_give_the_one_rank_tokens(one_rank, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ryzlab", "generate", "--tp", "2", "--prompt", PROMPT,
           "--max-tokens", "24", "--codec", "int8", "--json"]
    rc, stdout, stderr = run_in_own_session(cmd, timeout=120, cwd=tmp_path)
    assert rc == 0, stderr[-2000:]
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, stdout  # rank 0 prints, rank 1 does not
    assert lines[0]["token_ids"] == one_rank["token_ids"]


MC = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512)
SPEC = ReplicaSpec(model="random", model_config=MC, cache=CacheConfig(block_size=8, num_blocks=128),
                   engine=EngineConfig(max_model_len=256))
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 20]


def _router_tokens(router, tag):
    async def one(i, p):
        out = []
        async for t in router.generate(f"{tag}{i}", p, SamplingParams(max_tokens=12)):
            out += t
        return out

    async def all_():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    return asyncio.run(all_())


def _rank_processes(worker_pid):
    """The replica's other ranks: descendants of the driver (forked by its fork server)."""
    return live_descendants(worker_pid)


def test_replica_of_two_tp_ranks_serves_one_rank_tokens_and_restarts_whole_when_a_rank_dies():
    ref = build_engine(SPEC).generate(PROMPTS, SamplingParams(max_tokens=12))
    router = Router(workers=1, spec=dataclasses.replace(SPEC, parallel=ParallelConfig(tp=2)), heartbeat_timeout_s=30.0)
    with router:
        assert _router_tokens(router, "a") == ref
        driver = router.workers[0].pid
        followers = _rank_processes(driver)
        assert len(followers) == 1
        followers[0].kill()
        deadline = time.monotonic() + 120  # the driver exits, the router restarts the replica whole
        while time.monotonic() < deadline and not (router.workers[0].restarts == 1 and router.workers[0].healthy):
            time.sleep(0.1)
        assert router.workers[0].restarts == 1 and router.workers[0].pid != driver
        assert not psutil.pid_exists(driver) or psutil.Process(driver).status() == psutil.STATUS_ZOMBIE
        assert _router_tokens(router, "b") == ref
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in followers if psutil.pid_exists(p.pid))


def test_swap_preemption_is_refused_for_a_group_before_any_process():
    with pytest.raises(ValueError, match="recompute"):
        from ryzlab.parallel.comm import Comm
        from ryzlab.serve.engine import Engine

        class TwoRanks(Comm):
            def __init__(self):
                super().__init__(local=True)
                self.world_size = 2

        eng = build_engine(SPEC)
        Engine(eng.model, eng.cache, EngineConfig(preemption="swap"), control=TwoRanks())
