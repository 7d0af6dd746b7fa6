"""Ray across two nodes (network namespaces, root required): a sweep spread over both, one node killed.

``ray start --head`` in node a (10.77.0.1), ``ray start --address`` in node b (10.77.0.2), one CPU
each. ``ryzlab sweep SPEC --executor ray --address 10.77.0.1:PORT`` (run in node a) gets four
points of a notebook that reports it is running (its kernel pid, in a shared folder) and then
waits for a go-file. Once one point runs on each node, every process of node b is killed
(raylet, workers, the point's kernel: the whole node), then the go-file appears. Expected: the
point that was on node b is submitted again and runs on node a; nothing of its first attempt is
in the results folder; the manifest says, per point, the node of each attempt.

    sudo PYTHONPATH=$PWD .venv/bin/python benchmarks/multinode_ray.py [--keep]

Ray's token authentication: when ``~/.ray/auth_token`` exists, every process of the cluster (and
the driver) runs with ``RAY_AUTH_MODE=token`` here, so all of them agree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multinode import NODES, ROOT, check_host, kill_ns, netns, ns_pids  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
WAITS = ROOT / "tests" / "fixtures" / "waits.ipynb"


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    if (Path.home() / ".ray" / "auth_token").exists():
        e["RAY_AUTH_MODE"] = "token"
    return e


def in_ns(node: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", NODES[node][0], *cmd], env=env(), cwd=ROOT, **kw)


def start_cluster(port: int, tmp: Path) -> None:
    a, b = NODES["a"][1], NODES["b"][1]
    for node, cmd in (("a", ["--head", "--node-ip-address", a, "--port", str(port), "--include-dashboard", "false"]),
                      ("b", ["--address", f"{a}:{port}", "--node-ip-address", b])):
        r = in_ns(node, [RAY, "start", *cmd, "--num-cpus", "1", "--disable-usage-stats",
                         "--temp-dir", str(tmp / f"ray-{node}")], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start on node {node} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def point_node(pid: int) -> str | None:
    for node, (ns, _) in NODES.items():
        if pid in ns_pids(ns):
            return node
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=6390)
    ap.add_argument("--keep", action="store_true", help="leave the namespaces up")
    args = ap.parse_args()
    why = check_host()
    if why:
        print(f"multinode_ray: cannot run here: {why}", file=sys.stderr)
        return 2
    print(netns("up"), end="")
    ok = False
    with tempfile.TemporaryDirectory(prefix="ryzlab-ray2-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        sig, go, out = tmp / "sig", tmp / "go", tmp / "out"
        sig.mkdir()
        spec = tmp / "spec.yaml"
        spec.write_text(yaml.safe_dump({"name": "twonodes", "notebook": str(WAITS), "grid": {"x": [1, 2, 3, 4]},
                                        "fixed": {"signal_dir": str(sig), "wait_for": str(go)}}))
        try:
            t0 = time.monotonic()
            start_cluster(args.port, tmp)
            print(f"ray cluster: head on node a ({NODES['a'][1]}), worker on node b ({NODES['b'][1]}), "
                  f"{time.monotonic() - t0:.1f} s to start")
            log = open(tmp / "sweep.log", "wb")
            sweep = subprocess.Popen(["ip", "netns", "exec", NODES["a"][0], sys.executable, "-m", "ryzlab", "sweep",
                                      str(spec), "--out", str(out), "--executor", "ray", "--address",
                                      f"{NODES['a'][1]}:{args.port}", "--retries", "1"],
                                     env=env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            where: dict[int, str | None] = {}
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and sweep.poll() is None:
                running = {int(p.name.split("-")[1]): int(p.name.split("-")[2]) for p in sig.glob("running-*")}
                where = {x: point_node(pid) for x, pid in running.items()}
                if {"a", "b"} <= set(where.values()):
                    break
                time.sleep(0.2)
            spread = sorted(where.items())
            on_b = [x for x, n in where.items() if n == "b"]
            print(f"points running at once: {spread} (x -> node)")
            killed = kill_ns(NODES["b"][0])
            print(f"killed node b: {killed} processes (raylet, Ray workers, point {on_b}'s kernel)")
            half = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.exists() else []
            go.touch()
            rc = sweep.wait(timeout=600)
            log.close()
            rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()] if (
                out / "manifest.jsonl").exists() else []
            for r in rows:
                print(f"  x={r['params'].get('x')}: {r['status']}, attempts {r.get('attempts')}, "
                      f"nodes of the attempts {r.get('attempt_nodes')}, ran on {r.get('ray_node')}")
            folders = sorted(p.name for p in out.iterdir() if p.is_dir())
            retried = [r for r in rows if r["params"].get("x") in on_b]
            ok = (rc == 0 and len(rows) == 4 and all(r["status"] == "ok" for r in rows) and bool(on_b)
                  and {"a", "b"} <= set(where.values()) and not half and len(folders) == 4
                  and all(r["attempts"] == 2 and r["ray_node"] == NODES["a"][1]
                          and r.get("attempt_nodes", [None])[0] == NODES["b"][1] for r in retried))
            print(f"[{'PASS' if ok else 'FAIL'}] sweep rc {rc}; run folders {len(folders)} (before go, while "
                  f"node b's point was dead: {half or 'none'}); points spread over both nodes: "
                  f"{sorted(set(where.values()))}")
            if not ok:
                print((tmp / "sweep.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        finally:
            for ns, _ in NODES.values():
                kill_ns(ns)
            if not args.keep:
                netns("down")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
