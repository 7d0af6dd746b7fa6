"""Byte-level text every machine has offline: the Python standard library's own source.

No tokenizer and no download: tokens are bytes (vocab 256). The file list is fixed and
sorted (``*.py`` under ``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and
test suites), and the held-out split is decided per file by a hash of its relative path,
so it is the same on every machine with the same Python version (the data description,
with a content hash, is recorded next to every checkpoint).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["Corpus", "stdlib_corpus", "heldout_windows"]

HELDOUT_PERCENT = 5
"""Files whose path hash falls in the lowest 5 % are held out (~30 of ~670 files)."""
EXCLUDED_PARTS = ("site-packages", "test", "tests", "idlelib")
"""Test suites are huge and repetitive; idlelib is GUI code. Both would dominate the mix."""
SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    """uint8 [N_train] bytes of the training files, concatenated in sorted order."""
    heldout: torch.Tensor
    """uint8 [N_heldout] bytes of the held-out files."""
    description: dict

    def __repr__(self) -> str:
        return f"Corpus(train={self.train.numel()} bytes, heldout={self.heldout.numel()} bytes)"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py")
                  if not set(p.relative_to(root).parts[:-1]) & set(EXCLUDED_PARTS))


def _is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


@functools.lru_cache(maxsize=2)
def stdlib_corpus(root: str | None = None) -> Corpus:
    """Load (and cache) the standard-library corpus; ``root`` defaults to this interpreter's stdlib."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = _files(root_path)
    if not files:
        raise FileNotFoundError(f"no *.py files under {root_path}; pass the stdlib directory explicitly")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    digest = hashlib.sha256()
    n_held = 0
    for p in files:
        rel = p.relative_to(root_path).as_posix()
        data = p.read_bytes()
        digest.update(rel.encode() + b"\0" + data)
        held = _is_heldout(rel)
        n_held += held
        parts[held].append(data)

    def join(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(SEPARATOR.join(chunks)), dtype=torch.uint8)

    train, heldout = join(parts[False]), join(parts[True])
    desc = {
        "source": "python stdlib *.py (sysconfig stdlib path)",
        "python": ".".join(map(str, sys.version_info[:3])),
        "excluded_dirs": list(EXCLUDED_PARTS),
        "heldout_rule": f"sha1(relative path) % 100 < {HELDOUT_PERCENT}",
        "files": len(files), "heldout_files": n_held,
        "train_bytes": train.numel(), "heldout_bytes": heldout.numel(),
        "sha256": digest.hexdigest(),
    }
    log.info("stdlib corpus: %s", desc)
    return Corpus(train=train, heldout=heldout, description=desc)


def heldout_windows(n: int, length: int, *, offset: int = 0, corpus: Corpus | None = None) -> torch.Tensor:
    """``n`` consecutive, non-overlapping held-out windows -> int64 [n, length] (deterministic)."""
    data = (corpus or stdlib_corpus()).heldout
    need = offset + n * length
    if need > data.numel():
        raise ValueError(f"held-out text has {data.numel()} bytes; {n} windows of {length} from offset "
                         f"{offset} need {need}")
    return data[offset:need].view(n, length).long()
