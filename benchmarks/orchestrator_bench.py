"""Orchestrator benchmark: the issue's numbers, measured on this machine.

1. fault tolerance: 4 live CPU workers under load, 20 injected faults (10 SIGKILL, 10 SIGSTOP)
   -> time to detect (target for a kill <= 2 s), time to recover, work lost (target 0);
2. launch: start-up + teardown of 4 gloo ranks, and the time from a rank raising to the whole
   launch having ended (target <= 5 s) with that rank named;
3. simulation: 90% load, 8 workers, bimodal request sizes -> p99 of power-of-two and
   least-outstanding vs round-robin (target <= 0.5x).

    .venv/bin/python benchmarks/orchestrator_bench.py [--faults 20] [--sim-requests 50000]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from ryzlab.orchestrator import Request, WorkerPool, launch, make_policy
from ryzlab.orchestrator.launch import RankFailedError
from ryzlab.orchestrator.sim import SimConfig, simulate
from ryzlab.provenance import device_summary


def _barrier_rank(rank: int, world: int) -> int:
    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t.item())


def _raise_rank(rank: int, world: int) -> None:
    dist.barrier()
    if rank == 2:
        raise RuntimeError("injected failure on rank 2")
    dist.barrier()  # the others wait here for a rank that never comes


def bench_faults(n_faults: int, workers: int = 4) -> dict:
    ttd = {"kill": [], "pause": []}
    ttr = {"kill": [], "pause": []}
    uid = 0
    with WorkerPool(workers, make_policy("least_outstanding"), mean_work_ms=5.0, heartbeat_interval_s=0.1,
                    heartbeat_timeout_s=1.0) as pool:
        for k in range(n_faults):
            kind = "kill" if k % 2 == 0 else "pause"
            victim = k % workers
            for _ in range(40):  # load before, during and after the fault
                pool.submit(Request(uid, size=2.0))
                uid += 1
                if _ == 20:
                    pool.inject(victim, kind)
                time.sleep(0.005)
            if not pool.wait_all(120.0):
                raise RuntimeError(f"fault {k}: work or recovery did not finish within 120 s")
            f = pool.faults[-1]
            assert f.worker == victim and f.kind == kind, f
            ttd[kind].append(f.detect_t - f.fault_t)
            ttr[kind].append(f.recover_t - f.fault_t)
        rows = pool.unit_rows()
        timeouts = [f.timeout_s for f in pool.faults if f.timeout_s is not None]
    done = sum(r["state"] == "done" for r in rows)
    failed = sum(r["state"] == "failed" for r in rows)
    return {"submitted": len(rows), "done": done, "failed": failed, "lost": len(rows) - done - failed,
            "rerouted": sum(r["attempts"] > 1 for r in rows), "faults_detected": len(pool.faults),
            "ttd": ttd, "ttr": ttr, "timeouts": timeouts}


def bench_launch(reps: int = 3) -> dict:
    t0 = time.perf_counter()
    launch(_barrier_rank, 4, backend="gloo", start_method="spawn")
    spawn_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):  # the first one also starts the fork server (imports torch once)
        t0 = time.perf_counter()
        out = launch(_barrier_rank, 4, backend="gloo")
        times.append(time.perf_counter() - t0)
        assert out == [4, 4, 4, 4]
    try:
        launch(_raise_rank, 4, backend="gloo")
    except RankFailedError as e:
        end = time.time() - e.failed_at
        named = e.rank == 2 and "injected failure on rank 2" in e.remote_traceback
    else:
        raise AssertionError("the raising launch returned")
    return {"startup_teardown_s": times, "raise_to_end_s": end, "rank_named": named, "spawn_s": spawn_s}


def bench_sim(n: int) -> dict:
    p99 = {}
    for policy in ("round_robin", "least_outstanding", "power_of_two"):
        df, _ = simulate(SimConfig(policy=policy, workers=8, load=0.9, num_requests=n, size_dist="bimodal"))
        p99[policy] = float(np.percentile(df["e2el_ms"], 99))
    return p99


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--sim-requests", type=int, default=50_000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    dev = device_summary()
    print(f"device={dev['device']} ({dev['device_names'][0]}), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")

    lb = bench_launch()
    st = lb["startup_teardown_s"]
    print(f"\n[launch] 4 gloo ranks, start-up + all_reduce + teardown (fork server): "
          f"{', '.join(f'{t:.2f}' for t in st)} s; the first includes starting the fork server")
    print(f"  same with start_method='spawn' (torch imported by every rank): {lb['spawn_s']:.2f} s")
    print(f"  rank 2 raises -> launch ended (others stopped) in {lb['raise_to_end_s']:.2f} s, rank named: "
          f"{lb['rank_named']}  (target <= 5 s: {'met' if lb['raise_to_end_s'] <= 5 else 'NOT met'})")

    f = bench_faults(args.faults)
    kill, pause = f["ttd"]["kill"], f["ttd"]["pause"]
    print(f"\n[faults] 4 live workers, {args.faults} injected faults ({len(kill)} kill, {len(pause)} pause)")
    print(f"  time to detect, kill : median {statistics.median(kill):.3f} s, max {max(kill):.3f} s  "
          f"(target <= 2 s: {'met' if max(kill) <= 2 else 'NOT met'})")
    if pause:
        to = f["timeouts"]
        print(f"  time to detect, pause: median {statistics.median(pause):.3f} s, max {max(pause):.3f} s  "
              f"(heartbeat timeout from measured gaps, floor 1.0 s"
              + (f": {min(to):.2f}-{max(to):.2f} s at detection)" if to else ")"))
    for kind, r in f["ttr"].items():
        if r:
            print(f"  time to recover, {kind:5s} (replacement serving + re-routed work done): median "
                  f"{statistics.median(r):.2f} s, max {max(r):.2f} s")
    print(f"  units: {f['submitted']} submitted, {f['done']} done, {f['failed']} failed, {f['rerouted']} re-routed, "
          f"lost {f['lost']}  (target 0: {'met' if f['lost'] == 0 else 'NOT met'})")

    p99 = bench_sim(args.sim_requests)
    rr = p99["round_robin"]
    print(f"\n[simulation, mode=simulated] 8 workers, 90% load, bimodal sizes, {args.sim_requests} requests")
    for name, v in p99.items():
        print(f"  {name:18s} p99 {v:8.1f} ms  ({v / rr:.2f}x round-robin)")
    best = min(p99["least_outstanding"], p99["power_of_two"]) / rr
    print(f"  target <= 0.5x: least_outstanding {p99['least_outstanding'] / rr:.2f}x, power_of_two "
          f"{p99['power_of_two'] / rr:.2f}x -> {'met' if best <= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
