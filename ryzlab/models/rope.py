"""Rotary position embedding (RoPE): frequencies, cos/sin at integer positions, the rotation.

One implementation for the model (:class:`ryzlab.models.transformer.Transformer` applies it to
q and k in every attention layer) and for anything that must recompute or undo it (a cache that
stores keys before RoPE receives these functions from its caller). Positions are integers and
cos/sin are computed on the fly, so no ``max_seq_len`` table bounds the context. The layout is
Hugging Face's "rotate_half": the two halves of ``head_dim`` are the pair rotated together.
"""
from __future__ import annotations

import math

import torch

from ryzlab.config import ModelConfig

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "RopeFn"]


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]`` (float32), with the config's frequency scaling.

    ``llama3``: wavelengths longer than ``original_max / low_freq_factor`` are divided by
    ``factor``, shorter than ``original_max / high_freq_factor`` kept, and the band between
    interpolated smoothly (Llama 3.1's rule, as transformers' ``_compute_llama3_parameters``).
    ``linear``: every frequency divided by ``factor`` (position interpolation).
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        low_wavelen = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for integer ``positions`` [...] -> two tensors [..., head_dim] (HF "rotate_half" layout).

    ``inv_freq`` [head_dim / 2] from :func:`rope_inv_freq` (the model keeps it in float32).
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [..., D/2]
    emb = torch.cat([freqs, freqs], dim=-1)                                           # [..., D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] (or broadcastable). ``-sin`` undoes the rotation."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class RopeFn:
    """The model's RoPE at given positions: ``rope(positions, dtype) -> (cos, sin)`` ``[..., head_dim]``.

    Holds the frequencies in float32 (``model.to(bfloat16)`` must not round them; transformers
    keeps them in float32 too) and moves them to the positions' device on first use there.
    """

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor):
        self.config, self.inv_freq = cfg, inv_freq

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = rope_inv_freq(self.config, positions.device)
        return rope_cos_sin(positions, self.inv_freq, dtype)
