"""GGUF Q8_0 / Q4_0 / Q4_1 tensors loaded packed (weights='gguf'): same logits as the dequantized path, file-sized."""
from __future__ import annotations

import pytest
import torch

import tiny_checkpoints as tc
from ryzlab.models import load_model
from ryzlab.models.gguf import GGUFCheckpoint
from ryzlab.models.quant import Int4Linear, Int8Linear, linear_weight_bytes, weight_ledger

torch.set_num_threads(1)

QTYPES = {"attn_q": "Q4_0", "attn_k": "Q8_0", "ffn_up": "Q4_1", "ffn_gate": "F32", "ffn_down": "Q4_1",
          "attn_v": "Q4_1", "attn_output": "Q4_0", "": "Q8_0"}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = tc.hf_model("llama", rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=True)
    return tc.write_gguf(d / "tiny-llama.gguf", hf, tc.bpe_tokenizer(), QTYPES)


def _ids(T: int = 12) -> torch.Tensor:
    return torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_native_blocks_match_the_dequantized_path(gguf_file):
    ref, _ = load_model(str(gguf_file))                     # every block dequantized to float32
    exact, _ = load_model(str(gguf_file), weights="gguf-f32")
    fast, _ = load_model(str(gguf_file), weights="gguf")
    a = exact.layers[0].attention
    assert isinstance(a.wq, Int4Linear) and isinstance(a.wk, Int8Linear) and isinstance(a.wo, Int4Linear)
    assert isinstance(exact.layers[0].feed_forward.w1, torch.nn.Linear)  # F32 stays float
    assert exact.output is exact.tok_embeddings.table and isinstance(exact.output, Int8Linear)  # tied Q8_0
    # the packed weights are the file's weights (Q/K rows un-permuted like the float path)
    for name in ("wq", "wk", "wv", "wo"):
        assert torch.allclose(getattr(a, name).dequantize(), getattr(ref.layers[0].attention, name).weight,
                              rtol=1e-6, atol=1e-6), name
    x = _ids()
    assert _rel(exact(x), ref(x)) < 1e-5
    assert _rel(fast(x), ref(x)) < 3e-2                       # bfloat16 scales and activations
    assert torch.equal(exact.generate(x[:1, :6], 12), ref.generate(x[:1, :6], 12))


def test_native_bytes_are_the_file_blocks(gguf_file):
    ckpt = GGUFCheckpoint(gguf_file)
    model, _ = load_model(str(gguf_file), weights="gguf")
    led = weight_ledger(model)
    want = 0
    for t in ckpt.tensors.values():
        if len(t.shape) == 2 and t.qtype.name == "Q8_0":
            want += linear_weight_bytes(*t.shape, "int8", group_size=32)
            assert linear_weight_bytes(*t.shape, "int8", group_size=32) == t.nbytes  # 34 bytes per 32: the file's
        elif len(t.shape) == 2 and t.qtype.name in ("Q4_0", "Q4_1"):
            want += linear_weight_bytes(*t.shape, "gguf")
        elif len(t.shape) == 2:
            want += t.nbytes
    assert led["linears"] + led["tables"] == want
    assert led["format"] == "gguf"


def test_weights_gguf_refused_for_other_models():
    with pytest.raises(ValueError, match="weights=gguf keeps a GGUF file's own blocks"):
        load_model("reference", weights="gguf")


def _tp_native(rank, world, path):
    from ryzlab.config import ParallelConfig
    from ryzlab.parallel import init_parallel

    g = init_parallel(ParallelConfig(tp=world))
    m, _ = load_model(str(path), weights="gguf-f32", tp=g.tp)
    with torch.no_grad():
        return m(_ids())


def test_tp2_ranks_read_their_blocks(gguf_file, tmp_path):
    from ryzlab.models import check_model
    from ryzlab.models.quant import check_weight_format
    from ryzlab.orchestrator import launch

    # ffn_dim 96 over 2 ranks: w2 shards of 48 columns would split a block of 32 -> refused before loading
    with pytest.raises(ValueError, match="w2: its rank 0 shard covers input columns"):
        check_weight_format(check_model(str(gguf_file)).config, "gguf", tp=2)
    hf = tc.hf_model("llama", rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=True, intermediate_size=128)
    gguf_file = tc.write_gguf(tmp_path / "tp.gguf", hf, tc.bpe_tokenizer(), QTYPES)
    ref, _ = load_model(str(gguf_file), weights="gguf-f32")
    with torch.no_grad():
        want = ref(_ids())
    for got in launch(_tp_native, 2, args=(gguf_file,), backend="gloo", timeout_s=300):
        assert _rel(got, want) < 1e-5
