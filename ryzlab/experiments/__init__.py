"""One pure function per experiment: typed config in, tidy DataFrame out.

Each experiment is a module ``ryzlab.experiments.<name>`` exposing ``Config`` (a frozen,
keyword-only dataclass whose fields are exactly the notebook's parameters) and
``run(config) -> pandas.DataFrame``. The notebook ``notebooks/<name>.ipynb`` has a cell tagged
``parameters`` holding those fields plus ``run_dir = None``, and calls :func:`run_experiment`.
Adding an experiment is one module, one notebook and one line in ``EXPERIMENTS``.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from ryzlab.config import ConfigError, field_names, from_dict

log = logging.getLogger(__name__)

# notebook stem -> module; modules are imported lazily so `ryzlab --help` stays fast.
EXPERIMENTS: dict[str, str] = {
    "attention_bench": "ryzlab.experiments.attention_bench",
    "kv_compression": "ryzlab.experiments.kv_compression",
    "weight_compression": "ryzlab.experiments.weight_compression",
    "serving": "ryzlab.experiments.serving",
    "scaling": "ryzlab.experiments.scaling",
    "orchestrator": "ryzlab.experiments.orchestrator",
    "projection": "ryzlab.experiments.projection",
}
RESERVED = ("run_dir",)
"""Notebook parameters that belong to the sweep machinery, not to the experiment config."""


def experiment_module(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ConfigError([f"unknown experiment {name!r}; valid experiments: {', '.join(sorted(EXPERIMENTS))}"])
    return importlib.import_module(EXPERIMENTS[name])


def make_config(name: str, params: dict[str, Any]) -> Any:
    """Validate ``params`` against the experiment's typed config (every problem in one error)."""
    return from_dict(experiment_module(name).Config, params, where=name, ignore=RESERVED)


def notebook_params(name: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Pick the experiment's parameters out of a notebook's globals (after papermill injection)."""
    cfg_cls = experiment_module(name).Config
    return {k: namespace[k] for k in field_names(cfg_cls) if k in namespace}


def param_column(value: Any, index: pd.Index) -> Any:
    """One parameter as a column over ``index``: tuples and lists as a tuple in every row (an object
    column; pandas would spread a bare sequence over the rows), a dict as its sorted JSON text."""
    import json

    if isinstance(value, (tuple, list)):
        return pd.Series([tuple(value)] * len(index), index=index, dtype=object)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def run_experiment(name: str, params: dict[str, Any], run_dir: str | Path | None = None) -> pd.DataFrame:
    """Validate, run, label the rows with the parameters, and save ``metrics.parquet`` if asked.

    Every row gets the experiment's parameters as columns (tidy: filter/group by them in the
    report) unless the experiment already set a column of that name. A parameter keeps its type:
    a sequence (``layer_codecs``, ``policies``) is a tuple in every row and a list column in
    ``metrics.parquet`` (:func:`ryzlab.io.read_parquet` gives the tuples back), never its ``str()``.
    """
    import time

    from ryzlab.io import write_json, write_parquet
    from ryzlab.samples import samples_from_metrics

    config = make_config(name, params)
    t0 = time.perf_counter()
    df = experiment_module(name).run(config)
    compute_s = time.perf_counter() - t0
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"experiment {name!r} returned {type(df).__name__}, not a DataFrame")
    for key in field_names(type(config)):
        if key not in df.columns:
            df[key] = param_column(getattr(config, key), df.index)
    if "experiment" not in df.columns:
        df.insert(0, "experiment", name)
    if run_dir is not None:
        # timing.json lets the sweep separate the experiment's own time from its overhead
        write_json(Path(run_dir) / "timing.json", {"compute_s": compute_s})
        write_parquet(Path(run_dir) / "metrics.parquet", df)
        # raw per-step timings beside the medians: what `ryzlab compare` bootstraps over
        write_parquet(Path(run_dir) / "samples.parquet", samples_from_metrics(df, field_names(type(config))))
        log.info("wrote %d rows to %s", len(df), Path(run_dir) / "metrics.parquet")
    return df
