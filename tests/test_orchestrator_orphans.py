"""kill -9 of the launching process leaves no rank behind (ranks watch their launcher)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

SCRIPT = textwrap.dedent("""
    import os, pathlib, sys, time
    from ryzlab.orchestrator import launch

    def rank_fn(rank, world, out):
        # one file per rank, renamed into place: ranks sharing a stdout pipe interleave their writes
        tmp = pathlib.Path(out) / f"rank{rank}.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.rename(pathlib.Path(out) / f"rank{rank}.pid")
        time.sleep(300)

    if __name__ == "__main__":
        launch(rank_fn, 2, args=(sys.argv[1],), backend="gloo")
""")


def test_ranks_exit_when_launcher_is_killed(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120  # waits for the files (the event), bounded only against a hang
        while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
            time.sleep(0.05)
        assert len(pids) == 2, "ranks did not start: " + (tmp_path / "stderr.txt").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # poll for the event (the ranks exit); the bound only ends a hang (issue 24: 10 s decided it under load)
        procs = []
        for p in pids:
            try:
                procs.append(psutil.Process(p))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=120)
        alive = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"orphaned ranks: {alive}"
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
