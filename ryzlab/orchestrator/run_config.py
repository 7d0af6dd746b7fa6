"""What one orchestrator run is: the knobs a simulated run (:mod:`.sim`), a live run (:mod:`.live`)
and the orchestrator experiment share, each declared once under one name.

:class:`RunFields` is the request stream and the fault timing (what the experiment holds fixed
across its grid); :class:`RunConfig` adds the four axes the experiment sweeps (policy, workers,
load, fault). ``SimConfig`` and ``LiveConfig`` extend :class:`RunConfig` with what only they have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ryzlab.config import check_choice
from ryzlab.orchestrator.balance import POLICY_NAMES, PolicyName
from ryzlab.orchestrator.workload import SIZE_DISTS, SizeDist

__all__ = ["RunFields", "RunConfig", "Fault", "FAULTS"]

Fault = Literal["none", "kill", "pause"]
FAULTS: tuple[str, ...] = get_args(Fault)


@dataclass(frozen=True, kw_only=True)
class RunFields:
    """The request stream and the fault timing of a run."""

    num_requests: int = 2000
    size_dist: SizeDist = "bimodal"
    mean_work_ms: float = 5.0
    """Mean request cost: live, compute on one core; simulated, service time."""
    prefixes: int = 0
    """Distinct prefix keys carried by requests (0: none); prefix_affinity uses them."""
    fault_at: float = 0.4
    """Fraction of the arrival horizon at which worker 0 is killed (SIGKILL) or paused (SIGSTOP)."""
    heartbeat_timeout_s: float = 1.0
    """Live: the floor of the missed-beat timeout (the pool raises it with the measured beat gaps);
    simulated: the time a pause takes to detect."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("size_dist", self.size_dist, SIZE_DISTS)
        if self.num_requests < 1 or self.mean_work_ms <= 0:
            raise ValueError(f"need num_requests >= 1 and mean_work_ms > 0; got {self.num_requests}, "
                             f"{self.mean_work_ms}")


@dataclass(frozen=True, kw_only=True)
class RunConfig(RunFields):
    """One run: a policy on ``workers`` workers at an offered ``load``, with or without a fault."""

    policy: PolicyName = "least_outstanding"
    workers: int = 4
    load: float = 0.5
    """Offered load as a fraction of nominal capacity (workers / mean work; live: min(workers, cores))."""
    fault: Fault = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("policy", self.policy, POLICY_NAMES)
        check_choice("fault", self.fault, FAULTS)
        if self.workers < 1 or not self.load > 0:
            raise ValueError(f"need workers >= 1 and load > 0; got {self.workers}, {self.load}")
        if self.fault != "none" and self.workers < 2:
            raise ValueError("fault injection needs workers >= 2 (someone must take the re-routed work)")
