"""Provenance for every run: what code, on what software, on what hardware, when."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def git_state(repo: str | Path | None = None) -> dict[str, Any]:
    """git sha and dirty flag of ``repo`` (default: the checkout ryzlab is imported from)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha or None, "git_dirty": dirty if sha else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_devices() -> list[str]:
    """Names of NVIDIA devices through NVML (nvidia-ml-py); [] when there is no driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVIDIA device here"
        return []
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else name)
        return names
    finally:
        pynvml.nvmlShutdown()


PACKAGES = ("torch", "numpy", "pandas", "pyarrow", "transformers", "triton", "matplotlib", "papermill", "nbconvert",
            "ipykernel", "ipywidgets", "ray", "nvidia-ml-py")
"""Versions recorded with every run (the report's appendix lists them)."""


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def nvidia_driver() -> str | None:
    """The NVIDIA driver version through NVML; None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVIDIA driver here"
        return None
    try:
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    finally:
        pynvml.nvmlShutdown()


def device_summary() -> dict[str, Any]:
    """``device`` is ``cuda`` or ``cpu``: what the experiments actually ran on."""
    import torch

    gpus = nvidia_devices()
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "device_names": gpus if gpus else [cpu_model()],
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu_driver": nvidia_driver() if gpus else None,
    }


def collect_env(**extra: Any) -> dict[str, Any]:
    import torch

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "time_utc": datetime.now(timezone.utc).isoformat(),
        **git_state(),
        **device_summary(),
        "packages": package_versions(),
    }
    env.update(extra)
    return env
