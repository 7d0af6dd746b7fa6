"""The model a projection needs: its shape only, from anything ``--model`` takes today or from a
folder holding nothing but a Hugging Face ``config.json`` (no weights, no tokenizer).

Six public configs ship with ryzlab (``ryzlab/projection/configs/<name>/config.json``): they can
be named by folder or by their short name (``llama-3-8b``), so Llama-2-7B / 70B, Llama-3-8B /
70B, Mistral-7B and Qwen2-7B project without downloading anything.
"""
from __future__ import annotations

import json
from pathlib import Path

from ryzlab.config import ModelConfig

__all__ = ["CONFIGS_DIR", "shipped_models", "load_shape"]

CONFIGS_DIR = Path(__file__).with_name("configs")


def shipped_models() -> list[str]:
    """Short names of the shipped config-only folders."""
    return sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "config.json").is_file())


def load_shape(spec: str) -> tuple[ModelConfig, str]:
    """``(shape, label)`` of a model: a shipped short name, a folder with a ``config.json``
    (weights optional), or what :func:`ryzlab.models.check_model` takes ('reference', a .gguf ...).

    Raises ``ValueError`` naming the shipped models and the accepted forms.
    """
    from ryzlab.models.hf import hf_model_config

    folder = CONFIGS_DIR / spec if spec in shipped_models() else Path(spec).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        where = str(folder / "config.json")
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        return hf_model_config(cfg, where)[0], folder.name
    from ryzlab.models import check_model

    try:
        return check_model(spec).config, Path(spec).name or spec
    except ValueError as e:
        raise ValueError(f"{e}\n(ryzlab project also takes a folder holding only config.json, or a shipped "
                         f"config: {', '.join(shipped_models())})") from None
