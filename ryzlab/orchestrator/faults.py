"""Faults of workers, without processes: what a fault is, how a missed beat is judged, how
stranded work is re-routed.

Shared by the live pool (:mod:`.pool`, under :class:`~ryzlab.orchestrator.workers.WorkerPool` and
the serving router) and the simulator (:mod:`.sim`), which must judge and re-route exactly as the
live pool does but has no threads or processes:

* :class:`FaultRecord`: one fault of one worker incarnation (injection, detection, replacement
  ready, recovery), all times on the pool's monotonic clock;
* :class:`BeatGaps`: the heartbeat gaps measured so far -> the missed-beat timeout;
* :func:`reroute`: the one re-route step (at most ``max_attempts`` tries per unit, never dropped);
* ``InjectKind``: the faults a run can inject (``kill``: SIGKILL, ``pause``: SIGSTOP).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, TypeVar, get_args

from ryzlab.analysis import percentiles

__all__ = ["FaultRecord", "BeatGaps", "reroute", "InjectKind", "INJECT_KINDS", "HEARTBEAT_FACTOR"]

InjectKind = Literal["kill", "pause"]
INJECT_KINDS: tuple[str, ...] = get_args(InjectKind)
HEARTBEAT_FACTOR = 4.0
"""Timeout = this many times the p99 beat gap (or the nominal interval, if larger)."""

U = TypeVar("U")


def reroute(policy: Any, failed: int, stranded: Iterable[U], *, attempts: Callable[[U], int],
            max_attempts: int, send: Callable[[U], Any], give_up: Callable[[U], Any]) -> tuple[list[U], list[U]]:
    """The one re-route step (live pool, router, simulator): ``failed``'s cache is gone, so the
    policy forgets its prefixes; then each stranded unit is sent again (``send``: the policy's
    pick, or a wait when none is healthy) unless it already had ``max_attempts`` tries
    (``give_up``: reported failed, never dropped). Returns (re-sent, given up)."""
    if hasattr(policy, "forget_worker"):
        policy.forget_worker(failed)
    sent, gave_up = [], []
    for u in stranded:
        if attempts(u) >= max_attempts:
            gave_up.append(u)
            give_up(u)
        else:
            sent.append(u)
            send(u)
    return sent, gave_up


class BeatGaps:
    """Heartbeat gaps measured across the pool's workers -> the missed-beat timeout.

    ``timeout() = max(floor_s, factor * max(interval_s, p99 of the last window gaps))``: on an idle
    machine the floor rules; when load stretches the gaps, the timeout follows them.
    """

    def __init__(self, floor_s: float, interval_s: float, *, factor: float = HEARTBEAT_FACTOR,
                 window: int = 2048):
        if not 0 < interval_s < floor_s:
            raise ValueError(f"need 0 < heartbeat interval < heartbeat timeout, got {interval_s}, {floor_s}")
        self.floor_s, self.interval_s, self.factor = floor_s, interval_s, factor
        self._gaps: deque[float] = deque(maxlen=window)
        self._timeout: float | None = None

    def add(self, gap_s: float) -> None:
        if gap_s >= 0:
            self._gaps.append(gap_s)
            self._timeout = None

    @property
    def count(self) -> int:
        return len(self._gaps)

    def p99(self) -> float:
        return percentiles(self._gaps, (99,))["p99"]

    def timeout(self) -> float:
        if self._timeout is None:
            p99 = self.p99() if self._gaps else 0.0
            self._timeout = max(self.floor_s, self.factor * max(self.interval_s, p99))
        return self._timeout


@dataclass
class FaultRecord:
    """One fault of one worker incarnation, all times on the pool's monotonic clock."""

    worker: int
    kind: str
    """``kill`` / ``pause`` (injected) or ``detected`` (not injected: crash, hang, false positive)."""
    fault_t: float
    """Injection time; for faults that were not injected, the detection time."""
    detect_t: float | None = None
    reason: str = ""
    rerouted: list = field(default_factory=list)
    """Units the worker held (re-sent, or reported failed when out of attempts)."""
    ready_t: float | None = None
    """The replacement reported ready."""
    recover_t: float | None = None
    """Replacement ready and every re-routed unit finished (set by pools that track units)."""
    timeout_s: float | None = None
    """The missed-beat timeout in force at detection."""
    incarnation: int = 0
