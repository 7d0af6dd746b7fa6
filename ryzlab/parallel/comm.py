"""Collectives of one process group (a mesh dimension), each one counted as it is issued.

:class:`Comm` wraps the ``torch.distributed`` calls tensor and context parallelism make
(``all_reduce`` after row-parallel layers, ``all_gather`` of attention partials, ``send``/``recv``
of migrated blocks, ``broadcast`` of an engine step's plan). Every call records, per rank and
per step label, the bytes of the tensors this rank actually handed to the call and the number
of calls: a *measurement* of what the code sends, read off the real tensors at the call site,
which the scaling experiment compares with the closed-form formulas in
:mod:`ryzlab.parallel.layout`.

With ``world_size == 1`` (or no process group) every collective is a no-op that returns the
local answer, so world size 1 runs the same code path and records zero bytes.
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["CommRecord", "CommLedger", "Comm"]

log = logging.getLogger(__name__)


@dataclass
class CommRecord:
    """Totals for one step label on one rank."""

    bytes_sent: int = 0
    """Bytes of the tensors this rank handed to collectives / sends (its contribution)."""
    bytes_received: int = 0
    """Bytes this rank got from other ranks."""
    collectives: int = 0
    seconds: float = 0.0
    wire_bytes_sent: int = 0
    """Bytes the rank process passed to write/send syscalls during the calls (Linux
    ``/proc/self/io`` ``wchar``): what the backend really put on the wire, its headers and
    algorithm (a ring all-gather forwards ``world_size - 1`` chunks) included. 0 where unreadable."""


@dataclass
class CommLedger:
    """Per-step-label communication totals of one rank, plus how many steps each label saw."""

    records: dict[str, CommRecord] = field(default_factory=lambda: defaultdict(CommRecord))
    steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def per_step(self, label: str) -> dict[str, float]:
        """Average bytes and collectives per step of ``label`` (0 when the label never ran)."""
        n = max(self.steps.get(label, 0), 1)
        r = self.records.get(label, CommRecord())
        return {"bytes_sent": r.bytes_sent / n, "bytes_received": r.bytes_received / n,
                "collectives": r.collectives / n, "seconds": r.seconds / n, "wire_bytes_sent": r.wire_bytes_sent / n}

    def reset(self) -> None:
        self.records.clear()
        self.steps.clear()


def _wchar() -> int:
    """Bytes this process has passed to write/send syscalls so far (0 where /proc is absent)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Comm:
    """The process group seen by one rank, with a :class:`CommLedger` of what it sent."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, local: bool = False):
        """``group``: the process group (default: the global one); ``local=True``: a one-rank
        group even inside a launch (a single-rank reference next to the sharded cache)."""
        self.group = group
        active = not local and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if active else 0
        self.world_size = dist.get_world_size(group) if active else 1
        self.ledger = CommLedger()
        self._label = "untracked"
        self.shm = None
        """A :class:`ryzlab.parallel.shm.ShmChannel` carrying all_reduce (sum) / all_gather / barrier
        (``cpu_comm="shm"``), else None: gloo carries everything."""

    @property
    def transport(self) -> str:
        """What carries this group's all-reduces and all-gathers: ``none`` (one rank), ``shm``, or the
        torch backend."""
        if self.world_size == 1:
            return "none"
        return "shm" if self.shm is not None else dist.get_backend(self.group)

    def use_shm(self, timeout=None) -> bool:
        """Collective over the group: carry all_reduce / all_gather / barrier through shared memory
        (ranks on one x86 host); False (gloo kept, logged as a fallback) where any rank cannot."""
        from ryzlab.parallel.shm import open_channel

        if self.world_size > 1:
            self._shm_timeout = timeout
            self.shm = open_channel(self.group, self.rank, self.world_size, timeout=timeout)
        return self.shm is not None

    def _shm_for(self, nbytes: int):
        """The channel, regrown (collectively: every rank asks for the same size) when too small."""
        if self.shm is not None and not self.shm.fits(nbytes):
            from ryzlab.parallel.shm import open_channel

            old, self.shm = self.shm, None
            self.shm = open_channel(self.group, self.rank, self.world_size, capacity=max(2 * old.capacity, nbytes),
                                    timeout=self._shm_timeout)
            old.close()
        return self.shm

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Attribute collectives inside the block to one step of ``label``."""
        prev, self._label = self._label, label
        self.ledger.steps[label] += 1
        try:
            yield
        finally:
            self._label = prev

    def _record(self, sent: int, received: int, t0: float, w0: int) -> None:
        r = self.ledger.records[self._label]
        r.bytes_sent += sent
        r.bytes_received += received
        r.collectives += 1
        r.seconds += time.perf_counter() - t0
        r.wire_bytes_sent += _wchar() - w0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Stack every rank's ``t`` (same shape everywhere): ``[world_size, *t.shape]``."""
        if self.world_size == 1:
            return t.unsqueeze(0)
        flat = t.contiguous().reshape(-1)
        out = torch.empty(self.world_size * flat.numel(), dtype=t.dtype, device=t.device)
        w0, t0 = _wchar(), time.perf_counter()
        shm = self._shm_for(self._nbytes(flat))
        if shm is not None:
            shm.all_gather_(flat, out)
        else:
            _all_gather_single(out, flat, group=self.group)
        self._record(self._nbytes(t), self._nbytes(t) * (self.world_size - 1), t0, w0)
        return out.view(self.world_size, *t.shape)

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce of ``t``; returns it."""
        if self.world_size == 1:
            return t
        w0, t0 = _wchar(), time.perf_counter()
        shm = self._shm_for(self._nbytes(t)) if op == dist.ReduceOp.SUM and t.is_contiguous() else None
        if shm is not None:
            shm.all_reduce_(t)
        else:
            dist.all_reduce(t, op=op, group=self.group)
        self._record(self._nbytes(t), self._nbytes(t), t0, w0)
        return t

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Point-to-point send to group rank ``dst``."""
        if dst == self.rank:
            raise ValueError(f"rank {self.rank} cannot send to itself")
        w0, t0 = _wchar(), time.perf_counter()
        dist.send(t.contiguous(), self._global(dst), group=self.group)
        self._record(self._nbytes(t), 0, t0, w0)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``t`` from group rank ``src``."""
        if src == self.rank:
            raise ValueError(f"rank {self.rank} cannot receive from itself")
        w0, t0 = _wchar(), time.perf_counter()
        dist.recv(t, self._global(src), group=self.group)
        self._record(0, self._nbytes(t), t0, w0)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from group rank ``src`` on every rank (pickled; the ranks trust each other).

        Two collectives (length, then bytes) so the payload size is known and counted. Used by
        the engine's driver rank to hand each step's plan to the ranks that execute it.
        """
        if self.world_size == 1:
            return obj
        gsrc = self._global(src)
        w0, t0 = _wchar(), time.perf_counter()
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            n = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, gsrc, group=self.group)
        if self.rank != src:
            data = torch.empty(int(n.item()), dtype=torch.uint8)
        dist.broadcast(data, gsrc, group=self.group)
        sent = self._nbytes(data) + 8 if self.rank == src else 0
        self._record(sent, 0 if self.rank == src else self._nbytes(data) + 8, t0, w0)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.shm is not None:
                self.shm.barrier()
            else:
                dist.barrier(group=self.group)
