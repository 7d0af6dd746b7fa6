"""Byte-level text every machine has offline: the Python standard library's own source.

:func:`token_stream` / :func:`text_windows` tokenize it (or any text file) with a model's
tokenizer, so a loaded checkpoint is scored on the same held-out text as the reference model.

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
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["Corpus", "stdlib_corpus", "heldout_windows", "token_stream", "text_windows"]

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


def token_stream(tokenizer: Any, n_tokens: int, *, text: str | Path | None = None) -> torch.Tensor:
    """The first ``n_tokens`` tokens (or all, if fewer) of ``text`` -> int64 [<= n_tokens].

    ``text``: a file path (read as UTF-8); ``None``/empty = the held-out stdlib text. The byte
    tokenizer on the default text takes the held-out bytes as they are (identical to
    :func:`heldout_windows`); any other tokenizer encodes the text without special tokens (no BOS
    in the middle of a document), growing the encoded prefix until it has enough tokens.
    """
    from ryzlab.models.tokenizer import ByteTokenizer

    if not text:
        if isinstance(tokenizer, ByteTokenizer):
            return stdlib_corpus().heldout[:n_tokens].long()
        raw = bytes(stdlib_corpus().heldout.tolist()).decode("utf-8", errors="replace")
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"text file {str(path)!r} does not exist (empty = the held-out stdlib text)")
        raw = path.read_text(encoding="utf-8", errors="replace")
    chars = min(len(raw), max(4096, 6 * n_tokens))
    while True:  # BPE merges cross any cut, so encode a growing prefix and keep the first n_tokens
        ids = tokenizer.encode(raw[:chars], add_special_tokens=False)
        if len(ids) > n_tokens or chars >= len(raw):
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
        chars = min(len(raw), 2 * chars)


def text_windows(tokenizer: Any, n: int, length: int, *, text: str | Path | None = None, offset: int = 0
                 ) -> torch.Tensor:
    """``n`` consecutive, non-overlapping windows of ``length`` tokens from ``offset`` -> int64 [n, length]."""
    need = offset + n * length
    ids = token_stream(tokenizer, need, text=text)
    if ids.numel() < need:
        raise ValueError(f"{'held-out stdlib text' if not text else text} gives {ids.numel()} tokens; {n} windows of "
                         f"{length} from offset {offset} need {need}")
    return ids[offset:need].view(n, length)
