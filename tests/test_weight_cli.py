"""--weights on `ryzlab generate` / `serve` (ReplicaSpec): refused before any work, packed models in the engine."""
from __future__ import annotations

import json

import pytest
import torch

from ryzlab.cli import main
from ryzlab.config import ConfigError
from ryzlab.models.quant import Int8Linear
from ryzlab.models.transformer import load_reference_model
from ryzlab.serve.generate import GenerateRequest, generate
from ryzlab.serve.replica import ReplicaSpec, build_engine

PROMPT = "def parse(path):\n    with open("


def test_generate_with_packed_weights_equals_the_packed_models_own_greedy(capsys):
    from ryzlab.models.quant import quantize_weights

    assert main(["generate", "--prompt", PROMPT, "--max-tokens", "12", "--weights", "int4-g32", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["request"]["weights"] == "int4-g32"
    model = quantize_weights(load_reference_model()[0], "int4-g32")
    ids = torch.tensor([list(PROMPT.encode())])
    assert row["token_ids"] == model.generate(ids, 12)[0].tolist()   # engine + paged cache == dense greedy


def test_bad_weights_are_refused_before_any_work(capsys):
    assert main(["generate", "--prompt", PROMPT, "--weights", "int3"]) != 0
    err = capsys.readouterr().err
    assert "int4-g32" in err and "ternary" in err and "gguf" in err
    with pytest.raises(ConfigError, match="int4 group sizes that fit this model at tp=1: int4-g32, int4-g64"):
        ReplicaSpec(weights="int4-g128")        # the reference's ffn_dim 704 is not whole groups of 128


def test_replica_engine_holds_packed_layers():
    eng = build_engine(ReplicaSpec(weights="int8"))
    try:
        assert isinstance(eng.model.layers[0].attention.wq, Int8Linear)
    finally:
        eng.close()


def test_tp2_generate_with_int4_weights_gives_the_one_rank_tokens():
    one = generate(GenerateRequest(prompt=PROMPT, max_tokens=12, weights="int4-g32-f32"))
    two = generate(GenerateRequest(prompt=PROMPT, max_tokens=12, weights="int4-g32-f32", tp=2, threads=1))
    assert two["token_ids"] == one["token_ids"] and len(one["token_ids"]) == 12
