"""The transformers peer: same weights as ryzlab's model, same greedy tokens, the same OpenAI surface."""
import asyncio

import pytest
import torch

pytest.importorskip("transformers")

from ryzlab.models import load_model  # noqa: E402
from ryzlab.serve.client import openai_client, probe_endpoint, serve_in_thread  # noqa: E402
from ryzlab.serve.loadgen import LoadSpec, run_load  # noqa: E402
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
    from ryzlab.serve.replica import build_engine

    ours, _, hf = models
    eng = build_engine(model="random", block_size=16, num_blocks=64)
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


def test_peer_app_speaks_openai_to_the_load_generator(models):
    _, tok, hf = models
    peer = PeerEngine(hf, num_blocks=128)
    try:
        with serve_in_thread(create_peer_app(peer, tok, model_name="peer", max_model_len=512)) as root:
            prof = probe_endpoint(root + "/v1", "peer")
            spec = LoadSpec(arrival="closed", concurrency=3, num_requests=6, prompt_len=31, output_len=5)
            res = asyncio.run(run_load(spec, openai_client(prof), timeout_s=120))
    finally:
        peer.shutdown()
    assert prof.stream_usage and prof.length_controlled and prof.tokens_per_word == 4.0
    df = res.frame()
    assert df["ok"].all() and (df["output_tokens"] == 5).all() and (df["prompt_tokens"] == 31).all()
    assert set(df["count_source"]) == {"usage"}
