"""kill -9 of the launching process leaves no rank behind (ranks watch their launcher)."""
import os
import selectors
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
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err,
                            start_new_session=True)
    pids: list[int] = []
    out = ""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                out += os.read(proc.stdout.fileno(), 4096).decode()  # raw fd: no hidden buffering
                pids = [int(x.split()[1]) for x in out.split("\n")[:-1] if x.startswith("PID ")]  # whole lines
        assert len(pids) == 2, "ranks did not start: " + (tmp_path / "stderr.txt").read_text()[-3000:]
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
