"""Opt-in: the multi-node drills on two network namespaces (benchmarks/multinode.py).

Needs root and iproute2 (it creates namespaces, a bridge and veth pairs) and RYZLAB_MULTINODE=1;
skipped otherwise. Runs torchrun across the two "nodes" (token ids equal to one rank's) and the
node-lost and partition drills (survivors exit naming the lost node, no orphans; the partition
one waits out the 120 s collective timeout).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(
    os.environ.get("RYZLAB_MULTINODE") != "1" or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="multi-node drills need root, iproute2 and RYZLAB_MULTINODE=1")]


@pytest.mark.parametrize("drill", ["generate", "lost", "partition"])
def test_drill(drill):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multinode.py"), "--only", drill, "--max-tokens", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=600)
    assert r.returncode == 0 and "[PASS]" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
