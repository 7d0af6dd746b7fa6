"""Availability soak: ``ryzlab serve --workers 2`` under steady bounded load while workers die.

A real server process (``ryzlab serve --workers 2 [--tp 2]``, HTTP on localhost) serves a closed
loop of ``--clients`` clients (each sends its next greedy completion when the previous one is
answered: bounded load), for ``--duration`` seconds. Meanwhile a healthy worker is killed
(SIGKILL) every ``--kill-every`` seconds and one paused (SIGSTOP, left for the router's
heartbeat watchdog to find) every ``--stop-every`` seconds, alternating workers. Reported:

* availability = successful requests / all requests (a client answered 429/503 waits as
  ``Retry-After`` asks, at most ``--max-backoff``, before its next try), and the time-weighted fraction of the run
  at least one worker was ready (``/health`` polled every 0.25 s; a poll that is not answered
  counts as not ready); seed target 99.9 %;
* mean (and max) time to recovery: fault injected -> that worker ready again (a new pid);
* requests re-routed (the router's counter), failures by status;
* tokens identical to a fault-free run: every successful answer against the same prompt's answer
  before any fault (greedy);
* RSS and open file descriptors of the server and of its whole process tree at start and end.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/soak.py [--duration 600] [--tp 1 --tp 2]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"Request {i}: the quick brown fox" + " jumps" * (i % 4) for i in range(8)]


@dataclass
class Run:
    requests: list[tuple[float, float, int, str]] = field(default_factory=list)
    """(t0, t1, status, outcome) per request; outcome 'ok' | 'wrong' | error text."""
    health: list[tuple[float, int, dict[int, int | None]]] = field(default_factory=list)
    """(t, healthy workers (-1 = no answer), {worker: pid if healthy else None})."""
    faults: list[tuple[float, str, int, int]] = field(default_factory=list)
    """(t, kind, worker index, pid)."""


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def footprint(pid: int) -> dict[str, float]:
    procs = tree(pid)
    rss, fds = 0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.Error:  # a worker that just died
            pass
    srv = psutil.Process(pid)
    return {"server_rss_mib": srv.memory_info().rss / 2**20, "server_fds": srv.num_fds(),
            "tree_rss_mib": rss / 2**20, "tree_fds": fds, "tree_processes": len(procs)}


def start_server(port: int, tp: int, workers: int, model: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ryzlab", "serve", "--port", str(port), "--workers", str(workers),
           "--tp", str(tp), "--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def wait_ready(base: str, workers: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            h = httpx.get(f"{base}/health", timeout=5).json()
            if h.get("healthy_workers") == workers:
                return
        except (httpx.HTTPError, ValueError):  # not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:g} s")


def complete(client: httpx.Client, base: str, prompt: str, max_tokens: int) -> tuple[int, str, float]:
    """(status, text or error, seconds the server asked to wait before the next try)."""
    r = client.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                    timeout=120)
    if r.status_code != 200:
        try:
            wait = float(r.headers.get("Retry-After", 0))
        except ValueError:
            wait = 0.0
        return r.status_code, r.text[:200], wait
    return 200, r.json()["choices"][0]["text"], 0.0


def soak(tp: int, args: argparse.Namespace) -> dict:
    base = f"http://127.0.0.1:{args.port}"
    log = Path(args.logs) / f"serve-tp{tp}.log"
    proc = start_server(args.port, tp, 2, args.model, log)
    try:
        wait_ready(base, 2, proc)
        with httpx.Client() as c:
            reference = {p: complete(c, base, p, args.max_tokens) for p in PROMPTS}
        if any(s != 200 for s, _, _ in reference.values()):
            raise RuntimeError(f"fault-free reference failed: {reference}")
        ref = {p: t for p, (_, t, _) in reference.items()}
        stats0 = httpx.get(f"{base}/stats", timeout=10).json()
        time.sleep(2)  # the reference's allocations settle before the start figures are read
        start = footprint(proc.pid)
        run = Run()
        stop = threading.Event()
        t_start = time.monotonic()
        t_end = t_start + args.duration

        def client(i: int) -> None:
            with httpx.Client() as c:
                k = i
                while not stop.is_set():
                    p = PROMPTS[k % len(PROMPTS)]
                    k += 1
                    t0 = time.monotonic()
                    wait = 0.0
                    try:
                        status, text, wait = complete(c, base, p, args.max_tokens)
                        outcome = ("ok" if text == ref[p] else "wrong") if status == 200 else text
                    except httpx.HTTPError as e:  # refused / reset / timed out: a failed request
                        status, outcome = 0, f"{type(e).__name__}: {e}"
                    run.requests.append((t0, time.monotonic(), status, outcome))
                    if status in (429, 503):  # a polite client: back off as asked (bounded load)
                        stop.wait(min(max(wait, 0.1), args.max_backoff))

        def monitor() -> None:
            with httpx.Client() as c:
                while not stop.is_set():
                    t = time.monotonic()
                    try:
                        h = c.get(f"{base}/health", timeout=2).json()
                        run.health.append((t, h["healthy_workers"], {w["worker"]: w["pid"] if w["healthy"] else None
                                                                    for w in h["workers"]}))
                    except (httpx.HTTPError, ValueError, KeyError):  # no answer: counted as not ready
                        run.health.append((t, -1, {}))
                    stop.wait(0.25)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=monitor, daemon=True))
        for t in threads:
            t.start()
        next_kill, next_stop, victim = t_start + args.kill_every, t_start + args.stop_every, 0
        while time.monotonic() < t_end:
            now = time.monotonic()
            due = [(next_kill, "kill"), (next_stop, "stop")]
            when, kind = min(due)
            if now < when:
                time.sleep(min(0.1, when - now))
                continue
            pids = run.health[-1][2] if run.health else {}
            healthy = [w for w, pid in sorted(pids.items()) if pid]
            if healthy:  # a worker that is still recovering is not hit again
                w = healthy[victim % len(healthy)] if len(healthy) > 1 else healthy[0]
                victim += 1
                pid = pids[w]
                try:
                    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)] if kind == "kill" \
                            else [psutil.Process(pid)]:
                        p.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                    run.faults.append((time.monotonic(), kind, w, pid))
                except psutil.Error:  # died in between
                    pass
            if kind == "kill":
                next_kill += args.kill_every
            else:
                next_stop += args.stop_every
        stop.set()
        for t in threads:
            t.join(timeout=180)
        time.sleep(2)
        stats1 = httpx.get(f"{base}/stats", timeout=10).json()
        end = footprint(proc.pid)
        return summarize(run, t_start, time.monotonic(), start, end, stats0, stats1, tp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def summarize(run: Run, t0: float, t1: float, start: dict, end: dict, stats0: dict, stats1: dict, tp: int) -> dict:
    reqs = run.requests
    ok = sum(1 for r in reqs if r[2] == 200 and r[3] == "ok")
    wrong = sum(1 for r in reqs if r[2] == 200 and r[3] == "wrong")
    failed: dict[str, int] = {}
    for r in reqs:
        if r[2] != 200:
            failed[str(r[2])] = failed.get(str(r[2]), 0) + 1
    # time-weighted: each health sample holds until the next one
    h = [x for x in run.health if x[0] <= t1]
    up = total = 0.0
    for (t, n, _), (tn, _, _) in zip(h, h[1:] + [(t1, 0, {})]):
        total += tn - t
        up += (tn - t) if n >= 1 else 0.0
    # recovery: the faulted worker ready again with another pid
    mttr = []
    for tf, _, w, pid in run.faults:
        back = next((t for t, _, pids in h if t > tf and pids.get(w) not in (None, pid)), None)
        if back is not None:
            mttr.append(back - tf)
    return {"tp": tp, "duration_s": round(t1 - t0, 1), "requests": len(reqs), "successful": ok,
            "wrong_tokens": wrong, "failed_by_status": failed,
            "availability_requests": ok / len(reqs) if reqs else float("nan"),
            "availability_time": up / total if total else float("nan"),
            "faults": {"kill": sum(f[1] == "kill" for f in run.faults), "stop": sum(f[1] == "stop" for f in run.faults)},
            "recovered": len(mttr), "mttr_s_mean": statistics.mean(mttr) if mttr else float("nan"),
            "mttr_s_max": max(mttr) if mttr else float("nan"),
            "rerouted": stats1.get("rerouted", 0) - stats0.get("rerouted", 0),
            "worker_restarts": stats1.get("worker_restarts", 0) - stats0.get("worker_restarts", 0),
            "start": {k: round(v, 1) for k, v in start.items()}, "end": {k: round(v, 1) for k, v in end.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load per configuration (default 600)")
    ap.add_argument("--tp", type=int, action="append", choices=[1, 2],
                    help="tensor-parallel ranks per replica; repeat for several (default: 1 then 2)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients (default 4)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kill-every", type=float, default=30.0)
    ap.add_argument("--stop-every", type=float, default=45.0)
    ap.add_argument("--max-backoff", type=float, default=1.0,
                    help="longest wait after a 429/503 before the next try (default 1 s; Retry-After otherwise)")
    ap.add_argument("--model", default="reference")
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--logs", default="/tmp", help="folder for the server's log (default /tmp)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.max_tokens < 1 or args.kill_every <= 0 or args.stop_every <= 0:
        ap.error("--duration, --clients, --max-tokens, --kill-every and --stop-every must be positive")
    from ryzlab.provenance import device_summary

    print(f"device: {device_summary()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    out = []
    for tp in args.tp or [1, 2]:
        r = soak(tp, args)
        out.append(r)
        print(f"\n== ryzlab serve --workers 2 --tp {tp}: {r['duration_s']} s, {args.clients} clients, "
              f"kill every {args.kill_every:g} s, SIGSTOP every {args.stop_every:g} s")
        print(f"availability: requests {r['successful']}/{r['requests']} = {100 * r['availability_requests']:.3f} %, "
              f"time with >= 1 worker ready {100 * r['availability_time']:.3f} % (target 99.9 %)")
        print(f"faults {r['faults']}, recovered {r['recovered']}, MTTR mean {r['mttr_s_mean']:.2f} s "
              f"max {r['mttr_s_max']:.2f} s; re-routed {r['rerouted']}; restarts {r['worker_restarts']}; "
              f"failed by status {r['failed_by_status'] or 'none'}; answers differing from fault-free: {r['wrong_tokens']}")
        print(f"start: {r['start']}\nend:   {r['end']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
