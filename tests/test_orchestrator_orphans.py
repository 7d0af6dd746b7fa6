"""kill -9 of the launching process leaves no rank behind (ranks watch their launcher)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from ryzlab.orchestrator import launch

    def rank_fn(rank, world):
        print("PID", os.getpid(), flush=True)
        time.sleep(300)

    if __name__ == "__main__":
        launch(rank_fn, 2, backend="gloo")
""")


def test_ranks_exit_when_launcher_is_killed(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids = []
    try:
        deadline = time.monotonic() + 90
        while len(pids) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("PID"):
                pids.append(int(line.split()[1]))
        assert len(pids) == 2, "ranks did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"orphaned ranks: {alive}"
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
