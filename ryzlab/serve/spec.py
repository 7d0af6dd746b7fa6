"""What one model replica is: :class:`ReplicaSpec`, validated once, handed to every rank as is.

The serving CLI, the router, its workers, each rank of a tp x cp group, ``ryzlab generate`` and
the experiments build engines from the same object (no keyword dicts rebuilt along the way): a
bad model, dtype, device, codec or layout fails when the spec is made, in the parent process,
before anything loads, with the valid choices in the message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ryzlab.config import CacheConfig, ConfigError, ModelConfig, ParallelConfig
from ryzlab.serve.scheduler import EngineConfig

__all__ = ["ReplicaSpec"]


@dataclass(frozen=True, kw_only=True)
class ReplicaSpec:
    """One engine replica: the model, where it runs, its KV cache, its tp x cp layout, its scheduler."""

    model: str = "reference"
    """'reference' (the shipped checkpoint), 'random' (untrained weights: timing only), a Hugging Face
    folder or a .gguf file (:data:`ryzlab.models.MODEL_CHOICES`)."""
    model_config: ModelConfig | None = None
    """The shape of a 'random' model (None: the reference shape); must be None for any other model."""
    dtype: str | None = None
    """Weights' dtype, one of :data:`ryzlab.models.DTYPES` (None: float32 on CPU, the checkpoint's on a GPU)."""
    device: str = "cpu"
    """'cpu', 'cuda' (one replica per GPU: the router gives each worker its own) or 'cuda:N'."""
    cache: CacheConfig = CacheConfig(num_blocks=512)
    """The paged KV cache of each rank. Its ``enable_prefix_caching`` follows ``engine``'s."""
    parallel: ParallelConfig = ParallelConfig()
    """tp x cp ranks of the replica (1 x 1: one process)."""
    engine: EngineConfig = EngineConfig()
    """The scheduler's knobs."""
    seed: int = 0
    """Seed of a 'random' model's weights (every rank draws the same)."""
    weights: str = "float32"
    """Weight format (:data:`ryzlab.models.quant.WEIGHT_FORMAT_CHOICES`): packed after loading, each rank its shard."""
    shape: ModelConfig = field(init=False, repr=False, compare=False)
    """The model's full shape, read from its metadata at validation (no weights)."""

    def __post_init__(self) -> None:
        from ryzlab.models import DTYPES, check_model
        from ryzlab.parallel.layout import validate_parallel

        problems = []
        for name, value, kind in (("model_config", self.model_config, ModelConfig), ("cache", self.cache, CacheConfig),
                                  ("parallel", self.parallel, ParallelConfig), ("engine", self.engine, EngineConfig)):
            if value is not None and not isinstance(value, kind):
                problems.append(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        if not (self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            problems.append(f"device={self.device!r} is not valid; choose 'cpu', 'cuda' or 'cuda:N'")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} is not valid; choose one of {', '.join(map(repr, DTYPES))} or None")
        shape = None
        try:
            src = check_model(self.model)
        except ValueError as e:
            problems.append(str(e))
        else:
            if self.model_config is not None and src.kind != "random":
                problems.append(f"model_config sets the shape of model='random' only, not of model={self.model!r}")
            shape = self.model_config if (src.kind == "random" and self.model_config is not None) else src.config
        if problems:
            raise ConfigError(problems, where="ReplicaSpec")
        validate_parallel(shape, self.parallel, self.cache)  # ConfigError listing every layout problem
        from ryzlab.models.quant import check_weight_format

        try:  # the format against the shapes each rank will hold, before anything loads
            check_weight_format(shape, self.weights, self.parallel.tp)
        except ValueError as e:
            raise ConfigError([str(e)], where="ReplicaSpec") from None
        object.__setattr__(self, "shape", shape)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def cache_config(self) -> CacheConfig:
        """The cache each rank builds (prefix caching as the scheduler is told)."""
        return dataclasses.replace(self.cache, enable_prefix_caching=self.engine.enable_prefix_caching)

    def on_device(self, device: str) -> "ReplicaSpec":
        """The same replica on ``device`` (the router gives each one-GPU worker its own)."""
        return dataclasses.replace(self, device=device)
