"""Every notebook, experiment and spec in the repo fits the contract (docs/internal/contracts.md)."""
from __future__ import annotations

import importlib
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from ryzlab.experiments import EXPERIMENTS, experiment_module
from ryzlab.workbench.sweep import expand, load_spec, validate

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "ryzlab" / "notebooks").glob("*.ipynb"))
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"
    assert pm.inspect_notebook(str(path)), f"{path.name} has no cell tagged 'parameters'"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_has_notebook_plots_and_matching_parameters(name):
    nb = ROOT / "ryzlab" / "notebooks" / f"{name}.ipynb"
    assert nb.is_file(), f"experiment {name} has no notebook"
    params = set(pm.inspect_notebook(str(nb)))
    mod = experiment_module(name)
    fields = {f for f in mod.Config.__dataclass_fields__ if mod.Config.__dataclass_fields__[f].init}
    assert params - {"run_dir"} == fields, f"{name}: notebook parameters differ from Config fields"
    assert "run_dir" in params
    assert callable(importlib.import_module(f"ryzlab.plots.{name}").report)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_every_spec_validates(spec):
    points = expand(load_spec(spec))
    assert points
    validate(points)
