"""Model runner: one ragged forward over a paged cache step (prefill chunks and decodes mixed).

The reference model's own ``forward`` takes rectangular ``[B, T]`` batches. A serving step
is ragged: some sequences prefill a chunk of ``n`` tokens while others decode one. The runner
plans the step with :meth:`PagedKVCache.extend` (real token ids, so generated tokens join
the prefix cache too), then runs the model's own layers on the flat ``[1, N, dim]`` token
list with an attention context that writes K/V into the pages and attends over them
(:meth:`PagedKVCache.write` / :meth:`PagedKVCache.attend`). Only the last token of each
sequence goes through the output head: the engine never needs the other logits.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

__all__ = ["ModelRunner"]


class _StepContext:
    """The model's attention hook (``ctx.attend(layer, q, k, v)``) bound to one cache step."""

    def __init__(self, cache: Any, step: Any):
        self.cache, self.step = cache, step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [1, N, H, D], k/v [1, N, Hkv, D] (flat ragged batch)
        self.cache.write(layer, k[0], v[0], step=self.step)
        return self.cache.attend(layer, q[0], step=self.step)[None]  # [1, N, H, D]


class ModelRunner:
    """Runs ``model`` (a :class:`ryzlab.models.transformer.Transformer`) over a :class:`PagedKVCache`."""

    def __init__(self, model: torch.nn.Module, cache: Any):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, seq_ids: Sequence[Hashable], inputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """One step -> logits ``[B, vocab]`` (float32) at the last input token of each sequence.

        ``inputs[b]``: the ids whose K/V this step writes, in order, ending at the newest one;
        the scheduler already gave them slots (``allocate_slots``), so planning cannot fail.
        """
        m = self.model
        step = self.cache.extend(list(seq_ids), None, num_write=[len(x) for x in inputs])
        assert step is not None, "extend() of tokens that already hold slots allocates nothing"
        flat = torch.tensor([t for x in inputs for t in x], dtype=torch.long, device=self.device)  # [N]
        x = m.tok_embeddings(flat)[None]                                                     # [1, N, dim]
        cos, sin = m.rope(step.positions[None].to(self.device), x.dtype)
        ctx = _StepContext(self.cache, step)
        for layer in m.layers:
            x = layer(x, cos, sin, ctx)
        last = torch.tensor([len(t) for t in inputs], device=self.device).cumsum(0) - 1         # [B]
        return m.output(m.norm(x[0, last])).float()                                          # [B, V]
