"""``load_model(spec)``: any supported checkpoint -> ryzlab's own :class:`~ryzlab.models.transformer.Transformer` + tokenizer.

One path for every checkpoint format and every tensor-parallel size:

1. :func:`~ryzlab.models.check.check_model` validates the spec from metadata alone;
2. the model is built as a skeleton on the ``meta`` device (shapes, no memory);
3. with a tensor-parallel group, :func:`ryzlab.parallel.apply_tp` shards the skeleton (slices the
   meta tensors, sets the rank's head counts);
4. each parameter is allocated on ``device`` in the target dtype and filled by reading only the
   rows/columns :func:`ryzlab.parallel.shard_spec` says the rank keeps.

So the weights are never materialized twice (no random init to overwrite, no full copy before
sharding): peak memory is about the rank's final weight bytes plus one tensor in flight.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ryzlab.config import ModelConfig, ParallelConfig
from ryzlab.models.transformer import Transformer, rope_inv_freq
from ryzlab.models.check import check_model
from ryzlab.models.quant import WEIGHT_FORMAT_CHOICES, WeightFormat, check_weight_format, quantize_weights
from ryzlab.models.source import ModelSource, meta_skeleton, resolve_dtype
from ryzlab.models.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_folder, tokenizer_from_gguf

if TYPE_CHECKING:
    from ryzlab.parallel import Comm

log = logging.getLogger(__name__)

__all__ = ["load_model", "load_tokenizer"]


def load_tokenizer(spec: str | ModelSource) -> Tokenizer:
    """The tokenizer of a model spec (reads tokenizer files / GGUF metadata only, no weights)."""
    src = spec if isinstance(spec, ModelSource) else check_model(spec)
    if src.kind in ("reference", "random", "checkpoint"):  # ryzlab's own models are byte-level
        return ByteTokenizer()
    if src.kind == "hf":
        return tokenizer_from_folder(src.path)
    from ryzlab.models.gguf import open_gguf_file
    from ryzlab.models.source import file_key

    _, ckpt = open_gguf_file(src.path, file_key(src.path))
    return tokenizer_from_gguf(ckpt.meta, name=src.name)


def load_model(spec: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               tp: Comm | None = None, model_config: ModelConfig | None = None, seed: int = 0,
               weights: str | WeightFormat | None = None) -> tuple[Transformer, Tokenizer]:
    """Load ``spec`` (see :data:`~ryzlab.models.MODEL_CHOICES`) as a ryzlab Transformer in eval mode.

    * ``reference``: the shipped byte-level checkpoint; ``random``: ``Transformer(model_config or
      ModelConfig())`` initialised under ``torch.manual_seed(seed)`` (the global RNG is left as it was);
      both come with a :class:`ByteTokenizer`.
    * a Hugging Face folder / ``.gguf`` file: weights in ``dtype`` (default float32 on CPU, the
      checkpoint's ``torch_dtype`` on an accelerator; ``'float32' | 'bfloat16' | 'float16'``).
    * ``tp``: the tensor-parallel :class:`ryzlab.parallel.Comm` (None = tp 1). Each rank
      materializes only its shard; ``model.tp_layout`` / ``model.local_config`` are set whenever
      ``tp`` is given.
    * ``weights``: a weight format (:data:`ryzlab.models.quant.WEIGHT_FORMAT_CHOICES`; None = float32):
      projections, embeddings and head packed after loading (each rank its shard);
      ``'gguf'`` keeps a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors packed as they are read.

    Every check (spec, dtype, tp size against the heads) runs before any weight is read.
    """
    device = torch.device(device)
    src = check_model(spec)
    if model_config is not None and src.kind != "random":
        raise ValueError(f"model_config only shapes the 'random' model; {spec!r} brings its own config")
    cfg = model_config if (src.kind == "random" and model_config is not None) else src.config
    torch_dtype = resolve_dtype(dtype, src, device)
    ws = 1 if tp is None else tp.world_size
    if ws > 1:
        from ryzlab.parallel import validate_parallel

        validate_parallel(cfg, ParallelConfig(tp=ws))
    fmt = check_weight_format(cfg, weights, ws)
    if fmt.kind == "gguf" and src.kind != "gguf":
        raise ValueError(f"weights=gguf keeps a GGUF file's own blocks; {spec!r} is a {src.kind} model: choose a "
                         f"post-training format ({', '.join(c for c in WEIGHT_FORMAT_CHOICES if c != 'gguf')})")
    t0 = time.perf_counter()
    if src.kind in ("reference", "random", "checkpoint"):
        model = _builtin(src, cfg, torch_dtype, device, seed)
        if tp is not None:
            from ryzlab.parallel import apply_tp

            apply_tp(model, tp)
        tok: Tokenizer = ByteTokenizer()
    else:
        model = _from_checkpoint(src, torch_dtype, device, tp, fmt)
        tok = load_tokenizer(src)
    if fmt.kind != "gguf":
        quantize_weights(model, fmt)
    if tok.vocab_size > cfg.vocab_size:
        log.warning("%s: tokenizer has %d ids but the model only %d rows of embeddings", src.name, tok.vocab_size,
                    cfg.vocab_size)
    log.info("loaded %s (%s, %s) in %.2f s: %.1f M params on %s, %s, tp rank %d/%d", src.name, src.kind,
             src.architecture, time.perf_counter() - t0, src.n_params / 1e6, device, str(torch_dtype).split(".")[-1],
             0 if tp is None else tp.rank, ws)
    return model, tok


def _builtin(src: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> Transformer:
    if src.kind in ("reference", "checkpoint"):  # a few MB: loaded whole, then sliced by apply_tp
        from ryzlab.models.transformer import load_checkpoint

        return load_checkpoint(src.path, dtype=dtype, device=device)[0]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Transformer(cfg)
    return model.to(device=device, dtype=dtype).eval()


def _from_checkpoint(src: ModelSource, dtype: torch.dtype, device: torch.device, tp: Comm | None,
                     fmt: WeightFormat | None = None) -> Transformer:
    from ryzlab.parallel import apply_tp, shard_spec
    from ryzlab.parallel.layout import tp_layout
    from ryzlab.models.source import file_key

    cfg = src.config
    if src.kind == "hf":
        from ryzlab.models.hf import hf_name, open_hf_folder

        _, ckpt = open_hf_folder(src.path, file_key(src.path / "config.json"))
        to_file, read = hf_name, ckpt.read_into
    else:
        from ryzlab.models.gguf import gguf_name, open_gguf_file

        _, ckpt = open_gguf_file(src.path, file_key(src.path))
        to_file = gguf_name

        def read(name: str, out: torch.Tensor, spec: Any) -> None:
            # llama.cpp permuted the rows of Q and K (and their biases) per head for its RoPE layout
            perm = cfg.head_dim if (".attn_q." in name or ".attn_k." in name) else 0
            ckpt.read_into(name, out, spec, unpermute_head_dim=perm)

    model = meta_skeleton(cfg)
    if tp is not None:
        apply_tp(model, tp)
    layout = getattr(model, "tp_layout", None) or tp_layout(cfg, 1, 0)
    if fmt is not None and fmt.kind == "gguf":  # Q8_0 / Q4_x tensors go straight into packed layers
        from ryzlab.models.quant.gguf_native import load_native

        load_native(model, ckpt, to_file, shard_spec, layout, fmt, dtype)
    for name, p in list(model.named_parameters()):  # tied output.weight is the embedding: listed once
        spec = shard_spec(name, cfg, layout)
        out = torch.empty(p.shape, dtype=dtype, device=device)
        with torch.no_grad():
            read(to_file(name), out, spec)
        mod_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(out, requires_grad=False))
    if cfg.tie_embeddings and isinstance(model.output, nn.Linear) and isinstance(model.tok_embeddings, nn.Embedding):
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg, device)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not left, f"parameters left on the meta device after loading: {left}"
    return model.eval()
