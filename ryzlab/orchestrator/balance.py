"""Load-balancing policies: pick a worker for a request from what the router can see.

A policy is a small class with ``choose(request, workers) -> int | None``:

* ``workers`` is a sequence of anything with ``outstanding`` (requests sent and not yet
  answered) and ``healthy`` (bool) attributes -- :class:`WorkerView` here, the serving
  engine's workers, or the simulator's servers. The same policy object runs in live runs and
  in :mod:`ryzlab.orchestrator.sim`;
* ``request`` is anything with an optional ``prefix_key`` attribute (a hashable, e.g. the
  hash of the prompt's first blocks); only the affinity policy looks at it;
* the return value is an index into ``workers``; ``None`` means no healthy worker (an
  expected shortage the caller handles by waiting or failing the request).

Policies:

``round_robin``       next healthy worker in turn; blind to load (the baseline).
``least_outstanding`` the healthy worker with the fewest outstanding requests (join-shortest-
                      queue); ties broken at random so equal workers share the load.
``power_of_two``      sample two distinct healthy workers, keep the less loaded one
                      (Mitzenmacher's "power of two choices": nearly JSQ with O(1) state reads).
``prefix_affinity``   send a request to the worker that last served its prefix (its KV blocks
                      are cached there) unless that worker is overloaded: when its outstanding
                      count exceeds the least-loaded worker's by more than ``abs_threshold``
                      *and* by a factor ``rel_threshold``, fall back to least-loaded and move
                      the prefix there. Requests without a prefix go least-loaded.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Literal, Protocol, Sequence, get_args

__all__ = ["PolicyName", "POLICY_NAMES", "make_policy", "WorkerView", "Request", "RoundRobin",
           "LeastOutstanding", "PowerOfTwo", "PrefixAffinity", "Policy"]

PolicyName = Literal["round_robin", "least_outstanding", "power_of_two", "prefix_affinity"]
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)


class WorkerLike(Protocol):
    outstanding: int
    healthy: bool


@dataclass
class WorkerView:
    """The router's view of one worker."""

    outstanding: int = 0
    healthy: bool = True


@dataclass(frozen=True)
class Request:
    """A unit of work: ``size`` in work units (sim: service time; live: compute amount)."""

    id: int
    size: float = 1.0
    prefix_key: Hashable | None = None


def _healthy(workers: Sequence[WorkerLike]) -> list[int]:
    return [i for i, w in enumerate(workers) if w.healthy]


def _least_loaded(workers: Sequence[WorkerLike], candidates: list[int], rng: random.Random) -> int:
    low = min(workers[i].outstanding for i in candidates)
    ties = [i for i in candidates if workers[i].outstanding == low]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


class RoundRobin:
    name = "round_robin"

    def __init__(self, seed: int = 0):
        self._next = 0

    def choose(self, request: Any, workers: Sequence[WorkerLike]) -> int | None:
        n = len(workers)
        for step in range(n):
            i = (self._next + step) % n
            if workers[i].healthy:
                self._next = i + 1
                return i
        return None


class LeastOutstanding:
    name = "least_outstanding"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: Any, workers: Sequence[WorkerLike]) -> int | None:
        ok = _healthy(workers)
        return _least_loaded(workers, ok, self._rng) if ok else None


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: Any, workers: Sequence[WorkerLike]) -> int | None:
        ok = _healthy(workers)
        if len(ok) <= 2:
            return _least_loaded(workers, ok, self._rng) if ok else None
        a, b = self._rng.sample(ok, 2)
        if workers[a].outstanding == workers[b].outstanding:
            return a  # already a random pick
        return a if workers[a].outstanding < workers[b].outstanding else b


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, seed: int = 0, *, abs_threshold: int = 4, rel_threshold: float = 1.5,
                 capacity: int = 65536):
        if abs_threshold < 0 or rel_threshold < 1.0 or capacity < 1:
            raise ValueError(f"need abs_threshold >= 0, rel_threshold >= 1, capacity >= 1; got "
                             f"{abs_threshold}, {rel_threshold}, {capacity}")
        self._rng = random.Random(seed)
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.capacity = capacity
        # prefix -> worker index, LRU-bounded so a long run does not grow without limit
        self._owner: OrderedDict[Hashable, int] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0

    def _imbalanced(self, holder: int, low: int) -> bool:
        return holder - low > self.abs_threshold and holder > self.rel_threshold * low

    def choose(self, request: Any, workers: Sequence[WorkerLike]) -> int | None:
        ok = _healthy(workers)
        if not ok:
            return None
        key = getattr(request, "prefix_key", None)
        least = _least_loaded(workers, ok, self._rng)
        if key is None:
            return least
        owner = self._owner.get(key)
        if owner is not None and owner < len(workers) and workers[owner].healthy:
            if not self._imbalanced(workers[owner].outstanding, workers[least].outstanding):
                self._owner.move_to_end(key)
                self.hits += 1
                return owner
            self.fallbacks += 1
        else:
            self.misses += 1
        self._owner[key] = least
        self._owner.move_to_end(key)
        if len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
        return least

    def forget_worker(self, index: int) -> None:
        """Drop every prefix owned by ``index`` (its cache is gone after a crash/restart)."""
        for key in [k for k, w in self._owner.items() if w == index]:
            del self._owner[key]

    @property
    def hit_rate(self) -> float:
        seen = self.hits + self.misses + self.fallbacks
        return self.hits / seen if seen else 0.0


Policy = RoundRobin | LeastOutstanding | PowerOfTwo | PrefixAffinity
_POLICIES: dict[str, type] = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding,
                              "power_of_two": PowerOfTwo, "prefix_affinity": PrefixAffinity}
assert tuple(_POLICIES) == POLICY_NAMES, "policy table and PolicyName disagree"


def make_policy(name: str, *, seed: int = 0, **options: Any) -> Policy:
    """Build a policy by name; ``options`` go to its constructor (affinity thresholds).

    Unknown names raise ``ValueError`` listing the valid ones.
    """
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICY_NAMES)}")
    cls = _POLICIES[name]
    if options and cls is not PrefixAffinity:
        raise ValueError(f"policy {name!r} takes no options, got {sorted(options)}; only "
                         f"'prefix_affinity' takes abs_threshold, rel_threshold, capacity")
    return cls(seed, **options)
