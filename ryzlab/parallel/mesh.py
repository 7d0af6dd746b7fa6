"""The tp x cp device mesh of one model replica, with a counted :class:`Comm` per dimension.

``init_parallel(ParallelConfig(tp=2, cp=2))`` inside a process group of ``tp * cp`` ranks (started
by :func:`ryzlab.orchestrator.launch` or ``torchrun``) builds torch's ``DeviceMesh``
(``init_device_mesh``, dims ``("cp", "tp")``: gloo on CPU, nccl on CUDA) and returns
:class:`ParallelGroups`. Without a process group, or at world size 1, every group is a one-rank
no-op, so world size 1 runs the same code. The control group (a gloo group even under nccl,
vLLM's "CPU group") carries the engine's per-step plan as pickled bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ryzlab.config import ParallelConfig
from ryzlab.parallel.comm import Comm

__all__ = ["ParallelGroups", "init_parallel", "CONTROL_TIMEOUT_S"]

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 7 * 24 * 3600.0
"""How long a rank waits in the control group for the next plan (an idle server); a dead driver
is noticed at once anyway (its sockets close, and ranks exit with their launcher)."""


@dataclass
class ParallelGroups:
    """This rank's place in the mesh and one counted communicator per dimension."""

    parallel: ParallelConfig
    rank: int
    tp: Comm
    cp: Comm
    control: Comm
    """All ranks of the replica, gloo: step plans (CPU objects) go through it."""
    device: torch.device
    mesh: Any = None
    """torch ``DeviceMesh`` (None at world size 1)."""

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def cp_rank(self) -> int:
        return self.cp.rank

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules; every rank executes."""
        return self.rank == 0

    def comms(self) -> list[Comm]:
        return [self.tp, self.cp, self.control]

    def reset_ledgers(self) -> None:
        for c in self.comms():
            c.ledger.reset()


def init_parallel(parallel: ParallelConfig, device: str | torch.device | None = None) -> ParallelGroups:
    """Build the ``cp x tp`` mesh over the current process group (which must have ``tp * cp`` ranks).

    ``device``: where this rank computes (default ``cuda:<current>`` under nccl, else ``cpu``).
    """
    ws = parallel.world_size
    if not (dist.is_available() and dist.is_initialized()):
        if ws != 1:
            raise ValueError(f"tp={parallel.tp} x cp={parallel.cp} needs a process group of {ws} ranks; "
                             f"start the ranks with ryzlab.orchestrator.launch or torchrun")
        local = Comm(local=True)
        return ParallelGroups(parallel, 0, local, Comm(local=True), Comm(local=True),
                              torch.device(device or "cpu"))
    if dist.get_world_size() != ws:
        raise ValueError(f"tp={parallel.tp} x cp={parallel.cp} = {ws} ranks, but the process group has "
                         f"{dist.get_world_size()}")
    backend = dist.get_backend()
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))
    if ws == 1:
        return ParallelGroups(parallel, 0, Comm(local=True), Comm(local=True), Comm(local=True), dev)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (parallel.cp, parallel.tp), mesh_dim_names=("cp", "tp"))
    # torch gives the mesh's groups its backend default (30 min under gloo), not the process
    # group's timeout: a rank whose peer node vanished without a connection reset would wait that
    # long inside a tp/cp collective. They get the default group's timeout instead.
    timeout = _default_group_timeout(dev)
    if timeout is not None:
        for dim in ("tp", "cp"):
            dist.distributed_c10d._set_pg_timeout(timeout, mesh.get_group(dim))
    # its own gloo group: CPU objects even under nccl, and a long timeout because the other
    # ranks wait in it for the driver's next plan while a server is idle
    control = Comm(dist.new_group(list(range(ws)), backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S)))
    groups = ParallelGroups(parallel, dist.get_rank(), Comm(mesh.get_group("tp")), Comm(mesh.get_group("cp")),
                            control, dev, mesh)
    if parallel.cpu_comm == "shm":
        if dev.type != "cpu":
            raise ValueError(f"cpu_comm='shm' is for CPU ranks, but this rank computes on {dev}; choose one of "
                             f"cpu_comm='gloo' (the backend's own collectives) or CPU ranks")
        for c in (groups.tp, groups.cp, control):   # the same order on every rank: each call is collective
            c.use_shm(timeout)
    log.debug("rank %d: tp rank %d/%d, cp rank %d/%d on %s", groups.rank, groups.tp_rank, parallel.tp,
              groups.cp_rank, parallel.cp, dev)
    return groups


def _default_group_timeout(dev: torch.device) -> timedelta | None:
    """The collective timeout the default process group was created with (None where unreadable)."""
    try:
        return dist.distributed_c10d._get_default_group()._get_backend(dev).options._timeout
    except (AttributeError, RuntimeError) as e:  # a backend without options: keep torch's default
        log.debug("default group timeout unreadable (%s)", e)
        return None
