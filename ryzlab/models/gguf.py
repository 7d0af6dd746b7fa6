"""GGUF files of the ``llama`` architecture (Llama, SmolLM, Mistral as llama.cpp writes them).

The header (metadata + tensor table) is parsed once with the ``gguf`` package's ``GGUFReader``;
weights are read later, a block of rows at a time with plain file reads, and dequantized to
float32 by ``gguf.quants.dequantize`` (every type the package can dequantize: F32, F16, BF16,
Q4_0 ... Q8_0, the K-quants, IQ-quants, ...), then copied into the target dtype. A
tensor-parallel rank reads only its rows (column-parallel weights) or dequantizes rows and keeps
its columns (row-parallel), so it never holds a whole weight it does not keep.

llama.cpp stores the rows of ``attn_q`` / ``attn_k`` permuted for its interleaved RoPE
(``convert_hf_to_gguf.py``: per head, rows ``(2, D/2)`` -> ``(D/2, 2)``); they are permuted back
per head (transformers' ``reverse_permute_weights``), so ryzlab's rotate-half RoPE applies.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ryzlab.config import ModelConfig
from ryzlab.names import param_renamer
from ryzlab.models.source import ModelSource, check_shapes, expected_shapes

log = logging.getLogger(__name__)

__all__ = ["GGUF_ARCHITECTURES", "GGUFCheckpoint", "check_gguf_file", "gguf_name", "gguf_model_config"]

GGUF_ARCHITECTURES = ("llama",)
_LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
          "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
          "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}
_CHUNK_FLOATS = 1 << 22
"""Rows are dequantized in blocks of about 4 M values (16 MiB of float32): the float32 copy of a
whole embedding matrix never exists next to the weights."""


gguf_name = param_renamer(_TOP, _LAYER, "blk.{layer}.{module}.{kind}", "GGUF")
"""ryzlab parameter name -> llama.cpp tensor name (``layers.0.attention.wq.weight`` -> ``blk.0.attn_q.weight``)."""


class _Tensor(NamedTuple):
    qtype: Any          # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: [rows, cols]
    offset: int         # absolute byte offset in the file
    nbytes: int


def _dequantizable(qtype: Any) -> bool:
    """Whether ``gguf.quants.dequantize`` handles ``qtype`` (probed on one zero block)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def gguf_model_config(meta: dict[str, Any], tensor_names: set[str], where: str) -> ModelConfig:
    """The ``llama.*`` metadata of a GGUF file -> ModelConfig (biases and tying from the tensor names)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{where}: GGUF general.architecture={arch!r} is not supported; supported: "
                         f"{', '.join(map(repr, GGUF_ARCHITECTURES))} (and Hugging Face folders of LlamaForCausalLM, "
                         f"MistralForCausalLM, Qwen2ForCausalLM)")
    a = f"{arch}."
    if meta.get(a + "expert_count"):
        raise ValueError(f"{where}: a mixture-of-experts llama ({meta[a + 'expert_count']} experts) is not supported")
    try:
        n_heads = int(meta[a + "attention.head_count"])
        dim = int(meta[a + "embedding_length"])
        head_dim = int(meta.get(a + "attention.key_length") or dim // n_heads)
        rot = meta.get(a + "rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            raise ValueError(f"rope.dimension_count={rot} != head_dim={head_dim}: partial rotary embeddings are "
                             f"not supported")
        kind = meta.get(a + "rope.scaling.type", "none")
        rope: dict[str, Any] = {"rope_theta": float(meta.get(a + "rope.freq_base", 10000.0))}
        if kind == "linear":
            rope.update(rope_scaling="linear", rope_factor=float(meta[a + "rope.scaling.factor"]))
        elif kind not in ("none", None):
            raise ValueError(f"rope.scaling.type={kind!r} is not supported; supported: 'none', 'linear' (and Llama 3 "
                             f"'rope_freqs' factors)")
        vocab = int(meta.get(a + "vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []))
        cfg = ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=int(meta[a + "block_count"]), n_heads=n_heads,
            n_kv_heads=int(meta.get(a + "attention.head_count_kv") or n_heads), head_dim=head_dim,
            ffn_dim=int(meta[a + "feed_forward_length"]), max_seq_len=int(meta.get(a + "context_length", 4096)),
            norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            qkv_bias="blk.0.attn_q.bias" in tensor_names, o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names, tie_embeddings="output.weight" not in tensor_names,
            **rope)
    except KeyError as e:
        raise ValueError(f"{where}: missing GGUF metadata key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return cfg


def _llama3_from_rope_freqs(cfg: ModelConfig, factors: np.ndarray, meta: dict[str, Any], where: str) -> ModelConfig:
    """llama.cpp writes Llama 3.1+ RoPE scaling as a ``rope_freqs`` tensor (per-frequency divisors)
    instead of its parameters. Find the ``llama3`` parameters that reproduce it exactly: the factor
    is the largest divisor; low/high frequency factors and the original context default to Llama
    3.1's 1 / 4 / 8192 (metadata wins where present). No match -> error, never a guess."""
    import dataclasses

    from ryzlab.models.transformer import rope_inv_freq

    a = f"{meta.get('general.architecture')}."
    cand = dataclasses.replace(
        cfg, rope_scaling="llama3", rope_factor=float(meta.get(a + "rope.scaling.factor") or factors.max()),
        rope_low_freq_factor=float(meta.get(a + "rope.scaling.low_freq_factor", 1.0)),
        rope_high_freq_factor=float(meta.get(a + "rope.scaling.high_freq_factor", 4.0)),
        rope_original_max_seq_len=int(meta.get(a + "rope.scaling.original_context_length", 8192)))
    base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling="none"))
    want = base / torch.from_numpy(factors.astype(np.float32))
    got = rope_inv_freq(cand)
    if factors.shape != (cfg.head_dim // 2,) or not torch.allclose(got, want, rtol=1e-5, atol=0):
        raise ValueError(f"{where}: its rope_freqs tensor is not the llama3 RoPE scaling with factor={cand.rope_factor}, "
                         f"low_freq_factor={cand.rope_low_freq_factor}, high_freq_factor={cand.rope_high_freq_factor}, "
                         f"original context {cand.rope_original_max_seq_len}; other frequency tables are not supported")
    return cand


class GGUFCheckpoint:
    """A parsed GGUF header: metadata (Python values), the tensor table, and row-block reads."""

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
        if reader.byte_order != "I":
            raise ValueError(f"{path}: a big-endian GGUF file is not supported")
        self.meta: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items()}
        self.tensors: dict[str, _Tensor] = {
            t.name: _Tensor(t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.data_offset),
                            int(t.n_bytes)) for t in reader.tensors}
        del reader  # closes the memory map; weights are read with plain reads (see read_into)
        self.file_bytes = path.stat().st_size

    def formats(self) -> tuple[str, ...]:
        return tuple(k for k, _ in Counter(t.qtype.name for t in self.tensors.values()).most_common())

    def _rows(self, t: _Tensor, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a 2-D tensor (all of a 1-D one), dequantized -> float32 [n, cols]."""
        import gguf

        rows = t.shape[0] if len(t.shape) == 2 else 1
        row_bytes = t.nbytes // rows
        buf = bytearray((stop - start) * row_bytes)
        with open(self.path, "rb") as f:
            f.seek(t.offset + start * row_bytes)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self.path}: file is truncated (tensor data past its end)")
        raw = np.frombuffer(buf, dtype=np.uint8).reshape(stop - start, row_bytes)
        out = gguf.quants.dequantize(raw, t.qtype)
        return np.asarray(out, dtype=np.float32).reshape(stop - start, -1)

    def read_into(self, name: str, out: torch.Tensor, spec: tuple[int, torch.Tensor] | None, *,
                  unpermute_head_dim: int = 0) -> None:
        """Dequantize tensor ``name`` (or its rows/columns ``spec = (dim, indices)``) into ``out``.

        ``unpermute_head_dim`` > 0: undo llama.cpp's per-head Q/K row permutation (blocks of whole
        heads are read, so the permutation never straddles a block).
        """
        t = self.tensors[name]
        if len(t.shape) == 1:
            full = torch.from_numpy(self._rows(t, 0, 1).reshape(-1))
            if unpermute_head_dim:
                full = _unpermute(full, unpermute_head_dim)
            out.copy_(full if spec is None else full.index_select(0, spec[1]))
            return
        n_rows, n_cols = t.shape
        step = max(1, _CHUNK_FLOATS // n_cols)
        if unpermute_head_dim:
            step = max(1, step // unpermute_head_dim) * unpermute_head_dim
        if spec is None or spec[0] == 1:
            runs, cols = [(0, n_rows)], None if spec is None else spec[1]
        else:
            from ryzlab.models.hf import _runs

            runs, cols = _runs(spec[1]), None
        pos = 0
        for a, b in runs:
            for s in range(a, b, step):
                e = min(b, s + step)
                block = torch.from_numpy(self._rows(t, s, e))                       # [e - s, n_cols] float32
                if unpermute_head_dim:
                    block = _unpermute(block, unpermute_head_dim)
                if cols is not None:
                    block = block.index_select(1, cols)
                out[pos:pos + (e - s)].copy_(block)
                pos += e - s
        if pos != out.shape[0]:
            raise AssertionError(f"{name}: filled {pos} of {out.shape[0]} rows (shard spec bug)")


def _unpermute(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: per head, rows ``(D/2, 2)`` -> ``(2, D/2)`` (whole heads in ``w``)."""
    rest = w.shape[1:]
    return w.reshape(-1, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=4)
def _check(path: Path, key: tuple[str, int, int]) -> tuple[ModelSource, GGUFCheckpoint]:
    from ryzlab.models.tokenizer import GGUF_TOKENIZER_MODELS

    where = str(path)
    ckpt = GGUFCheckpoint(path)
    meta = ckpt.meta
    cfg = gguf_model_config(meta, set(ckpt.tensors), where)
    if "rope_freqs.weight" in ckpt.tensors:
        t = ckpt.tensors["rope_freqs.weight"]  # [head_dim / 2] float32 frequency divisors: metadata, not a weight
        cfg = _llama3_from_rope_freqs(cfg, ckpt._rows(t, 0, 1).reshape(-1), meta, where)
    tok = meta.get("tokenizer.ggml.model")
    if tok not in GGUF_TOKENIZER_MODELS:
        raise ValueError(f"{where}: tokenizer.ggml.model={tok!r} is not supported; supported: "
                         f"{', '.join(map(repr, GGUF_TOKENIZER_MODELS))}")
    expected = expected_shapes(cfg)
    names = {n: gguf_name(n) for n in expected}
    by_file = {v: k for k, v in names.items()}
    found = {by_file[n]: t.shape for n, t in ckpt.tensors.items() if n in by_file}
    unexpected = [n for n in ckpt.tensors if n not in by_file and n != "rope_freqs.weight"]
    check_shapes(expected, found, names, unexpected, where)
    bad = sorted({t.qtype.name for t in ckpt.tensors.values() if not _dequantizable(t.qtype)})
    if bad:
        raise ValueError(f"{where}: tensor type(s) {bad} cannot be dequantized by the installed gguf package "
                         f"(upgrade it: pip install -U gguf)")
    floats = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    quantized = any(t.qtype.name not in floats for t in ckpt.tensors.values())
    dtype = "float32" if quantized else next((floats[f] for f in ckpt.formats() if f in floats), "float32")
    n_params = sum(math.prod(found[n]) for n in expected)
    stem = path.name[:-len(path.suffix)]
    src = ModelSource(kind="gguf", path=path, config=cfg, name=stem, torch_dtype=dtype, architecture="llama",
                      weight_formats=ckpt.formats(), file_bytes=ckpt.file_bytes, n_params=n_params, files=(path.name,))
    return src, ckpt


def check_gguf_file(path: Path, key: tuple[str, int, int]) -> ModelSource:
    """Validate a GGUF file from its header (cached per path, mtime and size)."""
    return _check(path, key)[0]


def open_gguf_file(path: Path, key: tuple[str, int, int]) -> tuple[ModelSource, GGUFCheckpoint]:
    return _check(path, key)
