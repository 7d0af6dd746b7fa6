"""The transformers peer: same weights as ryzlab's model, same greedy tokens, the same OpenAI surface."""
import asyncio

import httpx
import pytest
import torch

pytest.importorskip("transformers")

from ryzlab.models import load_model  # noqa: E402
from ryzlab.loadgen.client import openai_client, probe_endpoint  # noqa: E402
from ryzlab.serve.local import serve_in_thread  # noqa: E402
from ryzlab.loadgen.load import LoadSpec, run_load  # noqa: E402
from ryzlab.serve.peer import PeerEngine, create_peer_app, hf_model  # noqa: E402

PROMPT = list(b"def main(argv):\n    ")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours, tok = load_model("random")
    return ours, tok, hf_model("random")


def test_converted_model_has_the_same_logits(models):
    ours, _, hf = models
    with torch.no_grad():
        a = ours(torch.tensor([PROMPT]))
        b = hf(torch.tensor([PROMPT])).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_peer_engine_greedy_tokens_match_ryzlab(models):
    from ryzlab.serve.engine import SamplingParams
    from ryzlab.config import CacheConfig
    from ryzlab.serve.replica import ReplicaSpec, build_engine

    ours, _, hf = models
    eng = build_engine(ReplicaSpec(model="random", cache=CacheConfig(block_size=16, num_blocks=64)))
    want = eng.generate([PROMPT], SamplingParams(max_tokens=8))[0]
    peer = PeerEngine(hf, num_blocks=64)
    try:
        async def go():
            out = []
            async for toks in peer.generate(PROMPT, 8):
                out.extend(toks)
            return out
        got = asyncio.run(go())
    finally:
        peer.shutdown()
    assert got == want


def test_peer_engine_caps_its_batch_like_ryzlab(models):
    """--max-num-seqs reaches transformers' scheduler as max_requests_per_batch (equal caps, issue 20)."""
    _, _, hf = models
    peer = PeerEngine(hf, num_blocks=64, max_num_seqs=3)
    try:
        assert peer.manager.continuous_batching_config.max_requests_per_batch == 3
    finally:
        peer.shutdown()


def test_peer_app_speaks_openai_to_the_load_generator(models):
    _, tok, hf = models
    peer = PeerEngine(hf, num_blocks=128, max_num_seqs=5)
    try:
        with serve_in_thread(create_peer_app(peer, tok, model_name="peer", max_model_len=512)) as root:
            prof = probe_endpoint(root + "/v1", "peer")
            cap = httpx.get(root + "/v1/models").json()["data"][0]["max_num_seqs"]
            spec = LoadSpec(arrival="closed", concurrency=3, num_requests=6, prompt_len=31, output_len=5)
            res = asyncio.run(run_load(spec, openai_client(prof), timeout_s=120))
    finally:
        peer.shutdown()
    assert prof.stream_usage and prof.length_controlled and prof.tokens_per_word == 4.0
    assert cap == 5  # the cap transformers runs with, read back (equal caps in the peer benchmark)
    df = res.frame()
    assert df["ok"].all() and (df["output_tokens"] == 5).all() and (df["prompt_tokens"] == 31).all()
    assert set(df["count_source"]) == {"usage"}


def test_serving_experiment_runs_the_peer_in_its_own_process():
    import os

    from ryzlab.experiments.serving import Config, run

    df = run(Config(engine="transformers", model="random", rate=10.0, num_requests=4, prompt_len=17, output_len=3,
                    slo="ttft:60000,tpot:60000", num_blocks=64))
    s = df[df["kind"] == "summary"].iloc[0]
    assert s["engine"] == "transformers" and s["via"] == "http" and s["device"] == "cpu"
    # byte-level: 4 tokens per 3-letter word (+ space), -1 for the first: 17 asked -> 4 words -> 15 tokens
    assert s["requests_completed"] == 4 and s["output_tokens"] == 12 and s["prompt_tokens"] == 4 * 15
    assert s["count_source"] == "usage" and s["itl_measurable_frac"] == 1.0
    assert [p for p in _children(os.getpid()) if "ryzlab.serve.peer" in _cmd(p)] == []  # the server is gone


def _cmd(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _children(ppid: int) -> list[str]:
    import os

    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(p)
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    return out


def test_a_server_that_dies_at_start_is_reported_with_its_output():
    import sys

    from ryzlab.loadgen.client import free_port, serve_subprocess

    argv = [sys.executable, "-c", "import sys; print('no such model: boom'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*no such model: boom"):
        with serve_subprocess(argv, port=free_port()):
            pass
