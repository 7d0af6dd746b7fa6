"""Several machines in one process group: which interface gloo binds to, which rank lives where,
and a failure message that names the node that went away.

On one host every rank reaches every other through loopback. Across machines gloo must advertise
an address the *other* nodes can reach: it binds to ``GLOO_SOCKET_IFNAME`` when set, else to the
address the hostname resolves to, which is often ``127.0.0.1`` (``/etc/hosts``) -- then the
remote ranks try to connect to their own loopback and rendezvous fails with "connection refused".
:func:`choose_gloo_interface` sets ``GLOO_SOCKET_IFNAME`` to the interface that owns this host's
address on the route towards ``MASTER_ADDR`` when the user has not chosen one and the master is
not on loopback. :class:`NodeWatch` records each rank's node address once the group is up, so a collective
that breaks because a whole node died is reported as :class:`NodeLostError` naming that node and
its ranks rather than as a bare socket error.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from typing import Sequence

__all__ = ["local_address_towards", "interface_with_address", "choose_gloo_interface", "NodeWatch",
           "NodeLostError"]

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915


def local_address_towards(addr: str) -> str:
    """This host's source address on the route to ``addr`` (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockname()[0]


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:  # an interface without an IPv4 address (or gone since the listing)
            return None
    return socket.inet_ntoa(raw[20:24])


def interface_with_address(addr: str) -> str | None:
    """The name of the local interface that carries IPv4 ``addr`` (None when none does)."""
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == addr:
            return name
    return None


def choose_gloo_interface(master_addr: str) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME`` for a group whose master is on another address; returns the choice.

    Left alone when the user set it, or when the master is on loopback (one host: gloo's default
    works). Otherwise the interface owning this host's address towards the master: the address
    the other nodes can route back to.
    """
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    try:
        master_ip = socket.gethostbyname(master_addr)
        if ipaddress.ip_address(master_ip).is_loopback:
            return None
        name = interface_with_address(local_address_towards(master_ip))
    except OSError as e:  # unresolvable or unroutable master: gloo's own error will say so
        log.warning("cannot find the interface towards MASTER_ADDR=%s (%s); gloo picks its default", master_addr, e)
        return None
    if name is not None and name != "lo":
        os.environ["GLOO_SOCKET_IFNAME"] = name
        log.info("GLOO_SOCKET_IFNAME=%s (the interface towards MASTER_ADDR=%s)", name, master_addr)
        return name
    return None


class NodeWatch:
    """Each rank's node address and a liveness port, so survivors of a broken collective can tell
    which node went away.

    A gloo error names the peer whose socket closed first, which after a node loss is as often a
    rank on the survivor's own node (it failed a moment earlier, in its own collective with the
    lost node) as a rank of the lost node. So on failure every other rank is probed: each rank
    listens on a port of its node address (a daemon thread accepting and closing connections);
    the kernel closes that port when the process dies (connection refused), and a node cut off
    the network does not answer within ``probe_timeout_s``. A node whose ranks all fail the probe
    is lost.
    """

    def __init__(self, probe_timeout_s: float = 1.0):
        """Collective over the default group: every rank must construct it at the same point."""
        import threading

        import torch.distributed as dist

        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
        try:
            addr = local_address_towards(socket.gethostbyname(master))
        except OSError:  # no route (cannot happen once the group is up): loopback still probes
            addr = "127.0.0.1"
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((addr, 0))
        self._sock.listen(64)
        threading.Thread(target=self._serve, name="ryzlab-node-watch", daemon=True).start()
        table: list[tuple[str, int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(table, (addr, self._sock.getsockname()[1]))
        self.table: list[tuple[str, int]] = [t for t in table if t is not None]
        self.rank = dist.get_rank()
        self.probe_timeout_s = probe_timeout_s

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed: this rank is leaving
                return
            conn.close()

    @property
    def nodes(self) -> list[str]:
        """Node addresses in first-rank order."""
        return list(dict.fromkeys(a for a, _ in self.table))

    def alive(self, rank: int) -> bool:
        try:
            with socket.create_connection(self.table[rank], timeout=self.probe_timeout_s):
                return True
        except OSError:  # refused (process gone) or no answer (node cut off)
            return False

    def lost(self, rounds: int = 4, gap_s: float = 0.25) -> dict[str, list[int]]:
        """Nodes other than this rank's whose every rank fails the probe -> their ranks.

        Up to ``rounds`` probes ``gap_s`` apart: a killed process closes its sockets one by one,
        so the gloo socket that woke us may close a moment before the liveness port does."""
        own = self.table[self.rank][0]
        for i in range(rounds):
            out: dict[str, list[int]] = {}
            for node in self.nodes:
                ranks = [r for r, (a, _) in enumerate(self.table) if a == node]
                if node != own and not any(self.alive(r) for r in ranks):
                    out[node] = ranks
            if out or i == rounds - 1:
                return out
            time.sleep(gap_s)
        return {}

    def describe(self, error: BaseException, where: str) -> NodeLostError | None:
        """A :class:`NodeLostError` naming the lost node(s) and their ranks, or None when every
        other node still has a live rank (then it is not a node loss)."""
        lost = self.lost()
        if not lost:
            return None
        parts = [f"{n} (ranks {', '.join(map(str, r))})" for n, r in lost.items()]
        first = str(error).splitlines()[0] if str(error) else ""
        msg = (f"rank {self.rank} on node {self.table[self.rank][0]}: lost node {'; '.join(parts)} {where} "
               f"(its ranks no longer answer); the collective failed with {type(error).__name__}: {first}")
        return NodeLostError(msg, list(lost))

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already closed
            self._sock.close()


class NodeLostError(RuntimeError):
    """A collective failed because the ranks of one or more other nodes are gone."""

    def __init__(self, message: str, lost: Sequence[str]):
        self.lost = list(lost)
        super().__init__(message)
