"""Every process a sweep point started ends with the point, and its temp files go too.

A notebook can leave its point's process groups: a ``setsid`` child starts a session of its own,
and a double-forked daemon is re-parented to init, so killing the kernel's group missed both
(they outlived the sweep, killed or not). Two nets catch them:

* the point's worker is a **child subreaper** (``PR_SET_CHILD_SUBREAPER``): an orphan below it
  is re-parented to the worker instead of init, so the worker's process tree holds every
  descendant while the worker lives;
* every process of a point carries a **tag** in its environment (``RYZLAB_POINT_TAG``), so the
  sweep can find them after the worker itself was SIGKILLed (``--timeout``).

A worker killed by ``kill -9`` of its sweep removes its kernel's folder (``ryzlab-k-<pid>-*``,
with the connection file and ipc sockets) before it dies; a folder whose worker is gone anyway
(SIGKILLed) is removed by the next sweep (:func:`clean_stale_temp`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

__all__ = ["TAG_VAR", "become_subreaper", "descendants", "tagged", "kill_all", "kernel_dir", "clean_stale_temp"]

log = logging.getLogger(__name__)

TAG_VAR = "RYZLAB_POINT_TAG"
PR_SET_CHILD_SUBREAPER = 36
KERNEL_DIR_PREFIX = "ryzlab-k-"
_KERNEL_DIR = re.compile(rf"{KERNEL_DIR_PREFIX}(\d+)-\w+")


def become_subreaper() -> bool:
    """Linux: orphaned descendants of this process are re-parented to it (False elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:  # not Linux / no libc.so.6: the environment tag still finds them
        return False


def _live_procs() -> dict[int, int]:
    """pid -> parent pid of every process that is not a zombie (from /proc)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
        if fields and fields[0] not in ("Z", "X"):
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(root: int, procs: dict[int, int] | None = None) -> list[int]:
    """Live descendants of ``root`` (children, their children, ...)."""
    procs = _live_procs() if procs is None else procs
    children: dict[int, list[int]] = {}
    for pid, ppid in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tagged(tag: str, procs: dict[int, int] | None = None) -> list[int]:
    """Live processes whose environment holds ``RYZLAB_POINT_TAG=tag``."""
    procs = _live_procs() if procs is None else procs
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for pid in procs:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in env.split(b"\0"):
            out.append(pid)
    return out


def kill_all(root: int | None = None, tag: str | None = None, *, rounds: int = 20) -> int:
    """SIGKILL every live descendant of ``root`` and every process tagged ``tag`` (never this
    process), until none is left: a process may fork while we look, so look again. Returns how
    many were killed."""
    me, killed = os.getpid(), 0
    for _ in range(rounds):
        procs = _live_procs()
        victims = set(descendants(root, procs) if root else ()) | set(tagged(tag, procs) if tag else ())
        victims.discard(me)
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def kernel_dir() -> str:
    """A private folder for this process's kernel (ipc sockets, connection file), named after
    this process so that a later sweep can tell whether its owner is gone."""
    return tempfile.mkdtemp(prefix=f"{KERNEL_DIR_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_temp(tmp: str | os.PathLike | None = None) -> int:
    """Remove kernel folders (``ryzlab-k-<pid>-*``) whose worker process is gone; returns how many."""
    removed = 0
    base = Path(tmp or tempfile.gettempdir())
    try:
        entries = list(base.iterdir())
    except OSError:  # no temp folder to read: nothing to clean
        return 0
    for p in entries:
        m = _KERNEL_DIR.fullmatch(p.name)
        if (m and p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid()
                and not _alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d stale kernel folder(s) of killed sweeps from %s", removed, base)
    return removed
