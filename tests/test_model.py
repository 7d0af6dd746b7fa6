"""Reference model: dense causal forward == incremental (dense and paged caches), shapes, checkpoints."""
from __future__ import annotations

import pytest
import torch

# Tiny tensors on a shared 2-core machine: extra threads only spin (measured 85 s -> 23 s for
# test_model.py with one thread).
torch.set_num_threads(1)

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.models.transformer import DenseKVCache, Transformer, load_checkpoint, save_checkpoint

TINY = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_1d_input(model):
    x = tokens(2, 7)
    assert model(x).shape == (2, 7, TINY.vocab_size)
    torch.testing.assert_close(model(x[0]), model(x[:1]))


def test_causality(model):
    """Changing a future token never changes earlier logits."""
    x = tokens(1, 10)
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % TINY.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@torch.no_grad()
def test_dense_incremental_equals_full_recompute(model):
    x = tokens(3, 12)
    full = model(x)
    cache = DenseKVCache(TINY.n_layers)
    parts = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
    parts.append(model(x[:, 9:], cache=cache))  # a multi-token chunk after decode steps
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("block_size", [4, 5])
def test_paged_codec_none_equals_dense(model, block_size):
    from ryzlab.kv.cache import PagedKVCache

    x = tokens(3, 14)
    full = model(x)
    cache = PagedKVCache(TINY, CacheConfig(codec="none", block_size=block_size))
    seq_ids = [10, 11, 12]
    prefill = model(x[:, :9], cache=cache, seq_ids=seq_ids)
    decode = [model(x[:, t:t + 1], cache=cache, seq_ids=seq_ids) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat([prefill] + decode, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_paged_ragged_rows_and_generate(model):
    """Sequences of different lengths decode together; greedy generate matches the dense cache."""
    from ryzlab.kv.cache import PagedKVCache

    cache = PagedKVCache(TINY, CacheConfig(codec="none", block_size=4))
    a, b = tokens(1, 6, seed=2), tokens(1, 9, seed=3)
    model(a, cache=cache, seq_ids=["a"])
    model(b, cache=cache, seq_ids=["b"])
    nxt = torch.tensor([[1], [2]])
    step = model(nxt, cache=cache, seq_ids=["a", "b"])
    torch.testing.assert_close(step[0, -1], model(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, -1], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5)
    prompt = tokens(2, 5, seed=4)
    dense = model.generate(prompt, 6)
    paged = model.generate(prompt, 6, cache=PagedKVCache(TINY, CacheConfig(codec="none", block_size=4)),
                           seq_ids=[0, 1])
    assert torch.equal(dense, paged)


@torch.no_grad()
def test_paged_int8_close_to_dense(model):
    from ryzlab.kv.cache import PagedKVCache

    x = tokens(2, 16)
    full = model(x).log_softmax(-1)
    cache = PagedKVCache(TINY, CacheConfig(codec="int8", block_size=4))
    out = torch.cat([model(x[:, :8], cache=cache, seq_ids=[0, 1])] +
                    [model(x[:, t:t + 1], cache=cache, seq_ids=[0, 1]) for t in range(8, 16)], 1)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), full, log_target=True, reduction="none").sum(-1)
    assert kl.max().item() < 1e-3


def test_checkpoint_roundtrip(model, tmp_path):
    p = tmp_path / "m.safetensors"
    save_checkpoint(model, p, {"seed": 0}, dtype=torch.float32)
    loaded, meta = load_checkpoint(p)
    assert meta["seed"] == 0 and meta["config"]["dim"] == TINY.dim
    x = tokens(1, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_seq_ids_without_cache_is_an_error(model):
    with pytest.raises(ValueError, match="seq_ids"):
        model(tokens(1, 3), seq_ids=[0])


def test_shipped_reference_checkpoint():
    """The checkpoint in the package loads, is small, and reproduces its recorded held-out perplexity."""
    from ryzlab.models.corpus import stdlib_corpus
    from ryzlab.models.transformer import REFERENCE_CHECKPOINT, load_reference_model
    from ryzlab.models.train import evaluate_perplexity

    assert REFERENCE_CHECKPOINT.stat().st_size < 10 * 2**20
    model, meta = load_reference_model()
    assert meta["config"]["vocab_size"] == 256 and meta["seed"] == 0 and "heldout_perplexity" in meta
    corpus = stdlib_corpus()
    if corpus.description["sha256"] != meta["data"]["sha256"]:
        pytest.skip("this interpreter's stdlib differs from the one the checkpoint was evaluated on")
    tc = meta["train_config"]
    ppl = evaluate_perplexity(model, corpus.heldout, n_windows=tc["eval_windows"], length=tc["eval_len"])
    # the same windows and weights: equal up to float32 summation order (measured 7e-8 relative)
    assert ppl == pytest.approx(meta["heldout_perplexity"], rel=1e-6)


VARIANT = ModelConfig(vocab_size=48, dim=60, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                      qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True, rope_theta=500000.0,
                      rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=16)


@torch.no_grad()
def test_architecture_variants_paged_equals_dense(tmp_path):
    """Explicit head_dim (heads do not tile dim), every bias, tied embeddings, llama3 RoPE scaling."""
    from ryzlab.kv.cache import PagedKVCache

    torch.manual_seed(0)
    m = Transformer(VARIANT).eval()
    assert m.output.weight is m.tok_embeddings.weight
    assert m.layers[0].attention.wq.weight.shape == (4 * 16, 60) and m.layers[0].attention.wk.bias is not None
    for name, p in m.named_parameters():  # biases start at zero: make them matter
        if name.endswith("bias"):
            p.normal_()
    x = torch.randint(0, 48, (2, 40), generator=torch.Generator().manual_seed(3))  # past 16: scaled band used
    full = m(x)
    cache = PagedKVCache(VARIANT, CacheConfig(codec="none", block_size=4))
    out = torch.cat([m(x[:, :30], cache=cache, seq_ids=[0, 1])] +
                    [m(x[:, t:t + 1], cache=cache, seq_ids=[0, 1]) for t in range(30, 40)], 1)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    p = tmp_path / "v.safetensors"
    save_checkpoint(m, p, {}, dtype=torch.float32)
    loaded, _ = load_checkpoint(p)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(loaded(x), full)


def test_rope_frequencies_stay_float32_in_a_bf16_model():
    m = Transformer(TINY).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
