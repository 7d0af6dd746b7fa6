"""BitNet b1.58 reference: held-out perplexity of packed ternary weights with bf16 activations vs 8-bit
absmax activations (W1.58A8, ``weights='ternary-a8'``) vs the QAT forward it was trained with.

    PYTHONPATH=. python benchmarks/bitnet_a8.py

Same evaluation as the checkpoint's ``heldout_perplexity`` (ryzlab/checkpoints/bitnet.json):
64 consecutive windows x 512 bytes of the held-out stdlib split, one CPU thread.
"""
from __future__ import annotations

import time

import torch

from ryzlab.models import load_model
from ryzlab.models.corpus import stdlib_corpus
from ryzlab.models.quant import weight_ledger
from ryzlab.models.quant.qat import ternary_qat
from ryzlab.models.train import evaluate_perplexity
from ryzlab.provenance import cpu_model

CHECKPOINT = "ryzlab/checkpoints/bitnet.safetensors"


def main() -> None:
    torch.set_num_threads(1)
    heldout = stdlib_corpus().heldout
    print(f"device: cpu ({cpu_model()}), torch {torch.__version__}")
    for name in ("ternary", "ternary-a8", "qat-forward"):
        t0 = time.perf_counter()
        if name == "qat-forward":   # float latent weights through BitLinear (ternary x int8 activations)
            model = ternary_qat(load_model(CHECKPOINT)[0])
            kernel, nbytes = "BitLinear (float fake-quant)", float("nan")
        else:
            model = load_model(CHECKPOINT, weights=name)[0]
            led = weight_ledger(model)
            kernel, nbytes = ", ".join(led["kernels"]), led["total"]
        ppl = evaluate_perplexity(model, heldout, 64, 512)
        print(f"{name:12s} heldout_ppl={ppl:.4f} weight_bytes={nbytes:.0f} kernel=[{kernel}] "
              f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
