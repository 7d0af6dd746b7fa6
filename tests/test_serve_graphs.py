"""The fixed-shape decode step behind the CUDA graphs (:mod:`ryzlab.serve.graphs`), checked on
the CPU without capture: padded to a bucket, with block tables as wide as max_model_len and
padding rows writing a scratch page, it gives the real rows the logits and tokens of the
ordinary step. (Capture itself needs a GPU: not run here.)"""
import pytest
import torch

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.kv.cache import PagedKVCache
from ryzlab.models.transformer import Transformer
from ryzlab.serve.engine import Engine, EngineConfig, SamplingParams, ragged_forward
from ryzlab.serve.graphs import DecodeGraphs, graphs_unavailable_reason

MC = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(MC).eval()


def _decode_both(model, cache_cfg, kernel, lengths, steps):
    """Decode the same prompts in two equal caches, one through DecodeGraphs(capture=False)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, MC.vocab_size, (n,), generator=g).tolist() for n in lengths]
    plain, fixed = (PagedKVCache(MC, cache_cfg, kernel=kernel) for _ in range(2))
    graphs = DecodeGraphs(model, fixed, max_batch=8, max_model_len=64, capture=False)
    live = list(range(len(prompts)))
    with torch.inference_mode():
        for c in (plain, fixed):
            for i, p in enumerate(prompts):
                c.allocate_slots(i, p)
        a = ragged_forward(model, plain, live, prompts)
        b = ragged_forward(model, fixed, live, prompts, graphs=graphs)   # prefill: runs eagerly
        for t in range(steps):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            nxt = a.argmax(-1).tolist()
            assert b.argmax(-1).tolist() == nxt
            if t == 2:  # a sequence leaves: the batch drops to a smaller bucket
                plain.free(live[-1])
                fixed.free(live[-1])
                live, nxt = live[:-1], nxt[:-1]
            for c in (plain, fixed):
                for s, tok in zip(live, nxt):
                    c.allocate_slots(s, [tok])
            a = ragged_forward(model, plain, live, [[x] for x in nxt])
            b = ragged_forward(model, fixed, live, [[x] for x in nxt], graphs=graphs)
    return graphs


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_fixed_shape_decode_step_equals_the_ordinary_step(model, codec):
    cfg = CacheConfig(codec=codec, block_size=4, num_blocks=64, residual=3 if codec != "none" else 0)
    graphs = _decode_both(model, cfg, "torch", [5, 9, 2], steps=7)
    assert graphs.counters["fixed_shape_eager"] == 7
    assert graphs.counters["eager:not a decode-only step"] == 1     # the prefill
    assert set(graphs._bucket) == {2, 4}                            # 3 sequences, then 2


def test_fixed_shape_step_through_the_triton_kernel(model):
    pytest.importorskip("triton")
    cfg = CacheConfig(codec="int8", block_size=4, num_blocks=64, residual=2)
    graphs = _decode_both(model, cfg, "triton", [6, 3], steps=4)
    assert graphs.counters["fixed_shape_eager"] == 4


def test_block_commits_and_oversized_steps_run_eagerly(model):
    # channel-wise key scales span a block: the step that fills a block commits it, eagerly
    cfg = CacheConfig(codec="int4", key_granularity="channel", block_size=4, num_blocks=64)
    graphs = _decode_both(model, cfg, "torch", [5, 2], steps=6)
    assert graphs.counters["eager:a block commit (token-spanning scales)"] > 0
    assert graphs.counters["fixed_shape_eager"] > 0


def test_engine_says_why_graphs_are_off_on_a_cpu(model, caplog):
    cache = PagedKVCache(MC, CacheConfig(block_size=4, num_blocks=32))
    assert "CUDA" in graphs_unavailable_reason(cache, grouped=False)
    eng = Engine(model, cache, EngineConfig(cuda_graphs=True, max_model_len=64))
    assert eng.graphs is None and "decode steps run eagerly" in caplog.text
    assert eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3))  # and it still serves
