"""Per-step timing samples stored beside the medians: ``<run>/samples.parquet``.

Experiments that time a step many times write one metrics row per timed step (column
``sample``). :func:`samples_from_metrics` turns those rows into a tidy table, one row per
(point, metric, sample), so a comparison can bootstrap over the raw steps instead of trusting
one median:

    <the point's parameter and label columns> | metric | sample | value

A metric is stored as samples when it is a time (its name ends in a time unit: ``attn_us``,
``tpot_ms``, ``step_ms``) and varies between the steps of one point. Quantities derived per step
from a timing and a once-per-point measurement (``frac_of_copy_bw`` = KV bandwidth / one copy
bandwidth reading) are left out: their spread over steps says nothing about the noise of the
other factor. Values that are constant over a point's steps (bytes, medians, accuracy) stay in
metrics.parquet only.
"""
from __future__ import annotations

from pathlib import Path

import re

import pandas as pd

SAMPLE = "sample"
TIMING = re.compile(r"_(ms|us|ns|s)$")
"""A per-step timing column: its name ends in a time unit."""
COLUMNS = ("metric", SAMPLE, "value")


def samples_from_metrics(df: pd.DataFrame, params: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Tidy per-step samples of ``df`` (rows with a ``sample`` column); empty when there are none.

    ``params`` are the point's parameter columns (always kept as keys, numeric or not); every
    non-numeric column (device, layout, dtype...) is a key too."""
    if SAMPLE not in df.columns or df.empty:
        return pd.DataFrame(columns=[*params, *COLUMNS])
    params = [p for p in params if p in df.columns]
    numeric = [c for c in df.select_dtypes("number").columns
               if c not in params and c not in (SAMPLE, "repeat") and df[c].dtype != bool]
    keys = [c for c in df.columns if c not in numeric and c != SAMPLE]
    g = df.groupby(keys, dropna=False, sort=False)
    sampled = [c for c in numeric if TIMING.search(c) and (g[c].nunique(dropna=True) > 1).any()]
    if not sampled:
        return pd.DataFrame(columns=[*keys, *COLUMNS])
    long = df[keys + [SAMPLE] + sampled].melt(id_vars=keys + [SAMPLE], value_vars=sampled,
                                              var_name="metric", value_name="value")
    return long.dropna(subset=["value"]).reset_index(drop=True)


def load_samples(run_dir: str | Path, params: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """``samples.parquet`` of a run; derived from its metrics.parquet for runs written before
    samples were stored (same rule, so old and new runs compare)."""
    run_dir = Path(run_dir)
    if (run_dir / "samples.parquet").is_file():
        return pd.read_parquet(run_dir / "samples.parquet")
    if (run_dir / "metrics.parquet").is_file():
        return samples_from_metrics(pd.read_parquet(run_dir / "metrics.parquet"), params)
    return pd.DataFrame(columns=[*params, *COLUMNS])
