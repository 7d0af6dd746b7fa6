"""Process-tree helpers for tests that check for orphans (imported by the test modules)."""
from __future__ import annotations

import psutil


def _is_forkserver(p: psutil.Process) -> bool:
    """multiprocessing's fork server itself: its command line names it and its parent is not one
    (ranks forked by it inherit the same command line, but their parent is the server)."""
    try:
        if "forkserver" not in " ".join(p.cmdline()):
            return False
        parent = p.parent()
        return parent is None or "forkserver" not in " ".join(parent.cmdline())
    except psutil.NoSuchProcess:
        return False


def live_descendants(pid: int | None = None) -> list[psutil.Process]:
    """Live (non-zombie) descendants of ``pid`` (default: this process), minus multiprocessing's
    long-lived helpers (the resource tracker and the fork server itself): what must not outlive a run."""
    out = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            if c.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(c.cmdline()):
                continue
            if not _is_forkserver(c):
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def run_in_own_session(cmd: list[str], *, timeout: float, cwd=None) -> tuple[int, str, str]:
    """Run ``cmd`` in its own process group -> (returncode, stdout, stderr); on a timeout the whole
    group (torchrun and its workers) is killed, so nothing is orphaned, and the timeout re-raised."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stdout, stderr
