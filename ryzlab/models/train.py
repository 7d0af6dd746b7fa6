"""Train the byte-level reference model on the Python standard library's source.

    python -m ryzlab.models.train                      # writes ryzlab/checkpoints/reference.{safetensors,json}
    python -m ryzlab.models.train --steps 50 --out /tmp/x.safetensors   # a quick smoke run
    python -m ryzlab.models.train --weights ternary    # BitNet b1.58 QAT -> ryzlab/checkpoints/bitnet.{safetensors,json}

Reproducible from ``--seed``: the corpus is a fixed sorted file list, batches are drawn from
a seeded generator, the model is initialised from the same seed, and training runs on one
thread (``torch.set_num_threads(1)``: the dev machine's cores are shared, and one thread
also keeps float reductions in a fixed order). The budget is about 10 minutes on one core.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ryzlab.config import ModelConfig
from ryzlab.models.corpus import Corpus, stdlib_corpus
from ryzlab.models.transformer import REFERENCE_CHECKPOINT, Transformer, load_checkpoint, save_checkpoint

BITNET_CHECKPOINT = REFERENCE_CHECKPOINT.with_name("bitnet.safetensors")
"""The BitNet b1.58 variant of the reference (``python -m ryzlab.models.train --weights ternary``)."""

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "evaluate_perplexity"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 0
    steps: int = 500
    """~1 s/step on one shared CPU core: ~9 minutes (measured: see reference.json's train_seconds)."""
    batch_size: int = 4
    seq_len: int = 512
    """Training context. RoPE does not extrapolate far past it: at 256 the held-out loss
    doubled by position 400, so train on the contexts the cache experiments use."""
    lr: float = 3e-3
    """A small model on a short schedule tolerates (and needs) a high learning rate."""
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_windows: int = 64
    """Held-out perplexity over this many non-overlapping windows of ``eval_len`` bytes."""
    eval_len: int = 512
    threads: int = 1
    weights: str = "float32"
    """``ternary``: BitNet b1.58 quantization-aware training (:mod:`ryzlab.models.quant.qat`); the
    checkpoint holds the latent weights, evaluated (and used) packed as ``weights='ternary'``."""


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate_perplexity(model: Transformer, data: torch.Tensor, n_windows: int, length: int,
                        batch: int = 8) -> float:
    """exp(mean next-byte cross-entropy) over ``n_windows`` consecutive windows of ``data`` [N] uint8."""
    n_windows = min(n_windows, (data.numel() - 1) // length)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n_windows, batch):
        idx = torch.arange(i, min(i + batch, n_windows))
        rows = torch.stack([data[j * length: j * length + length + 1].long() for j in idx.tolist()])  # [b, L+1]
        logits = model(rows[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += rows[:, 1:].numel()
    return math.exp(total / count)


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(model_cfg: ModelConfig, cfg: TrainConfig, corpus: Corpus | None = None,
          out: str | Path | None = None) -> tuple[Transformer, dict]:
    """Train from scratch; returns (model, metadata). Writes a checkpoint to ``out`` if given."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus = corpus or stdlib_corpus()
    model = Transformer(model_cfg)
    if cfg.weights not in ("float32", "ternary"):
        raise ValueError(f"weights={cfg.weights!r}: training supports 'float32' or 'ternary' (BitNet QAT)")
    if cfg.weights == "ternary":
        from ryzlab.models.quant.qat import ternary_qat

        ternary_qat(model)
    log.info("model: %.2f M params, %s", model.num_params() / 1e6, model_cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    data = corpus.train
    t0 = time.perf_counter()
    losses = []
    for step in range(cfg.steps):
        model.train()
        starts = torch.randint(0, data.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        rows = torch.stack([data[s: s + cfg.seq_len + 1] for s in starts.tolist()]).long()  # [B, L+1]
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("step %d/%d loss %.3f lr %.2e %.1f s", step, cfg.steps, loss.item(), _lr(step, cfg),
                     time.perf_counter() - t0)
    train_s = time.perf_counter() - t0
    meta = {
        "seed": cfg.seed, "steps": cfg.steps, "train_config": dataclasses.asdict(cfg),
        "train_seconds": round(train_s, 1), "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final_train_loss_avg50": sum(losses[-50:]) / len(losses[-50:]),
        "data": corpus.description, "git_sha": _git_sha(), "torch": torch.__version__,
    }
    if cfg.weights == "ternary":  # the training forward itself (ternary weights, 8-bit activations)
        meta["heldout_perplexity_qat_forward"] = evaluate_perplexity(model, corpus.heldout, cfg.eval_windows,
                                                                     cfg.eval_len)
    if out is not None:
        save_checkpoint(model, out, meta)
        # Perplexities of the weights as shipped (bf16-rounded), not of the float32 training copy.
        model, _ = load_checkpoint(out)
    if cfg.weights == "ternary":  # ... and as used: packed 2-bit layers, bf16 activations at the kernel
        from ryzlab.models.quant import quantize_weights, weight_ledger

        quantize_weights(model, "ternary")
        led = weight_ledger(model)
        meta.update(weights="ternary", weight_bytes=led["total"], weight_bytes_linears=led["linears"],
                    weight_bytes_linears_float32=4 * sum(m.out_features * m.in_features for b in model.layers
                                                         for m in (b.attention.wq, b.attention.wk, b.attention.wv,
                                                                   b.attention.wo, b.feed_forward.w1,
                                                                   b.feed_forward.w2, b.feed_forward.w3)))
    meta["heldout_perplexity"] = evaluate_perplexity(model, corpus.heldout, cfg.eval_windows, cfg.eval_len)
    meta["train_perplexity"] = evaluate_perplexity(model, corpus.train, cfg.eval_windows, cfg.eval_len)
    meta["perplexity_eval"] = f"{cfg.eval_windows} consecutive windows x {cfg.eval_len} bytes from the start of each split"
    if out is not None and cfg.weights == "ternary":  # the packed model has no float weights to save
        import json

        meta_path = Path(out).with_suffix(".json")
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **meta}, indent=1, sort_keys=True) + "\n")
    elif out is not None:
        save_checkpoint(model, out, meta)
    log.info("held-out perplexity %.3f, train perplexity %.3f (%.0f s)", meta["heldout_perplexity"],
             meta["train_perplexity"], train_s)
    return model, meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    ap.add_argument("--out", default=str(REFERENCE_CHECKPOINT))
    a = vars(ap.parse_args(argv))
    if a["weights"] == "ternary" and a["out"] == str(REFERENCE_CHECKPOINT):
        a["out"] = str(BITNET_CHECKPOINT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_cfg = ModelConfig(dim=a.pop("dim"), n_layers=a.pop("n_layers"), n_heads=a.pop("n_heads"),
                            n_kv_heads=a.pop("n_kv_heads"))
    out = a.pop("out")
    _, meta = train(model_cfg, TrainConfig(**a), out=out)
    logging.getLogger(__name__).info(
        "wrote %s: held-out perplexity %.3f (train %.3f) after %d steps, %s s", out,
        meta["heldout_perplexity"], meta["train_perplexity"], meta["steps"], meta["train_seconds"])


if __name__ == "__main__":
    main()
