"""Code written for launch() runs unchanged under torchrun (env:// rendezvous)."""
import json
import sys
import textwrap

from procs import run_in_own_session

from ryzlab.orchestrator.launch import free_port

SCRIPT = textwrap.dedent("""
    import json, pathlib, sys, torch, torch.distributed as dist
    from ryzlab.orchestrator import init_from_env
    ctx = init_from_env("auto")
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    # one file per rank: ranks sharing torchrun's stdout pipe can interleave their lines
    out = pathlib.Path(sys.argv[1]) / f"rank{ctx.rank}.json"
    out.write_text(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend, "sum": t.item()}))
    dist.destroy_process_group()
""")


def test_init_from_env_under_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)]
    rc, stdout, stderr = run_in_own_session(cmd, timeout=90)
    assert rc == 0, stderr[-2000:]
    rows = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(r["world"] == 2 and r["backend"] == "gloo" and r["sum"] == 3.0 for r in rows)
