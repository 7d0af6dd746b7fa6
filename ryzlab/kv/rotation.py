"""Orthogonal rotation of K/V head vectors before quantisation (QuaRot / SpinQuant style).

Trained keys have a few outlier channels (the observation behind KIVI and KVQuant); a scale
shared by one head vector is then set by the outlier and the other channels get few levels.
Rotating each head vector by an orthogonal ``R`` (``x -> x @ R``) spreads an outlier over every
channel, so per-token scales fit again. Attention needs no un-rotation of the cache:

* scores: ``(q R)(k R)^T = q R R^T k^T = q k^T``, so the query is rotated the same way;
* outputs: ``softmax(.) (V R) R^T = softmax(.) V``, so the output is rotated back.

Both touch only this step's queries (``[N, Hq, D]``), never the ``S`` cached keys, so the cost
is independent of the context length. ``R = diag(s) H / sqrt(D)`` with ``H`` the Walsh-Hadamard
matrix (``D`` a power of two) and ``s`` all ones (``hadamard``) or seeded random signs
(``hadamard_signs``, which decorrelates the rotation from any structure in the channels).

:func:`fwht` is the fast transform (``log2 D`` butterfly passes, ``O(D log D)``). For head
vectors of 64 values a dense ``[D, D]`` matmul is one BLAS call and beats the six butterfly
passes (each a few small tensor ops): one SmolLM2-135M decode step's rotations (30 layers x new
K, V, the query and the output, batch 2) measured 0.67 ms as matmuls vs 25 ms as butterflies on
one loaded CPU core (decode step ~500-800 ms). :class:`HeadRotation` therefore builds its matrix
with :func:`fwht` once and applies it with ``matmul``; from ``_FWHT_MIN_DIM`` on it uses
:func:`fwht` (its ``O(D log D)`` work must win somewhere; the threshold is not measured).
"""
from __future__ import annotations

import torch

from ryzlab.config import ROTATIONS, check_choice

__all__ = ["fwht", "hadamard", "HeadRotation"]

_FWHT_MIN_DIM = 512  # head_dim from which the butterfly beats a dense matmul (a guess beyond 256, unmeasured)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform over the last dim (a power of two): ``x @ H / sqrt(D)``.

    Orthogonal and its own inverse (``fwht(fwht(x)) == x`` up to rounding). Sylvester ordering:
    ``H[i, j] = (-1) ** popcount(i & j)``.
    """
    d = x.shape[-1]
    if d & (d - 1) or d == 0:
        raise ValueError(f"fwht needs a power-of-two last dim, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d) * d ** -0.5


def hadamard(d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised ``[d, d]`` Walsh-Hadamard matrix (symmetric, orthogonal)."""
    return fwht(torch.eye(d, dtype=dtype))


class HeadRotation:
    """``R = diag(signs) H / sqrt(D)``, applied to the last dim of ``[..., D]`` head vectors.

    ``apply(x) = x @ R`` (before storing K/V, and on the queries); ``invert(y) = y @ R^T``
    (attention outputs, or K/V read back in the model's basis).
    """

    def __init__(self, kind: str, head_dim: int, seed: int = 0, device: torch.device | str = "cpu"):
        check_choice("rotation", kind, [r for r in ROTATIONS if r != "none"])
        if head_dim & (head_dim - 1):
            raise ValueError(f"rotation needs a power-of-two head_dim, got {head_dim}")
        self.kind, self.head_dim = kind, head_dim
        signs = torch.ones(head_dim)
        if kind == "hadamard_signs":
            g = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (head_dim,), generator=g).float() * 2 - 1
        self.signs = signs.to(device)
        self.matrix = (signs[:, None] * hadamard(head_dim)).to(device)  # [D, D] = diag(s) H
        self._t = self.matrix.t().contiguous()
        self._fast = head_dim >= _FWHT_MIN_DIM

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` in x's dtype (computed in float32)."""
        if self._fast:
            return fwht(x.float() * self.signs).to(x.dtype)
        return (x.float() @ self.matrix).to(x.dtype)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """``y @ R^T`` (R is orthogonal: the exact inverse of :meth:`apply`, up to rounding)."""
        if self._fast:
            return (fwht(y.float()) * self.signs).to(y.dtype)
        return (y.float() @ self._t).to(y.dtype)
