"""What a ``--model`` string names, checked before any weight is read: :func:`check_model`.

``reference`` (the shipped byte-level checkpoint), ``random`` (a seeded random
:class:`ryzlab.models.transformer.Transformer`), a Hugging Face folder (``config.json`` + ``*.safetensors``)
or a ``.gguf`` file. :func:`check_model` reads only metadata — ``config.json``, safetensors
headers (the JSON at the start of each file) or a GGUF header — and raises one ``ValueError``
naming what is supported, so a sweep rejects a bad point before any process starts.

It dispatches to the format readers (:mod:`.hf`, :mod:`.gguf`), which build on :mod:`.source`:
this module sits above them, so the readers never import back.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ryzlab.config import ModelConfig
from ryzlab.models.gguf import check_gguf_file
from ryzlab.models.hf import check_hf_folder
from ryzlab.models.source import ModelKind, ModelSource, bad_model_spec, file_key, num_params

__all__ = ["check_model"]


def check_model(spec: str) -> ModelSource:
    """Validate a model spec and describe it, reading only metadata (never a weight).

    Raises ``ValueError`` (message names :data:`MODEL_CHOICES`, and the supported architectures
    when the architecture is the problem) for: a spec that is neither a keyword nor an existing
    path, a folder without ``config.json`` or safetensors, an unsupported architecture or
    feature, weights whose names/shapes do not match the config, a missing tokenizer.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise bad_model_spec(spec, f"got a {type(spec).__name__}")
    if isinstance(spec, str) and spec in ("reference", "random"):
        return _keyword(spec)
    text = os.fspath(spec)
    if not text:
        raise bad_model_spec(spec, "empty")
    path = Path(text).expanduser()
    if not path.exists():
        raise bad_model_spec(spec, f"no such file or folder ({path.resolve()})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise bad_model_spec(spec, f"folder {path} has no config.json")
        return check_hf_folder(path, file_key(path / "config.json"))
    if path.suffix.lower() == ".gguf":
        return check_gguf_file(path, file_key(path))
    if path.suffix == ".safetensors":
        return _ryzlab_checkpoint(spec, path)
    raise bad_model_spec(spec, f"{path.name} is a file but neither a .gguf file nor a ryzlab .safetensors checkpoint")


def _ryzlab_checkpoint(spec: object, path: Path, kind: ModelKind = "checkpoint", name: str | None = None) -> ModelSource:
    """A checkpoint written by :func:`ryzlab.models.transformer.save_checkpoint` (its config in ``<stem>.json``)."""
    from ryzlab.config import ConfigError, from_dict

    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = from_dict(ModelConfig, meta["config"], where=str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        raise bad_model_spec(spec, f"{path.name} is a .safetensors file without a readable ryzlab {meta_path.name} "
                         f"beside it ({detail}); a Hugging Face checkpoint is the folder") from None
    return ModelSource(kind=kind, path=path, config=cfg, name=name or path.stem,
                       torch_dtype=meta.get("weights_dtype", "bfloat16"), weight_formats=(meta.get("weights_dtype", ""),),
                       file_bytes=path.stat().st_size, files=(path.name,),
                       n_params=num_params(cfg))


@functools.lru_cache(maxsize=2)
def _keyword(spec: str) -> ModelSource:
    from ryzlab.models.transformer import REFERENCE_CHECKPOINT

    if spec == "random":
        cfg = ModelConfig()
        return ModelSource(kind="random", path=None, config=cfg, name="random", torch_dtype="float32",
                           n_params=num_params(cfg))
    return _ryzlab_checkpoint(spec, REFERENCE_CHECKPOINT, "reference", "ryzlab-reference")
