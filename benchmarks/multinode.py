"""Multi-node drills on one Linux machine: two network namespaces as two nodes (root required).

Each "node" is a network namespace with its own address on a bridge (``benchmarks/netns.sh``),
so rendezvous, gloo's connections and failures are real TCP between distinct addresses. Drills:

1. **torchrun across two nodes**: ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d
   --rdzv-endpoint 10.77.0.1:PORT -m ryzlab generate --tp 2 --cp 2`` started in both namespaces;
   its token ids against one rank's (``ryzlab generate`` with no torchrun).
2. **scaling point across two nodes**: ``torchrun ... -m ryzlab.experiments.scaling`` (tp 2 x cp 2)
   beside the same point on one node; the rows' ``nodes`` and ``interconnect``.
3. **node lost mid-decode**: the same generate job with a long completion; once node a's rank 0
   says it is loading, and after ``--kill-after`` more seconds, every process of node b is killed
   (SIGKILL). Node a's ranks must exit with a message naming node b (and how many decode tokens
   had run: > 0 proves the kill landed in decode), well before the collective timeout, leaving no
   process behind in node a.
4. **node cut off mid-decode** (``partition``): as 3, but node b's link goes down instead (no
   connection reset reaches node a): node a's ranks must exit naming node b within the
   collective timeout (120 s) plus the probes.

Ray across two nodes: ``benchmarks/multinode_ray.py``.

    sudo PYTHONPATH=$PWD .venv/bin/python benchmarks/multinode.py [--max-tokens 16] [--keep]

Exit status 0 when every drill passed. The namespaces are removed at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETNS_SH = HERE / "netns.sh"
NODES = {"a": ("ryz-a", "10.77.0.1"), "b": ("ryz-b", "10.77.0.2")}
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
COLLECTIVE_TIMEOUT_S = 120.0  # ryzlab.orchestrator.init_from_env's default
PROMPT = "The quick brown fox"


def check_host() -> str | None:
    """Why the drills cannot run here, or None."""
    if os.geteuid() != 0:
        return "root is required (ip netns, ip link)"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is required"
    return None


def netns(action: str) -> str:
    return subprocess.run(["bash", str(NETNS_SH), action], check=True, capture_output=True, text=True).stdout


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_ns(ns: str) -> int:
    """SIGKILL every process of a namespace (the whole node goes away); returns how many."""
    pids = ns_pids(ns)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


@dataclass
class NodeProc:
    node: str
    proc: subprocess.Popen
    out: Path
    err: Path

    def text(self) -> tuple[str, str]:
        return (self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))


def torchrun_job(tmp: Path, tag: str, port: int, module_args: list[str], threads: int = 1) -> list[NodeProc]:
    """One torchrun agent per node, 2 ranks each; node a hosts the c10d rendezvous store."""
    procs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    env.pop("GLOO_SOCKET_IFNAME", None)  # ryzlab picks the interface towards MASTER_ADDR itself
    for node, (ns, addr) in NODES.items():
        host = ["--rdzv-conf", "is_host=1"] if node == "a" else []
        cmd = ["ip", "netns", "exec", ns, *TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{NODES['a'][1]}:{port}", "--rdzv-id", tag,
               *host, "--local-addr", addr, *module_args]
        out, err = tmp / f"{tag}-{node}.out", tmp / f"{tag}-{node}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            procs.append(NodeProc(node, subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=ROOT,
                                                         start_new_session=True), out, err))
    return procs


def wait_all(procs: list[NodeProc], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    rcs: list[int | None] = []
    for p in procs:
        try:
            rcs.append(p.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.proc.pid, signal.SIGKILL)
            rcs.append(None)
    return rcs


def json_line(text: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return None


def generate_args(max_tokens: int) -> list[str]:
    return ["-m", "ryzlab", "generate", "--tp", "2", "--cp", "2", "--prompt", PROMPT, "--max-tokens",
            str(max_tokens), "--json", "--threads", "1"]


def drill_generate(tmp: Path, max_tokens: int, port: int) -> dict:
    ref = subprocess.run([PY, "-m", "ryzlab", "generate", "--prompt", PROMPT, "--max-tokens", str(max_tokens),
                          "--json"], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=300)
    one = json_line(ref.stdout)
    t0 = time.perf_counter()
    procs = torchrun_job(tmp, "gen", port, generate_args(max_tokens))
    rcs = wait_all(procs, 300)
    wall = time.perf_counter() - t0
    outs = [json_line(p.text()[0]) for p in procs]
    two = next((o for o in outs if o), None)
    ok = all(rc == 0 for rc in rcs) and one is not None and two is not None and one["token_ids"] == two["token_ids"]
    if not ok:
        for p in procs:
            print(f"--- node {p.node} stderr (tail)\n{p.text()[1][-3000:]}", file=sys.stderr)
    return {"pass": ok, "rcs": rcs, "wall_s": round(wall, 1),
            "one_rank": one and one["token_ids"], "two_nodes": two and two["token_ids"]}


def drill_scaling(tmp: Path, port: int) -> dict:
    from ryzlab.experiments.scaling import make_config, run

    values = {"tp": 2, "cp": 2, "context": 64, "decode_steps": 4, "warmup": 1, "budget_mib": 0, "check_error": True}
    out = tmp / "scaling.parquet"
    procs = torchrun_job(tmp, "scaling", port, ["-m", "ryzlab.experiments.scaling", json.dumps(values), str(out)])
    rcs = wait_all(procs, 600)
    if not out.exists():
        for p in procs:
            print(f"--- node {p.node} stderr (tail)\n{p.text()[1][-3000:]}", file=sys.stderr)
        return {"pass": False, "rcs": rcs}
    two = pd.read_parquet(out)
    one = run(make_config(values))
    cols = ["nodes", "interconnect", "layout", "median_step_ms", "comm_bytes_per_step", "comm_wire_bytes_per_step",
            "logits_rel_err_vs_ws1"]
    both = pd.concat([one[cols].iloc[:1], two[cols].iloc[:1]])
    ok = all(rc == 0 for rc in rcs) and int(two["nodes"].iloc[0]) == 2 and float(two["logits_rel_err_vs_ws1"].iloc[0]) < 1e-4
    return {"pass": ok, "rcs": rcs, "table": both.to_string(index=False)}


def drill_node_lost(tmp: Path, port: int, kill_after: float, partition: bool = False) -> dict:
    """``partition``: instead of killing node b, cut its link (no reset reaches node a: the
    survivors only learn of it from the collective timeout)."""
    procs = torchrun_job(tmp, "cut" if partition else "lost", port, generate_args(3000))
    a = procs[0]
    deadline = time.monotonic() + 300
    while "loading" not in a.text()[1] and time.monotonic() < deadline:  # rank 0 is through rendezvous
        if a.proc.poll() is not None:
            break
        time.sleep(0.2)
    time.sleep(kill_after)  # into the decode; the message's decode-token count checks it got there
    t_kill = time.monotonic()
    if partition:
        subprocess.run(["ip", "link", "set", "ryzhb", "down"], check=True)  # netns.sh's host end of node b
        killed = 0
    else:
        killed = kill_ns(NODES["b"][0])
    try:
        rc = a.proc.wait(timeout=COLLECTIVE_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        rc = None
    t_fail = time.monotonic() - t_kill
    time.sleep(0.5)  # the agent's children are reaped; then what is left is an orphan
    left = ns_pids(NODES["a"][0])
    if rc is None:
        os.killpg(a.proc.pid, signal.SIGKILL)
    if partition:
        subprocess.run(["ip", "link", "set", "ryzhb", "up"], check=True)
        kill_ns(NODES["b"][0])  # node b's side of the partition: not under test here
    wait_all(procs, 10)
    err = a.text()[1]
    lines = sorted({m.strip() for m in re.findall(r"ryzlab generate: (rank \d+ on node [^\n]*lost node[^\n]*)", err)})
    tokens = [int(x) for x in re.findall(r"after (\d+) decode token", err)]
    limit = COLLECTIVE_TIMEOUT_S + 30 if partition else COLLECTIVE_TIMEOUT_S  # + the probes and exit
    # the kill must land in decode (rank 0's decode-token count proves it); under a partition the
    # first rank to time out may be rank 1, and torchrun's agent then ends rank 0 before it speaks
    in_decode = bool(tokens) and 0 < tokens[0] < 3000
    ok = (rc not in (0, None) and t_fail < limit and not left and
          any(NODES["b"][1] in ln for ln in lines) and (in_decode or partition))
    if not ok:
        print(f"--- node a stderr (tail)\n{err[-4000:]}", file=sys.stderr)
    return {"pass": ok, "killed_processes_node_b": killed, "survivor_rc": rc, "fail_after_s": round(t_fail, 2),
            "collective_timeout_s": COLLECTIVE_TIMEOUT_S, "decode_tokens_before_loss": tokens[:1],
            "orphans_node_a": left, "messages": [ln[:300] for ln in lines]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kill-after", type=float, default=10.0, help="seconds after rank 0 starts loading (default 10)")
    ap.add_argument("--port", type=int, default=29511, help="first of three rendezvous ports on node a")
    ap.add_argument("--only", choices=["generate", "scaling", "lost", "partition"], action="append",
                    help="run only these drills (repeatable; default all)")
    ap.add_argument("--keep", action="store_true", help="leave the namespaces up")
    ap.add_argument("--logs", type=Path, help="keep every node's stdout/stderr in this folder (default: a temp folder)")
    args = ap.parse_args()
    if args.max_tokens < 1 or args.kill_after < 0:
        ap.error("--max-tokens must be >= 1 and --kill-after >= 0")
    why = check_host()
    if why:
        print(f"multinode: cannot run here: {why}", file=sys.stderr)
        return 2
    from ryzlab.provenance import device_summary

    print(netns("up"), end="")
    print(f"device: {device_summary()}")
    todo = args.only or ["generate", "scaling", "lost", "partition"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ryzlab-multinode-") as d:
        tmp = Path(d) if args.logs is None else args.logs
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            if "generate" in todo:
                results["generate"] = r = drill_generate(tmp, args.max_tokens, args.port)
                print(f"[{'PASS' if r['pass'] else 'FAIL'}] torchrun 2 nodes x 2 ranks, tp 2 x cp 2: token ids "
                      f"{'identical to' if r['pass'] else 'DIFFER from'} one rank ({args.max_tokens} tokens, "
                      f"{r['wall_s']} s wall, rcs {r['rcs']})\n  one rank : {r['one_rank']}\n  two nodes: {r['two_nodes']}")
            if "scaling" in todo:
                results["scaling"] = r = drill_scaling(tmp, args.port + 1)
                print(f"[{'PASS' if r['pass'] else 'FAIL'}] scaling point tp 2 x cp 2 on one node vs across two "
                      f"(rcs {r['rcs']}):\n{r.get('table', '')}")
            if "lost" in todo:
                results["lost"] = r = drill_node_lost(tmp, args.port + 2, args.kill_after)
                print(f"[{'PASS' if r['pass'] else 'FAIL'}] node b killed mid-decode ({r['killed_processes_node_b']} "
                      f"processes, after {r['decode_tokens_before_loss']} decode tokens): node a exited rc "
                      f"{r['survivor_rc']} {r['fail_after_s']} s later (collective timeout {r['collective_timeout_s']:g} s), "
                      f"orphans in node a: {r['orphans_node_a'] or 'none'}")
                for m in r["messages"]:
                    print(f"  {m}")
            if "partition" in todo:
                results["partition"] = r = drill_node_lost(tmp, args.port + 3, args.kill_after, partition=True)
                print(f"[{'PASS' if r['pass'] else 'FAIL'}] node b cut off the network mid-decode (link down, no "
                      f"reset; after {r['decode_tokens_before_loss']} decode tokens): node a exited rc "
                      f"{r['survivor_rc']} {r['fail_after_s']} s later (collective timeout "
                      f"{r['collective_timeout_s']:g} s), orphans in node a: {r['orphans_node_a'] or 'none'}")
                for m in r["messages"]:
                    print(f"  {m}")
        finally:
            for ns, _ in NODES.values():
                kill_ns(ns)
            if not args.keep:
                netns("down")
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
