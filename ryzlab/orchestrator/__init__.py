"""Multi-device orchestration: launch + process groups, health, placement, balancing, stats, faults."""
from .balance import (POLICY_NAMES, LeastOutstanding, PolicyName, PowerOfTwo, PrefixAffinity, Request,
                      RoundRobin, WorkerView, make_policy)
from .launch import (DistContext, LaunchError, LaunchTimeoutError, RankFailedError, choose_backend,
                     init_from_env, launch)

__all__ = [
    "launch", "init_from_env", "choose_backend", "DistContext", "LaunchError", "RankFailedError",
    "LaunchTimeoutError",
    "make_policy", "POLICY_NAMES", "PolicyName", "WorkerView", "Request", "RoundRobin",
    "LeastOutstanding", "PowerOfTwo", "PrefixAffinity",
]
