"""The ryzlab command line: help, info, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import yaml


def ryzlab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ryzlab.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_help_lists_commands():
    r = ryzlab("--help")
    assert r.returncode == 0
    for word in ("sweep", "report", "info", "examples:"):
        assert word in r.stdout
    assert "--jobs" in ryzlab("sweep", "--help").stdout


def test_info_says_what_hardware_is_present():
    r = ryzlab("info")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "python" in r.stdout
    import torch

    if not torch.cuda.is_available():
        assert "no NVIDIA device: CPU ranks" in r.stdout


def test_bad_spec_gives_clear_error_and_exit_2(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"notebook": "attention_bench", "grid": {"dtype": ["fp7"]}}))
    r = ryzlab("sweep", str(spec), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "dtype='fp7' is not valid; choose one of" in r.stderr
    assert not (tmp_path / "out").exists()
    assert ryzlab("sweep", str(tmp_path / "missing.yaml")).returncode == 2


def test_report_on_a_folder_that_is_not_a_sweep(tmp_path):
    r = ryzlab("report", str(tmp_path))
    assert r.returncode == 2 and "no manifest.jsonl" in r.stderr
    assert list(tmp_path.iterdir()) == []
