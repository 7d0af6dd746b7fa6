"""Atomic writes for results: a reader (or a resumed sweep) never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
    return _atomic(Path(path), lambda f: f.write(data))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(Path(path), lambda f: f.write(data))


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Tuple cells (sequence parameters such as ``layer_codecs``) are stored as parquet list columns."""
    return _atomic(Path(path), lambda f: df.to_parquet(f, index=False))


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """``pd.read_parquet`` with list columns back as tuples, as :func:`write_parquet` was given them."""
    return tuples_from_lists(pd.read_parquet(path))


def tuples_from_lists(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet list cells (numpy arrays after reading) -> tuples, in place: a sequence parameter is a
    tuple in every DataFrame ryzlab hands out, the type its config holds (hashable, so it groups)."""
    import numpy as np

    for c in df.columns:
        if df[c].dtype == object and df[c].map(lambda v: isinstance(v, np.ndarray)).any():
            df[c] = df[c].map(lambda v: tuple(v.tolist()) if isinstance(v, np.ndarray) else v)
    return df


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one line in a single write(), so concurrent writers never interleave a line."""
    line = (json.dumps(obj, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, skipping a torn last line (a writer killed mid-append)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
