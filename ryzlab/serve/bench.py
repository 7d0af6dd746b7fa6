"""``ryzlab bench``: prefill and decode tokens/s of one model, like llama-bench's ``pp`` and ``tg`` tests.

One number before a sweep: each repeat prefills ``batch`` rows of ``prompt_tokens`` into a fresh
paged KV cache (the store the engine and every experiment use), then decodes ``output_tokens``
greedy steps. Prefill tokens/s = batch x prompt_tokens / prefill time; decode tokens/s =
batch x output_tokens / decode time. A warm-up run of the same shapes (one decode step) comes
first and is not counted: the first forward of a shape pays allocation and kernel selection.
No scheduler, sampler or HTTP in the loop: this is the model and its cache, not a server.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ryzlab.config import CODECS, CacheConfig, check_choice

__all__ = ["BenchConfig", "BenchResult", "check_bench", "run_bench"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to time; llama-bench's defaults (``-p 512 -n 128 -r 5``)."""

    model: str = "reference"
    """'reference', 'random', a Hugging Face folder or a .gguf file."""
    prompt_tokens: int = 512
    """Tokens per row prefilled in one forward."""
    output_tokens: int = 128
    """Decode steps after the prefill (one token per row each)."""
    batch: int = 1
    """Rows (sequences) prefilled and decoded together."""
    repeats: int = 5
    """Timed runs; the result reports their median, min and max."""
    codec: str = "none"
    """KV-cache storage format."""
    dtype: str | None = None
    """Weights' dtype (default float32 on CPU, the checkpoint's on a GPU)."""
    device: str = "auto"
    """'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1'..."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    seed: int = 0
    """Seed of the prompt token ids."""

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in
                    ("prompt_tokens", "output_tokens", "batch", "repeats") if getattr(self, name) < 1]
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if problems:
            raise ValueError("; ".join(problems))
        check_choice("codec", self.codec, CODECS)


@dataclass(frozen=True)
class BenchResult:
    """Seconds per repeat and what was timed."""

    config: BenchConfig
    model_name: str
    device: str
    dtype: str
    n_params: int
    threads: int
    prefill_s: tuple[float, ...]
    decode_s: tuple[float, ...]

    def tokens_per_s(self, test: str) -> list[float]:
        """Per repeat: ``test`` = 'prefill' or 'decode'."""
        c = self.config
        tokens, secs = ((c.prompt_tokens, self.prefill_s) if test == "prefill" else (c.output_tokens, self.decode_s))
        return [c.batch * tokens / s for s in secs]

    def lines(self) -> list[str]:
        """The terminal table: one row per test, tokens/s median [min, max] over the repeats."""
        c = self.config
        out = [f"model={self.model_name} ({self.n_params / 1e6:.2f} M params, {self.dtype}) device={self.device}"
               f"{f' threads={self.threads}' if self.device == 'cpu' else ''} codec={c.codec} batch={c.batch} "
               f"repeats={c.repeats}",
               f"{'test':<8} {'tokens':>8} {'tok/s median':>13} {'min':>11} {'max':>11}"]
        for test, n in (("prefill", c.prompt_tokens), ("decode", c.output_tokens)):
            v = self.tokens_per_s(test)
            out.append(f"{test:<8} {n:>8} {statistics.median(v):>13.1f} {min(v):>11.1f} {max(v):>11.1f}")
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _one_run(model: torch.nn.Module, cache_cfg: CacheConfig, prompt: torch.Tensor, steps: int,
             device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one fresh cache."""
    from ryzlab.kv.cache import PagedKVCache

    cache = PagedKVCache(model.config, cache_cfg, dtype=model.tok_embeddings.weight.dtype, device=device)
    seqs = list(range(prompt.shape[0]))
    _sync(device)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache, seq_ids=seqs)                    # [B, P, V]
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)                     # [B, 1]
        logits = model(nxt, cache=cache, seq_ids=seqs)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def check_bench(cfg: BenchConfig) -> Any:
    """The model's :class:`~ryzlab.models.ModelSource` once ``cfg`` fits it (sizes against its context,
    codec against its heads); ``ValueError`` otherwise. Reads metadata only, never a weight."""
    from ryzlab.models import check_model

    src = check_model(cfg.model)
    need = cfg.prompt_tokens + cfg.output_tokens
    if need > src.config.max_seq_len:
        raise ValueError(f"prompt_tokens ({cfg.prompt_tokens}) + output_tokens ({cfg.output_tokens}) = {need} exceeds "
                         f"{src.name}'s context of {src.config.max_seq_len} tokens")
    CacheConfig(codec=cfg.codec).check_head_dim(src.config.head_dim)
    return src


def run_bench(cfg: BenchConfig, *, on_repeat: Callable[[int], None] | None = None) -> BenchResult:
    """Time ``cfg.repeats`` prefill + decode runs of ``cfg.model``; ``on_repeat(i)`` after each (progress).

    Every check (:func:`check_bench`) runs before a weight is read.
    """
    from ryzlab.models import load_model

    src = check_bench(cfg)
    cache_cfg = CacheConfig(codec=cfg.codec)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, _ = load_model(cfg.model, dtype=cfg.dtype, device=device, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # random ids over the whole vocabulary: speed does not depend on which tokens they are
    prompt = torch.randint(0, src.config.vocab_size, (cfg.batch, cfg.prompt_tokens), generator=gen).to(device)
    _one_run(model, cache_cfg, prompt, 1, device)  # warm-up: same shapes, not counted
    prefill, decode = [], []
    for i in range(cfg.repeats):
        p, d = _one_run(model, cache_cfg, prompt, cfg.output_tokens, device)
        prefill.append(p)
        decode.append(d)
        log.info("bench repeat %d: prefill %.4f s, decode %.4f s", i, p, d)
        if on_repeat is not None:
            on_repeat(i)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    return BenchResult(cfg, src.name, device.type, dtype, model.num_params(), torch.get_num_threads(),
                       tuple(prefill), tuple(decode))
