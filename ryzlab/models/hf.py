"""Hugging Face folders: ``config.json`` -> :class:`ModelConfig`, safetensors -> ryzlab parameters.

Supported architectures (:data:`HF_ARCHITECTURES`): ``LlamaForCausalLM`` (Llama 1-3.x, SmolLM,
with ``llama3`` / ``linear`` RoPE scaling, tied embeddings, ``attention_bias`` / ``mlp_bias``),
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v biases). Both the transformers 4.x keys
(``rope_theta``, ``rope_scaling``, ``torch_dtype``) and the 5.x ones (``rope_parameters``,
``dtype``) are read.

Weights are read tensor by tensor through safetensors' memory map, only the rows or columns a
tensor-parallel rank keeps (``get_slice``), copied straight into the target dtype; each file
mapping is closed after its tensor, so the pages of the file that were touched never pile up
next to the materialized weights (peak resident memory ~ final weights + one tensor).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ryzlab.config import ModelConfig
from ryzlab.names import param_renamer
from ryzlab.models.source import ModelSource, check_shapes, expected_shapes

log = logging.getLogger(__name__)

__all__ = ["HF_ARCHITECTURES", "hf_model_config", "rope_fields", "HFCheckpoint", "check_hf_folder", "hf_name"]

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "llama3", "linear")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_BLOCK_BYTES = 16 * 2**20
"""Rows per mapped block: ~16 MiB of float32 (the transient on top of the materialized weights)."""
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer old transformers versions saved


# ----------------------------------------------------------------------------- names
_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
hf_name = param_renamer(_TOP, _LAYER, "model.layers.{layer}.{module}.{kind}", "Hugging Face")
"""ryzlab parameter name -> the Hugging Face Llama-family name (``layers.0.attention.wq.weight``
-> ``model.layers.0.self_attn.q_proj.weight``)."""


# ----------------------------------------------------------------------------- config
def rope_fields(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """RoPE fields of ModelConfig from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in _ROPE_TYPES:
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported; supported: "
                         f"{', '.join(map(repr, _ROPE_TYPES))}")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   rope_original_max_seq_len=int(params["original_max_position_embeddings"]))
    elif kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
    if float(cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={cfg.get('partial_rotary_factor')} is not supported "
                         f"(ryzlab rotates the whole head)")
    return out


def hf_model_config(cfg: dict[str, Any], where: str = "config.json") -> tuple[ModelConfig, str, int | None]:
    """``config.json`` contents -> (ModelConfig, architecture, sliding window or None).

    Raises ``ValueError`` naming the supported architectures / features.
    """
    archs = cfg.get("architectures") or ([_MODEL_TYPES[cfg["model_type"]]] if cfg.get("model_type") in _MODEL_TYPES
                                         else [])
    arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{where}: architecture {archs or cfg.get('model_type')!r} is not supported; supported: "
                         f"{', '.join(HF_ARCHITECTURES)} (and GGUF files of architecture 'llama')")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported; ryzlab's MLP is SwiGLU ('silu')")
    try:
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        rope = rope_fields(cfg, where)
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = cfg.get("sliding_window")
        elif arch == "Qwen2ForCausalLM":
            types = cfg.get("layer_types") or []
            if cfg.get("use_sliding_window") or "sliding_attention" in types:
                sliding = cfg.get("sliding_window")
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        if sliding:
            log.warning("%s: %s uses sliding-window attention (window %d); ryzlab attends the full context, so it "
                        "is exact only up to %d tokens: max_seq_len capped at %d", where, arch, sliding, sliding,
                        min(max_pos, sliding))
            max_pos = min(max_pos, int(sliding))
        attn_bias = bool(cfg.get("attention_bias", False))
        mc = ModelConfig(
            vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or dim // n_heads), ffn_dim=int(cfg["intermediate_size"]),
            max_seq_len=max_pos, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attn_bias, o_bias=attn_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            **rope)
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r} that {arch} needs") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return mc, arch, int(sliding) if sliding else None


# ----------------------------------------------------------------------------- safetensors
def _header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): names,
    dtypes, shapes, offsets. No tensor data is read."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


class HFCheckpoint:
    """The safetensors files of one folder: where each tensor is, its dtype and shape (from headers)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise ValueError(f"{folder}: {index.name} lists {len(missing)} shard(s) that are not there: "
                                 f"{missing[:4]}")
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise ValueError(f"{folder}: no *.safetensors weights" + (
                f" (found {other[:3]}: ryzlab reads safetensors only; re-save with "
                f"model.save_pretrained(folder, safe_serialization=True))" if other else ""))
        self.files = tuple(files)
        self.tensors: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        """file tensor name -> (file, safetensors dtype, shape)"""
        for f in files:
            for name, info in _header(folder / f).items():
                self.tensors[name] = (f, info["dtype"], tuple(info["shape"]))
        self.file_bytes = sum((folder / f).stat().st_size for f in files)

    def formats(self) -> tuple[str, ...]:
        return tuple(k for k, _ in Counter(d for _, d, _ in self.tensors.values()).most_common())

    def read_into(self, name: str, out: torch.Tensor, spec: tuple[int, torch.Tensor] | None) -> None:
        """Copy tensor ``name`` (a file name), or its rows/columns ``spec = (dim, indices)``, into ``out``.

        Rows are read through safetensors' memory map in blocks of about 16 MiB, the file mapped
        afresh for each block: a mapped page counts as resident until it is unmapped, so holding
        one mapping for a whole tensor (an embedding matrix is the largest) would add that tensor
        to the peak. ``copy_`` converts to ``out``'s dtype in the same pass.
        """
        from safetensors import safe_open

        file, _, shape = self.tensors[name]
        path = str(self.folder / file)
        row_bytes = 4 * (math.prod(shape[1:]) if len(shape) > 1 else 1)
        step = max(1, _BLOCK_BYTES // row_bytes)
        if spec is None or spec[0] == 1 or len(shape) == 1:
            runs = [(0, shape[0])] if len(shape) > 1 else [(0, 1)]
        else:
            runs = _runs(spec[1])
        pos = 0
        for a, b in runs:
            for s in range(a, b, step):
                e = min(b, s + step)
                with safe_open(path, framework="pt") as f:
                    # the views into the map die inside _copy_block, before the file is unmapped
                    pos += _copy_block(f.get_slice(name), out, pos, s, e, spec, len(shape), name)
        if pos != (out.shape[0] if len(shape) > 1 else 1):
            raise AssertionError(f"{name}: filled {pos} rows of {tuple(out.shape)} (shard spec bug)")


def _copy_block(sl: Any, out: torch.Tensor, pos: int, a: int, b: int, spec: tuple[int, torch.Tensor] | None,
                ndim: int, name: str) -> int:
    """Rows ``[a, b)`` of the file tensor (only ``spec``'s columns for a row-parallel shard) -> ``out[pos:]``."""
    if ndim == 1:  # a bias or a norm: small, read whole, indexed for a shard
        src = sl[:]
        src = src if spec is None else src.index_select(0, spec[1])
        if tuple(src.shape) != tuple(out.shape):
            raise AssertionError(f"{name}: read {tuple(src.shape)} into {tuple(out.shape)} (shard spec bug)")
        out.copy_(src)
        return 1
    if spec is not None and spec[0] == 1:
        parts = [sl[a:b, c0:c1] for c0, c1 in _runs(spec[1])]
        src = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    else:
        src = sl[a:b]
    if tuple(src.shape) != tuple(out[pos:pos + b - a].shape):
        raise AssertionError(f"{name}: read {tuple(src.shape)} into {tuple(out[pos:pos + b - a].shape)} "
                             f"(shard spec bug)")
    out[pos:pos + b - a].copy_(src)
    return b - a


def _runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted indices -> contiguous ``[start, stop)`` runs (shard specs are head / column ranges)."""
    vals = idx.tolist()
    runs: list[tuple[int, int]] = []
    for v in vals:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


@functools.lru_cache(maxsize=8)
def _check(folder: Path, key: tuple[str, int, int]) -> tuple[ModelSource, HFCheckpoint]:
    where = str(folder / "config.json")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    mc, arch, sliding = hf_model_config(cfg, where)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer.json; ryzlab reads the fast-tokenizer file (save it with "
                         f"AutoTokenizer.from_pretrained(...).save_pretrained(folder)); tokenizer.model "
                         f"(sentencepiece) alone is not supported")
    ckpt = HFCheckpoint(folder)
    expected = expected_shapes(mc)
    names = {n: hf_name(n) for n in expected}
    by_file = {v: k for k, v in names.items()}
    found = {by_file[t]: s for t, (_, _, s) in ckpt.tensors.items() if t in by_file}
    unexpected = [t for t in ckpt.tensors if t not in by_file and not _IGNORED.search(t)
                  and not (mc.tie_embeddings and t == "lm_head.weight")]
    check_shapes(expected, found, names, unexpected, str(folder))
    bad_dtypes = sorted({d for t, (_, d, _) in ckpt.tensors.items() if t in by_file} - set(_SAFETENSORS_DTYPES))
    if bad_dtypes:
        raise ValueError(f"{folder}: weights stored as {bad_dtypes}; supported: {sorted(_SAFETENSORS_DTYPES)}")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or _SAFETENSORS_DTYPES[ckpt.formats()[0]]
    n_params = sum(found[n][0] * (found[n][1] if len(found[n]) > 1 else 1) for n in expected)
    src = ModelSource(kind="hf", path=folder, config=mc, name=folder.resolve().name, torch_dtype=str(dtype),
                      architecture=arch, sliding_window=sliding, weight_formats=ckpt.formats(),
                      file_bytes=ckpt.file_bytes, n_params=n_params, files=ckpt.files)
    return src, ckpt


def check_hf_folder(folder: Path, key: tuple[str, int, int]) -> ModelSource:
    """Validate a Hugging Face folder from its config.json and safetensors headers (cached per mtime)."""
    return _check(folder, key)[0]


def open_hf_folder(folder: Path, key: tuple[str, int, int]) -> tuple[ModelSource, HFCheckpoint]:
    return _check(folder, key)
