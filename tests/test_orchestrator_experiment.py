"""The orchestrator experiment: tidy rows, mode/device labels, validation before work, notebook contract."""
import ast
from pathlib import Path

import nbformat
import pytest

from ryzlab.config import ConfigError, field_names
from ryzlab.experiments import make_config, run_experiment
from ryzlab.experiments.orchestrator import Config

ROOT = Path(__file__).resolve().parent.parent


def test_simulated_run_rows():
    df = run_experiment("orchestrator", {"mode": "simulated", "policies": ["round_robin", "least_outstanding"],
                                         "loads": [0.9], "worker_counts": [4], "faults": ["none", "pause"],
                                         "num_requests": 1500})
    assert len(df) == 4 and set(df["mode"]) == {"simulated"} and set(df["device"]) <= {"cpu", "cuda"}
    assert (df["work_lost"] == 0).all() and (df["error_rate"] == 0).all()
    pause = df[df["fault"] == "pause"]
    assert ((pause["time_to_detect_s"] - 1.0).abs() < 1e-9).all() and (pause["rerouted"] > 0).all()
    assert df[df["fault"] == "none"]["time_to_detect_s"].isna().all()
    by = df[df["fault"] == "none"].set_index("policy")["e2el_ms_p99"]
    assert by["least_outstanding"] < by["round_robin"]
    for col in ("e2el_ms_p50", "e2el_ms_p90", "e2el_ms_p99", "e2el_ms_p99_9", "throughput_rps", "time_to_recover_s"):
        assert col in df.columns


def test_bad_parameters_rejected_before_work():
    with pytest.raises(ConfigError) as e:
        make_config("orchestrator", {"policies": ["round_robin", "fastest"], "faults": ["explode"], "bogus": 1})
    msg = str(e.value)
    assert "least_outstanding" in msg and "pause" in msg and "bogus" in msg
    with pytest.raises(ConfigError, match="worker_counts >= 2"):
        make_config("orchestrator", {"worker_counts": [1], "faults": ["kill"]})


def test_notebook_parameters_are_the_config_fields():
    nb = nbformat.read(ROOT / "ryzlab" / "notebooks" / "orchestrator.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [t.id for node in ast.parse(cell.source).body for t in node.targets]
    assert names == field_names(Config) + ["run_dir"]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    make_config("orchestrator", {n: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
                                 for n in [node.targets[0].id] if n != "run_dir"})
