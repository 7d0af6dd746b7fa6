"""`ryzlab sweep --executor ray` on a real local Ray instance (2 CPUs, one per module), with real
notebooks and kernels: same results as the local executor, a killed Ray worker, a timeout,
resume after the driver is killed with kill -9, bad specs rejected before any task exists."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from ryzlab.config import ConfigError
from ryzlab.io import read_jsonl
from ryzlab.workbench.spec import Point, check_resources, expand, load_spec
from ryzlab.workbench.sweep import run_sweep

ray = pytest.importorskip("ray")
from ryzlab.workbench.executors import ray as sweep_ray  # noqa: E402
from ryzlab.workbench.executors.ray import fit_problems, point_resources  # noqa: E402
from ryzlab.workbench.executors.ray_task import alive  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
WAITS = str(FIXTURES / "waits.ipynb")
REPO = Path(__file__).resolve().parent.parent


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return p


def wait_until(cond, what: str, poll: float = 0.1):
    """Wait for a condition (no deadline of our own: pytest-timeout bounds a test that hangs)."""
    while not (value := cond()):
        time.sleep(poll)
    return value


def running_pids(signal_dir: Path, x: int) -> list[int]:
    return [int(p.name.rsplit("-", 1)[1]) for p in signal_dir.glob(f"running-{x}-*")]


@pytest.fixture(scope="module")
def ray_instance():
    """One small local Ray instance for the module: 2 CPUs, no dashboard, an 80 MiB object store."""
    ctx = sweep_ray.start_local_ray(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2,
                                    log_to_driver=False)
    yield ctx
    ray.shutdown()


# ----------------------------------------------------------------------------- no Ray needed
def test_resources_block_is_checked_with_the_spec(tmp_path):
    assert check_resources({"num_cpus": 2, "num_gpus": 1, "memory": 2**30, "custom": {"TPU": 4}}, "b") == []
    problems = check_resources({"num_gpu": 1, "num_cpus": -1, "memory": "8GiB", "custom": {"x": True, "y": ".nan"},
                                "num_gpus": float("inf")}, "b")
    assert problems == [
        "b: unknown resources key 'num_gpu'; valid keys: num_cpus, num_gpus, memory, custom",
        "b: resources.num_cpus must be a finite number >= 0, got -1",
        "b: resources.num_gpus must be a finite number >= 0, got inf",
        "b: resources.memory must be a finite number >= 0, got '8GiB' (memory is in bytes)",
        "b: resources.custom.x must be a finite number >= 0, got True",
        "b: resources.custom.y must be a finite number >= 0, got '.nan'",
    ]
    assert check_resources({"num_cpus": float("nan")}, "b") == ["b: resources.num_cpus must be a finite number >= 0, "
                                                                "got nan"]
    with pytest.raises(ConfigError, match="unknown resources key 'gpus'"):
        load_spec(write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}, "resources": {"gpus": 1}}))
    with pytest.raises(ConfigError, match="resources at the top of a spec with 'experiments' would be ignored"):
        load_spec(write_spec(tmp_path, {"experiments": [{"notebook": WAITS}], "resources": {"num_cpus": 1}}))


def test_point_resources_follow_world_size_device_and_overrides(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"name": "r", "experiments": [
        {"notebook": "scaling", "zip": {"tp": [2, 1], "cp": [2, 1]}},
        {"notebook": "attention_bench", "grid": {"device": ["cpu", "auto"]}},
        {"notebook": WAITS, "grid": {"x": [1]}, "resources": {"num_cpus": 0.5, "custom": {"slot": 1}}},
    ]}))
    pts = {(p.experiment, json.dumps(p.params, sort_keys=True)): p for p in expand(spec)}
    scaling4 = pts[("scaling", '{"cp": 2, "tp": 2}')]
    assert point_resources(scaling4, cluster_has_gpus=False) == {"num_cpus": 4, "num_gpus": 0}
    assert point_resources(scaling4, cluster_has_gpus=True) == {"num_cpus": 1, "num_gpus": 4}
    cpu_attn = pts[("attention_bench", '{"device": "cpu"}')]
    assert point_resources(cpu_attn, cluster_has_gpus=True) == {"num_cpus": 1, "num_gpus": 0}
    auto_attn = pts[("attention_bench", '{"device": "auto"}')]
    assert point_resources(auto_attn, cluster_has_gpus=True) == {"num_cpus": 1, "num_gpus": 1}
    waits = pts[("waits", '{"x": 1}')]
    assert point_resources(waits, cluster_has_gpus=False) == {"num_cpus": 0.5, "num_gpus": 0,
                                                               "resources": {"slot": 1}}
    res = {p.run_id: point_resources(p, cluster_has_gpus=False) for p in pts.values()}
    problems = fit_problems(list(pts.values()), res, [{"CPU": 2.0, "memory": 1e9}, {"CPU": 1.0, "slot": 2.0}])
    assert problems == [f"{scaling4.label}: needs CPU=4 on one node, but no node of the Ray cluster has that "
                        "(largest: CPU=2); set `resources:` in its experiment block or add nodes"]
    # the waits point needs CPU=0.5 and slot=1 on ONE node: only the second node has both
    assert fit_problems([waits], res, [{"CPU": 2.0}, {"slot": 1.0}])[0].startswith(f"{waits.label}: needs CPU=0.5, slot=1")


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "", "..", "."])
def test_task_file_names_cannot_leave_the_run_folder(tmp_path, name):
    """A task's result naming a file outside its run folder is refused and recorded; nothing is written."""
    (point,) = expand(load_spec(write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}})))
    fake_ray = type("FakeRay", (), {"get": staticmethod(lambda ref: ref),
                                    "exceptions": type("E", (), {"RayTaskError": type("RTE", (Exception,), {})})})
    out = {"entry": {"run_id": point.run_id, "status": "ok"}, "files": {name: b"x"}, "node": "n", "worker_pid": 1}
    sweep_dir = tmp_path / "out"
    sweep_dir.mkdir()
    entry = sweep_ray.RayPlan(resources={})._collect(fake_ray, out, point, 1, sweep_dir, ())
    assert entry["status"] == "failed" and entry["error"] == "BadTaskResult" and repr(name) in entry["message"]
    assert read_jsonl(sweep_dir / "manifest.jsonl") == [entry]
    assert [p.name for p in sweep_dir.iterdir()] == ["manifest.jsonl"]


def test_executor_flags_are_checked_before_anything_runs(tmp_path):
    spec = write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}})
    out = tmp_path / "out"
    cases = [({"executor": "slurm"}, "--executor 'slurm' is not valid; choose one of local, ray"),
             ({"address": "auto"}, "--address needs --executor ray"),
             ({"retries": 1}, "--retries applies to --executor ray"),
             ({"executor": "ray", "jobs": 2}, "--jobs applies to the local executor"),
             ({"executor": "ray", "retries": -1}, "--retries must be an integer >= 0, got -1"),
             ({"executor": "ray", "threads": 0}, "--threads must be >= 1, got 0"),
             ({"executor": "ray", "address": "not an address"}, "--address 'not an address' is not valid")]
    for kwargs, msg in cases:
        with pytest.raises(ConfigError) as e:
            run_sweep(spec, out=out, progress=False, **kwargs)
        assert msg in str(e.value)
    assert not out.exists()


# ----------------------------------------------------------------------------- on Ray
def test_bad_spec_rejected_before_any_task_is_submitted(tmp_path, ray_instance, monkeypatch):
    submitted = []
    monkeypatch.setattr(sweep_ray.RayPlan, "run", lambda self, *a, **k: submitted.append(a))
    out = tmp_path / "out"
    needs_gpu = write_spec(tmp_path, {"name": "gpu", "experiments": [
        {"notebook": WAITS, "grid": {"x": [1]}},
        {"notebook": WAITS, "grid": {"x": [2]}, "resources": {"num_gpus": 1}},
        {"notebook": WAITS, "grid": {"x": [3]}, "resources": {"custom": {"tpu": 8}}},
    ]})
    with pytest.raises(ConfigError) as e:
        run_sweep(needs_gpu, out=out, progress=False, executor="ray")
    msg = str(e.value)
    assert "waits(x=2): needs CPU=1, GPU=1 on one node" in msg and "(largest: CPU=2, GPU=0)" in msg
    assert "waits(x=3): needs CPU=1, tpu=8 on one node" in msg and "waits(x=1)" not in msg
    bad_param = write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1], "colour": ["red"]}}, "p.yaml")
    with pytest.raises(ConfigError, match="unknown parameter 'colour'"):
        run_sweep(bad_param, out=out, progress=False, executor="ray")
    assert submitted == [] and not out.exists(), "nothing may be submitted or written for a bad spec"


def test_ray_sweep_holds_the_results_folders_lock(tmp_path, ray_instance, monkeypatch):
    from ryzlab.workbench.sweep import SweepLocked, sweep_lock

    submitted = []
    monkeypatch.setattr(sweep_ray.RayPlan, "run", lambda self, *a, **k: submitted.append(a))
    spec = write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}})
    out = tmp_path / "out"
    out.mkdir()
    with sweep_lock(out), pytest.raises(SweepLocked, match="in use by another sweep"):
        run_sweep(spec, out=out, progress=False, executor="ray")
    assert submitted == [] and sorted(p.name for p in out.iterdir()) == [".lock"]


def test_same_run_ids_files_and_metric_columns_as_local(tmp_path, ray_instance):
    spec = write_spec(tmp_path, {"name": "same", "experiments": [
        {"notebook": "attention_bench", "grid": {"context": [16]},
         "fixed": {"iters": 2, "warmup": 0, "copy_mib": 1, "batch": 1, "threads": 1}},
        {"notebook": WAITS, "grid": {"x": [1, 2]}},
    ]})
    local = run_sweep(spec, out=tmp_path / "local", progress=False)
    remote = run_sweep(spec, out=tmp_path / "ray", progress=False, executor="ray")
    assert (local.ok, remote.ok, remote.failed, remote.timeout) == (3, 3, 0, 0)
    ids = sorted(p.run_id for p in expand(load_spec(spec)))
    for out in (tmp_path / "local", tmp_path / "ray"):
        assert sorted(r["run_id"] for r in read_jsonl(out / "manifest.jsonl")) == ids
        assert not list(out.glob(".tmp-*"))
    for run_id in ids:
        a, b = tmp_path / "local" / run_id, tmp_path / "ray" / run_id
        assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
        assert list(pd.read_parquet(a / "metrics.parquet").columns) == list(pd.read_parquet(b / "metrics.parquet").columns)
        assert json.loads((a / "params.json").read_text()) == json.loads((b / "params.json").read_text())
        env = json.loads((b / "env.json").read_text())
        assert env["executor"] == "ray" and env["attempts"] == 1 and env["run_id"] == run_id
        assert env["ray_worker_pid"] > 0 and env["ray_node"] and env["threads"] == 1  # num_cpus 1 -> 1 thread
        assert {"git_sha", "python", "torch", "device_names", "host", "start", "end"} <= set(env)
    waits = [r for r in read_jsonl(tmp_path / "ray" / "manifest.jsonl") if r["experiment"] == "waits"]
    for r in waits:
        df = pd.read_parquet(tmp_path / "ray" / r["run_id"] / "metrics.parquet")
        assert df["y"].tolist() == [0, r["params"]["x"]]
    attn = [r for r in read_jsonl(tmp_path / "ray" / "manifest.jsonl") if r["experiment"] == "attention_bench"][0]
    assert attn["compute_s"] > 0 and attn["overhead_s"] == pytest.approx(attn["wall_s"] - attn["compute_s"], abs=2e-3)
    assert remote.overheads_s == [attn["overhead_s"]]
    assert remote.lines()[1].startswith("one Ray task per point") and local.lines()[1].startswith("1 point(s) at a time")


def test_killed_ray_worker_point_is_retried_and_nothing_half_written(tmp_path, ray_instance):
    sig, go = tmp_path / "sig", tmp_path / "go"
    sig.mkdir()
    spec = write_spec(tmp_path, {"name": "kill", "notebook": WAITS, "grid": {"x": [5]},
                                 "fixed": {"signal_dir": str(sig), "wait_for": str(go)}})
    out = tmp_path / "out"
    result = {}
    t = threading.Thread(target=lambda: result.update(s=run_sweep(spec, out=out, progress=False, executor="ray",
                                                                  retries=1)))
    t.start()
    kernel = wait_until(lambda: running_pids(sig, 5), "first attempt running")[0]
    worker_tmp = Path(next(sig.glob("running-5-*")).read_text())  # the point's run_dir on the worker
    worker = next(p for p in psutil.Process(kernel).parents() if p.cmdline() and p.cmdline()[0].startswith("ray::"))
    assert not list(out.glob("kill-*")) and not (out / "manifest.jsonl").exists()
    os.kill(worker.pid, signal.SIGKILL)
    wait_until(lambda: not alive(kernel), "the killed worker's kernel exits")
    go.touch()
    t.join()
    s = result["s"]
    assert (s.ok, s.failed, s.timeout) == (1, 0, 0)
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["attempts"] == 2
    assert rows[0]["ray_worker_pid"] != worker.pid
    assert len(rows[0]["attempt_nodes"]) == 2 and rows[0]["attempt_nodes"][-1] == rows[0]["ray_node"]
    run = out / rows[0]["run_id"]
    assert pd.read_parquet(run / "metrics.parquet")["x"].tolist() == [5, 5]
    assert json.loads((run / "env.json").read_text())["attempts"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "manifest.jsonl", "spec.yaml", rows[0]["run_id"]])
    assert not worker_tmp.exists(), "the dead worker's temporary folder is removed by the next task on its node"


def test_timeout_kills_the_points_kernel(tmp_path, ray_instance):
    sig = tmp_path / "sig"
    sig.mkdir()
    spec = write_spec(tmp_path, {"name": "slow", "notebook": WAITS, "grid": {"x": [7]},
                                 "fixed": {"signal_dir": str(sig), "wait_for": str(tmp_path / "never")}})
    s = run_sweep(spec, out=tmp_path / "out", progress=False, executor="ray", timeout=45)
    assert (s.ok, s.failed, s.timeout) == (0, 0, 1)
    (row,) = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert row["status"] == "timeout" and row["error"] == "Timeout" and "--timeout 45" in row["message"]
    assert row["wall_s"] >= 45 and row["executor"] == "ray" and row["attempts"] == 1
    run = tmp_path / "out" / row["run_id"]  # as locally: the partial notebook is kept, no metrics
    assert (run / "run.ipynb").is_file() and not (run / "metrics.parquet").exists()
    # the point was running (a warm kernel starts well within 45 s) and its kernel goes: polled, as
    # its siblings do (issue 24: asserted at once, it failed on a loaded machine while the kill landed)
    (kernel,) = running_pids(sig, 7)
    wait_until(lambda: not alive(kernel), "the timed-out point's kernel exits")


def test_resume_after_the_driver_is_killed_with_kill_9(tmp_path, ray_instance):
    sig, go = tmp_path / "sig", tmp_path / "go"
    sig.mkdir()
    spec = write_spec(tmp_path, {"name": "resume", "notebook": WAITS,
                                 "zip": {"x": [1, 2, 3], "wait_for": [None, str(go), str(go)]},
                                 "fixed": {"signal_dir": str(sig)}})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "ryzlab", "sweep", str(spec), "--executor", "ray",
                               "--address", address, "--out", str(out), "--no-progress"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: [r for r in read_jsonl(out / "manifest.jsonl") if r["status"] == "ok"]
                   and running_pids(sig, 2) and running_pids(sig, 3), "x=1 done, x=2 and x=3 running")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    kernels = running_pids(sig, 2) + running_pids(sig, 3)
    (done,) = read_jsonl(out / "manifest.jsonl")
    assert done["params"]["x"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "manifest.jsonl", "spec.yaml", done["run_id"]])
    # Ray ends the dead driver's tasks; their points' kernels go with them
    wait_until(lambda: not any(alive(k) for k in kernels), "the dead driver's points stop")
    go.touch()
    s = run_sweep(spec, out=out, progress=False, executor="ray")
    assert (s.total, s.skipped, s.ok, s.failed) == (3, 1, 2, 0)
    rows = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["params"]["x"] for r in rows) == [1, 2, 3], "x=1 is not run again"
    for r in rows:
        assert pd.read_parquet(out / r["run_id"] / "metrics.parquet")["x"].tolist() == [r["params"]["x"]] * 2
    assert not list(out.glob(".tmp-*"))


def test_cli_names_the_bad_address(tmp_path, capsys):
    from ryzlab.cli import main

    spec = write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}})
    assert main(["sweep", str(spec), "--executor", "ray", "--address", "http://x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--address 'http://x' is not valid; use 'auto', 'local', 'HOST:PORT' or 'ray://HOST:PORT'" in err


def test_point_dataclass_keeps_resources_out_of_the_run_id(tmp_path):
    a = load_spec(write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}}, "a.yaml"))
    b = load_spec(write_spec(tmp_path, {"notebook": WAITS, "grid": {"x": [1]}, "resources": {"num_cpus": 2}}, "b.yaml"))
    (pa,), (pb,) = expand(a), expand(b)
    assert isinstance(pb, Point) and pb.resources == {"num_cpus": 2} and pa.resources == {}
    assert pa.run_id == pb.run_id, "resources say where a point runs, not what it computes"


def test_a_blocks_jobs_cap_holds_on_ray(tmp_path, ray_instance):
    """`jobs: 1` (timings taken alone) means one point at a time on Ray too, though 2 CPUs are free."""
    spec = write_spec(tmp_path, {"name": "alone", "jobs": 1, "notebook": WAITS, "grid": {"x": [1, 2]}})
    s = run_sweep(spec, out=tmp_path / "out", progress=False, executor="ray")
    assert (s.ok, s.failed) == (2, 0)
    a, b = sorted(read_jsonl(tmp_path / "out" / "manifest.jsonl"), key=lambda r: r["start"])
    assert a["end"] <= b["start"], "the second point started before the first ended"


def test_a_lost_attempts_node_is_read_from_rays_error():
    msg = ("Task failed because the node it was running on is dead or unavailable. Node IP: 10.77.0.2, node ID: "
           "a641. This can happen if the node was preempted")
    assert sweep_ray._NODE_IP.search(msg).group(1) == "10.77.0.2"
