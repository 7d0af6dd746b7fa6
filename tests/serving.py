"""A real ``ryzlab serve`` app on 127.0.0.1 (free port) over a tiny random model, for the API
tests (imported by the test modules), and a forward that pauses on an event."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

import torch

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.serve.api import ServeLimits, create_app
from ryzlab.serve.async_engine import AsyncEngine
from ryzlab.serve.engine import EngineConfig
from ryzlab.serve.local import serve_in_thread
from ryzlab.serve.replica import ReplicaSpec, build_engine

MC = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=1024)
NUM_BLOCKS = 64
MAX_MODEL_LEN = 500


@contextlib.contextmanager
def serve_app(*, stall_timeout_s: float = 10.0, api_key: str | None = None, metrics_auth: bool = False,
              **limits: Any) -> Iterator[tuple[str, AsyncEngine, Any]]:
    """(base URL, backend, app) of a served random byte-level model (vocab 256)."""
    torch.set_num_threads(1)
    eng = build_engine(ReplicaSpec(model="random", model_config=MC, cache=CacheConfig(block_size=8, num_blocks=NUM_BLOCKS),
                                   engine=EngineConfig(max_model_len=MAX_MODEL_LEN, stall_timeout_s=stall_timeout_s)))
    backend = AsyncEngine(eng, model_name="ryzlab-random")
    app = create_app(backend, api_key=api_key, limits=ServeLimits(**limits), metrics_auth=metrics_auth)
    try:
        with serve_in_thread(app) as url:
            yield url, backend, app
    finally:
        backend.shutdown()


class PausedForward:
    """Replace the engine's forward with one that waits for ``release`` (test-only): requests
    stay in flight, deterministically, until the test lets them go."""

    def __init__(self, engine: Any):
        self.engine, self.real = engine, engine.execute
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, *a: Any, **k: Any) -> Any:
        self.entered.set()
        self.release.wait(60)
        return self.real(*a, **k)

    def __enter__(self) -> "PausedForward":
        self.engine.execute = self
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.engine.execute = self.real


def wait_for(cond: Any, timeout: float = 30.0) -> bool:
    """Poll ``cond`` until true (a condition, not a timing assumption; the timeout only bounds a failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False
