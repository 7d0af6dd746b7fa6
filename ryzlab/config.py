"""Typed, frozen configuration for every part of ryzlab, validated before any work starts.

Every config is a keyword-only frozen dataclass. ``from_dict`` builds one from plain values
(a sweep point, a notebook's parameters) and reports *every* problem at once: unknown keys
(with the valid ones), wrong types, and invalid values (with the valid choices). No I/O here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = [
    "ConfigError", "from_dict", "check_choice", "check_head_dim", "field_names",
    "Codec", "Granularity", "CODECS", "GRANULARITIES", "CODEC_BITS", "PACK_UNIT", "Rotation", "ROTATIONS",
    "ModelConfig", "RopeScaling", "ROPE_SCALINGS", "CacheConfig", "ParallelConfig", "Backend", "BACKENDS", "CpuComm", "CPU_COMMS",
    "CodecFields", "QuantFields", "LoadFields", "ParallelFields", "group_values",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """One error that lists every problem found in a config (or in a whole sweep)."""

    def __init__(self, problems: list[str], where: str = ""):
        self.problems = list(problems)
        head = f"invalid config{' for ' + where if where else ''}: {len(self.problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raise ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _type_problem(name: str, value: Any, tp: Any) -> str | None:
    """Return a message if ``value`` does not fit the annotation ``tp`` (a small, strict subset)."""
    origin = get_origin(tp)
    if tp is Any:
        return None
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            return f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
        return None
    if origin in (typing.Union, types.UnionType):
        msgs = [_type_problem(name, value, a) for a in get_args(tp)]
        if all(m is not None for m in msgs):
            return next((m for m in msgs if "choose one of" in m), None) or (
                f"{name}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}")
        return None
    if tp is type(None):
        return None if value is None else f"{name}={value!r}: expected None"
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"{name}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}"
        args = [a for a in get_args(tp) if a is not Ellipsis]
        for i, v in enumerate(value):
            if args and (m := _type_problem(f"{name}[{i}]", v, args[0])):
                return m
        return None
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        ok = True
    return None if ok else f"{name}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], values: dict[str, Any], *, where: str = "", ignore: typing.Iterable[str] = ()) -> T:
    """Build ``cls`` from ``values``, collecting every problem into one :class:`ConfigError`.

    Lists coming from YAML/JSON are turned into tuples (configs are frozen and hashable).
    ``ignore`` names keys that belong to the caller (e.g. a notebook's ``run_dir``).
    """
    hints = typing.get_type_hints(cls)
    valid = field_names(cls)
    ignore = set(ignore)
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ignore:
            continue
        if key not in valid:
            problems.append(f"unknown parameter {key!r}; valid parameters: {', '.join(valid)}")
            continue
        if isinstance(value, list):
            value = tuple(value)
        if (msg := _type_problem(key, value, hints[key])) is not None:
            problems.append(msg)
            continue
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    try:  # __post_init__ validation: value-level problems (bad-typed fields left at defaults)
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems, where)
    return obj


# ----------------------------------------------------------------------------- choices
Codec = Literal["none", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int3", "int2"]
CODECS: tuple[str, ...] = get_args(Codec)
# Sub-byte integer codecs: bits per value and how many values one packing unit holds (head_dim
# must be a multiple of it): int4 two per byte, int2 four per byte, int3 eight per three bytes.
CODEC_BITS: dict[str, int] = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
PACK_UNIT: dict[str, int] = {"int4": 2, "int3": 8, "int2": 4}
# Orthogonal rotation of every K/V head vector before quantisation (QuaRot-style): ``hadamard`` is
# the normalised Walsh-Hadamard matrix, ``hadamard_signs`` the same after random +-1 signs per
# channel (seeded by ``rotation_seed``). Needs a power-of-two head_dim.
Rotation = Literal["none", "hadamard", "hadamard_signs"]
ROTATIONS: tuple[str, ...] = get_args(Rotation)
# Scale granularity: one scale for the whole tensor, per KV head, per (token, head), per
# channel (per head_dim column, KIVI's choice for keys) or per group of head_dim values.
Granularity = Literal["tensor", "head", "token_head", "channel", "group"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
Backend = Literal["auto", "gloo", "nccl"]
BACKENDS: tuple[str, ...] = get_args(Backend)
CpuComm = Literal["gloo", "shm"]
CPU_COMMS: tuple[str, ...] = get_args(CpuComm)
DType = Literal["float32", "bfloat16", "float16"]
# What a full KV cache does to a victim sequence (the serving engine's choice; here so that
# `ryzlab serve --help` can list it without importing torch).
Preemption = Literal["recompute", "swap"]
PREEMPTIONS: tuple[str, ...] = get_args(Preemption)


RopeScaling = Literal["none", "llama3", "linear"]
ROPE_SCALINGS: tuple[str, ...] = get_args(RopeScaling)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU; optional biases, tied embeddings).

    The defaults are the shipped byte-level reference model; a loaded checkpoint (Llama, Mistral,
    Qwen2, SmolLM, ...) fills every field from its own config.
    """

    vocab_size: int = 256
    """Byte-level vocabulary: text every machine has needs no tokenizer download."""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    """Fewer KV heads than query heads (GQA) is what makes KV memory the bottleneck."""
    head_dim: int = 0
    """0 means derived: dim // n_heads. Set when a checkpoint's heads do not tile ``dim``; tensor
    parallelism also keeps the global head_dim while it divides the heads."""
    ffn_dim: int = 0
    """0 means derived: the Llama rule, 8/3 * dim rounded up to a multiple of 64."""
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "none"
    """Frequency rescaling of RoPE: ``llama3`` (Llama 3.1+, the four fields below) or ``linear``."""
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    o_bias: bool = False
    """Bias on the output projection (Llama ``attention_bias=True``)."""
    mlp_bias: bool = False
    tie_embeddings: bool = False
    """The output head reuses the token embedding matrix (SmolLM, small Qwen2 / Llama 3.2)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ValueError(f"head_dim must be > 0 (or 0 = dim // n_heads), got {self.head_dim}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads} "
                                 f"(or set head_dim explicitly)")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", -(-int(8 * self.dim / 3) // 64) * 64)


def check_head_dim(head_dim: int, codecs: typing.Iterable[str], group_size: int | None,
                   rotation: str = "none") -> None:
    """Raise ``ValueError`` if vectors of ``head_dim`` values cannot be stored this way.

    ``group_size`` (None: no group scales) must divide ``head_dim``; a packed codec of ``codecs``
    needs a multiple of its pack unit; a rotation needs a power of two. The one check behind
    :meth:`CacheConfig.check_head_dim` (a whole layout) and ``KVFormat.check_head_dim`` (one
    format, in :mod:`ryzlab.kv.codecs`), so they cannot drift apart.
    """
    if group_size is not None and head_dim % group_size:
        divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
        raise ValueError(f"group_size={group_size} does not divide head_dim={head_dim}; "
                         f"valid group sizes: {divisors}")
    for codec in sorted(set(codecs) & set(PACK_UNIT)):
        if head_dim % PACK_UNIT[codec]:
            raise ValueError(f"{codec} packs {PACK_UNIT[codec]} values per unit: head_dim={head_dim} must be "
                             f"a multiple of {PACK_UNIT[codec]}")
    if rotation != "none" and head_dim & (head_dim - 1):
        raise ValueError(f"rotation={rotation!r} needs a power-of-two head_dim (Walsh-Hadamard), got "
                         f"{head_dim}; use rotation='none'")


# ----------------------------------------------------------------------------- shared field groups
# A group of fields several configs carry (the cache's layout in an experiment's grid, a load in the
# serving experiment) is declared once here and inherited, so its names, types, defaults and
# docstrings cannot drift apart. A subclass may restate a field only to change its default. The
# groups hold no validation: the config that uses the fields validates them (CacheConfig, LoadSpec).


@dataclass(frozen=True, kw_only=True)
class CodecFields:
    """The KV page format an experiment sweeps: codec, scale layouts, tokens per page."""

    codec: Codec = "none"
    """Storage format; ``none`` keeps the model dtype."""
    key_granularity: Granularity | Literal["auto"] = "auto"
    """Scale layout for keys. ``auto`` (resolved at construction): ``channel`` — one scale per
    head_dim column within a block, KIVI — for int4/int3/int2, whose few levels cannot absorb
    the outlier channels of trained keys (measured on SmolLM2-135M: int4 KL/token 0.27 per
    token-head vs 0.04 per channel, issue 15); ``token_head`` for the 8-bit formats."""
    value_granularity: Granularity = "token_head"
    """Scale layout for values (KIVI: ``token_head``)."""
    block_size: int = 16
    """Tokens per page."""


@dataclass(frozen=True, kw_only=True)
class QuantFields(CodecFields):
    """The rest of the quantiser's knobs: groups, residual window, symmetry, rotation, per-layer codecs."""

    group_size: int = 32
    """head_dim values sharing a scale when a granularity is ``group``; must divide head_dim."""
    residual: int = 0
    """Most recent tokens kept in full precision (0 = none)."""
    symmetric: bool = True
    """Integer codecs: True = scale only (q = round(x / s)); False = scale + fp16 minimum per scale
    (asymmetric, one more 2-byte value per scale, and 2**bits levels instead of 2**bits - 1:
    int2 gets 4 levels instead of 3). fp8 is always symmetric."""
    rotation: Rotation = "none"
    """Rotate every K/V head vector by an orthogonal (Walsh-Hadamard) matrix before quantising,
    which spreads outlier channels over the whole head; attention rotates q the same way and the
    output back, so scores and outputs are unchanged up to float rounding."""
    layer_codecs: tuple[Codec, ...] = ()
    """Per-layer codec (mixed precision), one per decoder layer; empty = ``codec`` for every
    layer. Granularities, symmetry and rotation are shared."""


@dataclass(frozen=True, kw_only=True)
class LoadFields:
    """An offered load: rate or concurrency, how many requests, how long (LoadSpec, the serving
    experiment)."""

    rate: float = 10.0
    """Target requests per second (open loop). Ignored by ``closed`` and ``trace``."""
    burstiness: float = 1.0
    """Gamma shape: 1 = Poisson; < 1 burstier, > 1 smoother, same mean rate."""
    concurrency: int = 4
    """Requests kept in flight by ``closed``."""
    num_requests: int = 64
    prompt_len: int = 32
    """Mean prompt length in tokens."""
    output_len: int = 16
    """Mean output length (max_tokens) in tokens."""
    shared_prefix_len: int = 0
    """Tokens every prompt starts with (a system prompt): what prefix caching can reuse."""


@dataclass(frozen=True, kw_only=True)
class DecodeFields:
    """One model, a prompt, then timed decode steps (the kv_compression and weight_compression
    experiments)."""

    model: str = "reference"
    """``reference`` (the shipped checkpoint), ``random`` (a tiny random model, for tests), a Hugging Face
    folder or a ``.gguf`` file (:data:`ryzlab.models.MODEL_CHOICES`)."""
    context: int = 256
    """Prompt tokens per sequence before the timed decode steps."""
    decode_steps: int = 16
    """Timed decode steps (one output row each)."""
    warmup: int = 2
    threads: int = 1
    """CPU threads (0 = torch default); 1 keeps points fair when run side by side."""
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class EvalFields:
    """Teacher-forced accuracy on held-out text (KL, perplexity, top-1 against a reference)."""

    eval_windows: int = 4
    """Held-out windows for the accuracy metrics (0 = skip accuracy)."""
    eval_len: int = 256
    eval_prefill: int = 128
    """Tokens prefilled per window; the rest is decoded teacher-forced and scored."""
    text: str = ""
    """UTF-8 text file for accuracy and timing tokens; empty = the held-out stdlib text."""


def check_counts(cfg: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming the first field of ``cfg`` that is not > 0 (``positive``) or >= 0."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def check_eval(cfg: EvalFields) -> None:
    """The accuracy window fits (prefill inside it) and the text file, when named, exists."""
    if cfg.eval_windows and not 0 < cfg.eval_prefill < cfg.eval_len:
        raise ValueError(f"eval_prefill={cfg.eval_prefill} must be in [1, eval_len - 1 = {cfg.eval_len - 1}]")
    if cfg.text and not Path(cfg.text).expanduser().is_file():
        raise ValueError(f"text={cfg.text!r}: no such file (empty = the held-out stdlib text)")


@dataclass(frozen=True, kw_only=True)
class ParallelFields:
    """The two parallel degrees of a layout (ParallelConfig, the scaling and serving experiments)."""

    tp: int = 1
    """Tensor-parallel ranks: attention heads and MLP columns split, two all-reduces per layer."""
    cp: int = 1
    """Context-parallel ranks: each sequence's KV blocks spread over them, one all-gather of
    attention partials per layer."""

    @property
    def world_size(self) -> int:
        return self.tp * self.cp


def group_values(group: type, config: Any) -> dict[str, Any]:
    """The values ``config`` holds for the fields of ``group`` (one of the groups above): what
    builds the real config from an experiment's (``CacheConfig(**group_values(QuantFields, cfg))``)."""
    return {name: getattr(config, name) for name in field_names(group)}


@dataclass(frozen=True, kw_only=True)
class CacheConfig(QuantFields):
    """How the paged KV cache stores keys and values (the layout fields: :class:`QuantFields`)."""

    residual_dtype: Literal["model", "float16", "bfloat16"] = "model"
    """Storage of the full-precision tail (residual window, not-yet-full block): the model's dtype,
    or a 2-byte float that halves its bytes under a float32 model (rounding ~1e-3 relative, far
    below any quantiser's step)."""
    num_blocks: int | None = None
    """Pool capacity in blocks; None = grow as needed (no capacity limit)."""
    enable_prefix_caching: bool = True
    """Share full blocks between sequences with the same prefix (chained block hashes)."""
    rotation_seed: int = 0
    """Seed of the random signs of ``hadamard_signs``."""
    pre_rope_keys: bool = False
    """Store keys before RoPE (KVQuant): each key is rotated back by its position's RoPE angle
    before quantising and RoPE is re-applied to the decoded keys at every read. Pre-RoPE, an
    outlier channel stays in the same channel at every position, which per-channel scales fit."""

    def __post_init__(self) -> None:
        check_choice("codec", self.codec, CODECS)
        if self.key_granularity == "auto":
            low_bit = {self.codec, *self.layer_codecs} & set(PACK_UNIT)
            object.__setattr__(self, "key_granularity", "channel" if low_bit else "token_head")
        check_choice("key_granularity", self.key_granularity, GRANULARITIES)
        check_choice("value_granularity", self.value_granularity, GRANULARITIES)
        check_choice("rotation", self.rotation, ROTATIONS)
        for i, c in enumerate(self.layer_codecs):
            check_choice(f"layer_codecs[{i}]", c, CODECS)
        if self.block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {self.block_size}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0 tokens, got {self.residual}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0 or None, got {self.num_blocks}")

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if the scale layout does not fit ``head_dim`` (called once the model is known)."""
        uses_group = "group" in (self.key_granularity, self.value_granularity)
        check_head_dim(head_dim, {self.codec, *self.layer_codecs}, self.group_size if uses_group else None,
                       self.rotation)

    def check_layers(self, n_layers: int) -> None:
        """Raise if ``layer_codecs`` does not name one codec per layer of the model."""
        if self.layer_codecs and len(self.layer_codecs) != n_layers:
            raise ValueError(f"layer_codecs has {len(self.layer_codecs)} entries but the model has {n_layers} "
                             f"layers; give one codec per layer (or none)")

    def codec_of(self, layer: int) -> str:
        """The codec layer ``layer`` stores."""
        return self.layer_codecs[layer] if self.layer_codecs else self.codec

    @property
    def any_quantized(self) -> bool:
        return any(c != "none" for c in (self.layer_codecs or (self.codec,)))


@dataclass(frozen=True, kw_only=True)
class ParallelConfig(ParallelFields):
    """A tp x cp layout of ranks (:class:`ParallelFields`) and its backend; validated against a model
    by :func:`ryzlab.parallel.layout.validate_parallel` before any process group exists."""

    backend: Backend = "auto"
    """``auto``: nccl when every rank has a CUDA device, gloo otherwise."""
    cpu_comm: CpuComm = "gloo"
    """How CPU ranks' tp / cp all-reduces, all-gathers and barriers travel: ``gloo`` (sockets), or
    ``shm``: shared memory between ranks on one x86 host, each rank spinning until its peers'
    parts are there (:mod:`ryzlab.parallel.shm`; as vLLM's and DeepSpeed's CPU backends do).
    Where a group cannot map it (ranks on different hosts) it keeps gloo and logs the fallback."""

    def __post_init__(self) -> None:
        for name in ("tp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_choice("backend", self.backend, BACKENDS)
        check_choice("cpu_comm", self.cpu_comm, CPU_COMMS)
