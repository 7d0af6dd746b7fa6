"""`ryzlab report` leaves no kernel client behind: the report's process ends without traitlets' warning."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from test_report import attn_rows, make_sweep


@pytest.mark.timeout(300)
def test_report_stops_its_kernel_clients_channels(tmp_path):
    """nbclient stops a kernel client's channels only when it made the kernel manager; build_report hands it
    one, so each report ended with 'WARNING traitlets: Could not destroy zmq context' (issue 23)."""
    rng = np.random.default_rng(0)
    root = make_sweep(tmp_path / "s", {f"attention_bench-{c}": attn_rows(c, "float32", 50 + rng.random(5))
                                       for c in (64, 128)})
    r = subprocess.run([sys.executable, "-m", "ryzlab", "report", str(root)], capture_output=True, text=True,
                       timeout=280)
    assert r.returncode == 0, r.stderr
    assert (root / "report.html").stat().st_size > 0
    assert "zmq context" not in r.stderr and "WARNING" not in r.stderr, r.stderr
