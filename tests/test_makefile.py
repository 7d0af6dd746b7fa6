"""`make demo` installs only what the demo runs; `make test` adds the test-only and cluster extras (dry runs)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make TARGET` would run for a fresh venv (make -n: nothing is executed)."""
    r = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", target], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if not ln.startswith("make")]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_demo_installs_no_test_extras_and_test_installs_them_after_torch(tmp_path):
    venv = tmp_path / "venv"
    demo, test = dry_run("demo", venv), dry_run("test", venv)
    installs = [ln for ln in demo if "pip install" in ln]
    assert any(ln.endswith("pip install --quiet -e .") for ln in installs), installs
    assert not any("[" in ln for ln in installs), f"the demo installs extras: {installs}"
    assert any("ryzlab sweep specs/demo.yaml" in ln for ln in demo)
    torch_at = next(i for i, ln in enumerate(test) if "pip install --quiet torch==" in ln)
    extras_at = next(i for i, ln in enumerate(test) if "-e '.[test,peers,cluster]'" in ln)
    assert torch_at < extras_at < next(i for i, ln in enumerate(test) if "-m pytest" in ln)
    # .ci/run calls `make test`: everything the tests need comes with it
    assert "make test" in (ROOT / ".ci" / "run").read_text()
