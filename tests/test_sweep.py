"""Sweeps end to end with real notebooks, real kernels and real papermill (no mocks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

import ryzlab
from ryzlab.config import ConfigError
from ryzlab.io import read_jsonl
from ryzlab.workbench.report import build_report, load_sweep
from ryzlab.workbench.sweep import SweepLocked, expand, load_spec, run_sweep

FIXTURES = Path(__file__).parent / "fixtures"
POINTS = str(FIXTURES / "points.ipynb")
PROBE = str(FIXTURES / "probe.ipynb")
WAITS = str(FIXTURES / "waits.ipynb")
TINY_ATTN = {"iters": 2, "warmup": 0, "copy_mib": 1, "batch": 1, "threads": 1}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory):
    """Two real attention_bench points and three fixture points, one of which raises."""
    tmp = tmp_path_factory.mktemp("mixed")
    spec = write_spec(tmp, {"name": "mixed", "experiments": [
        {"notebook": "attention_bench", "grid": {"context": [16, 32]}, "fixed": TINY_ATTN},
        {"notebook": POINTS, "grid": {"x": [1, 2, 3]}, "fixed": {"fail_at": 2}},
    ]})
    out = tmp / "results"
    summary = run_sweep(spec, jobs=2, out=out, progress=False)
    return spec, out, summary


def test_two_point_grid_end_to_end(mixed_sweep):
    spec, out, summary = mixed_sweep
    assert (summary.total, summary.ok, summary.failed) == (5, 4, 1)
    attn = [p for p in expand(load_spec(spec)) if p.experiment == "attention_bench"]
    for p in attn:
        run = out / p.run_id
        assert {"run.ipynb", "params.json", "metrics.parquet", "env.json"} <= {f.name for f in run.iterdir()}
        df = pd.read_parquet(run / "metrics.parquet")
        assert len(df) == 2 and set(df["context"]) == {p.params["context"]}
        assert (df["device"] == "cpu").all() and (df["attn_us"] > 0).all()
        env = json.loads((run / "env.json").read_text())
        assert {"git_sha", "git_dirty", "python", "torch", "cuda", "device_names", "host", "start", "end"} <= set(env)
        assert json.loads((run / "params.json").read_text())["params"] == p.params
        assert "over TCP" not in (run / "kernel.log").read_text(), "kernels talk over ipc sockets, not TCP"
    assert not list(out.glob(".tmp-*")), "no temporary run directory may survive a finished sweep"
    assert summary.overheads_s and all(o > 0 for o in summary.overheads_s)


def test_points_of_different_experiments_never_run_side_by_side(mixed_sweep):
    _, out, _ = mixed_sweep
    rows = read_jsonl(out / "manifest.jsonl")
    attn = [r for r in rows if r["experiment"] == "attention_bench"]
    pts = [r for r in rows if r["experiment"] == "points"]
    assert len(attn) == 2 and len(pts) == 3
    assert max(r["end"] for r in attn) < min(r["start"] for r in pts), "the spec's blocks run one after another"


def test_a_block_with_jobs_1_runs_its_points_one_at_a_time(tmp_path, monkeypatch):
    import ryzlab.workbench.executors.local as sweep_mod  # the local executor starts the points

    live, most = set(), []

    class Counted(sweep_mod.PointProcess):  # how many workers (running + warming) exist at once
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            live.add(self)
            most.append(len(live))

        def close(self):
            live.discard(self)
            super().close()

    monkeypatch.setattr(sweep_mod, "PointProcess", Counted)
    spec = write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [1, 2, 3]}, "fixed": {"sleep_s": 0.5}, "jobs": 1})
    summary = run_sweep(spec, jobs=2, out=tmp_path / "r", progress=False)
    assert summary.ok == 3
    assert max(most) == 2, "one point runs, one spare warms: a second warming kernel would take a core from it"
    rows = sorted(read_jsonl(tmp_path / "r" / "manifest.jsonl"), key=lambda r: r["start"])
    assert all(a["end"] < b["start"] for a, b in zip(rows, rows[1:])), "never two at once"
    assert json.loads((tmp_path / "r" / rows[0]["run_id"] / "env.json").read_text())["jobs"] == 1, "as it ran"


def test_failing_point_is_recorded_and_others_finish(mixed_sweep):
    _, out, _ = mixed_sweep
    rows = {json.dumps(r["params"], sort_keys=True): r for r in read_jsonl(out / "manifest.jsonl")}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1
    f = failed[0]
    assert f["params"]["x"] == 2 and f["error"] == "ValueError" and "boom at x=2" in f["message"]
    assert f["cell"] is not None
    assert (out / f["run_id"] / "run.ipynb").is_file(), "the failed notebook is kept for inspection"
    ok_x = sorted(r["params"]["x"] for r in rows.values() if r["status"] == "ok" and "x" in r["params"])
    assert ok_x == [1, 3]


def test_run_id_is_stable_and_depends_on_params(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [1, 2]}}))
    a, b = expand(spec), expand(spec)
    assert [p.run_id for p in a] == [p.run_id for p in b]
    assert a[0].run_id != a[1].run_id


def test_zip_axes_vary_together(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"notebook": POINTS, "grid": {"fail_at": [7, 8]},
                                           "zip": {"x": [1, 2, 3], "sleep_s": [0.0, 0.1, 0.2]}}))
    pts = expand(spec)
    assert len(pts) == 6
    assert {(p.params["x"], p.params["sleep_s"]) for p in pts} == {(1, 0.0), (2, 0.1), (3, 0.2)}


def test_report_html_is_offline_with_images_and_failures(mixed_sweep):
    _, out, _ = mixed_sweep
    html_path = build_report(out)
    page = html_path.read_text()
    assert "data:image/png;base64," in page, "plots must be embedded"
    assert "<script src=http" not in page.replace('"', "").replace("'", "")
    assert "cdnjs" not in page and "unpkg" not in page
    assert "boom at x=2" in page and "/run.ipynb" in page, "failed points are listed with a link"
    assert "load_sweep(" not in page and "report_section(" not in page, "no code cells in the report"
    data = load_sweep(out)
    assert set(data.metrics["experiment"]) == {"attention_bench", "points"}
    assert (out / "aggregate.parquet").is_file()


def test_validation_lists_every_problem_and_runs_nothing(tmp_path):
    spec = write_spec(tmp_path, {"name": "bad", "experiments": [
        {"notebook": "attention_bench", "grid": {"context": [16, -5]}, "fixed": {"dtype": "int3", "nonsense": 1}},
        {"notebook": POINTS, "grid": {"x": [1]}, "fixed": {"colour": "red"}},
    ]})
    out = tmp_path / "results"
    with pytest.raises(ConfigError) as e:
        run_sweep(spec, out=out, progress=False)
    msg = str(e.value)
    assert "unknown parameter 'nonsense'" in msg and "valid parameters:" in msg and "context" in msg
    assert "unknown parameter 'colour'" in msg
    assert "dtype='int3' is not valid; choose one of 'float32', 'bfloat16', 'float16'" in msg
    assert "context must be > 0" in msg
    assert not out.exists(), "nothing may be written when validation fails"


def test_spec_structure_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'gird'.*valid keys"):
        load_spec(write_spec(tmp_path, {"notebook": POINTS, "gird": {"x": [1]}}))
    with pytest.raises(ConfigError, match="zip axes must have equal lengths"):
        load_spec(write_spec(tmp_path, {"notebook": POINTS, "zip": {"x": [1, 2], "sleep_s": [0.0]}}))
    with pytest.raises(ConfigError, match="notebook 'nope' not found; notebooks in .*attention_bench"):
        load_spec(write_spec(tmp_path, {"notebook": "nope"}))
    with pytest.raises(ConfigError, match="no code cell tagged 'parameters'"):
        run_sweep(write_spec(tmp_path, {"notebook": str(FIXTURES / "noparams.ipynb")}), out=tmp_path / "r",
                  progress=False)


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch):
    """A TMPDIR of the test's own (other sweeps on this machine write to /tmp at the same time)."""
    import tempfile

    tmp = tmp_path / "TMPDIR"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    return tmp


def test_a_finished_point_leaves_no_process_and_no_temp_file(tmp_path, own_tmpdir):
    """Issue 24: a setsid child and a double-forked daemon survived a finished point, and each
    point left a kernel connection file in $TMPDIR."""
    pids = tmp_path / "pids.json"
    spec = write_spec(tmp_path, {"notebook": PROBE, "fixed": {"child": True, "escape": True, "pid_file": str(pids)}})
    assert run_sweep(spec, out=tmp_path / "r", progress=False).ok == 1
    got = json.loads(pids.read_text())
    gone, alive = psutil.wait_procs(_procs([got["child"], got["setsid"], got["daemon"]]), timeout=30)
    assert alive == [], f"survived the point: {[p.cmdline() for p in alive]}"
    assert list(own_tmpdir.iterdir()) == []


def test_stale_kernel_folders_of_dead_workers_are_removed(tmp_path):
    from ryzlab.workbench.reaper import clean_stale_temp

    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        (tmp_path / f"ryzlab-k-{pid}-abc123").mkdir()
        (tmp_path / f"ryzlab-k-{pid}-abc123" / "kernel.json").write_text("{}")
    (tmp_path / "ryzlab-k-notapid").mkdir()
    assert clean_stale_temp(tmp_path) == 1
    assert {p.name for p in tmp_path.iterdir()} == {"ryzlab-k-notapid", f"ryzlab-k-{os.getpid()}-abc123"}


def test_timeout_kills_point_with_its_subprocesses_and_keeps_its_notebook(tmp_path, own_tmpdir):
    pids = tmp_path / "pids.json"
    spec = write_spec(tmp_path, {"notebook": PROBE, "fixed": {"sleep_s": 600.0, "child": True, "escape": True,
                                                             "pid_file": str(pids)}})
    summary = run_sweep(spec, out=tmp_path / "r", timeout=20, progress=False)
    assert summary.timeout == 1
    (row,) = read_jsonl(tmp_path / "r" / "manifest.jsonl")
    assert row["status"] == "timeout" and row["error"] == "Timeout"
    assert not list((tmp_path / "r").glob(".tmp-*"))
    run = tmp_path / "r" / row["run_id"]
    assert (run / "run.ipynb").is_file() and (run / "params.json").is_file(), "a timed-out point keeps its notebook"
    assert not (run / "metrics.parquet").exists()
    # the kernel and the subprocesses its notebook started are gone (killed with their group, or
    # found by their tag when they had left it), and so is the worker's kernel folder
    got = json.loads(pids.read_text())
    gone, alive = psutil.wait_procs(_procs([got["kernel"], got["child"], got["setsid"], got["daemon"]]), timeout=30)
    assert alive == []
    assert list(own_tmpdir.iterdir()) == []


def _procs(pids) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def _start_sweep(spec: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ryzlab.cli", "sweep", str(spec), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not path.is_file():
        assert proc.poll() is None, f"sweep exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_kill_9_of_the_sweep_kills_the_running_point_and_everything_it_started(tmp_path, own_tmpdir):
    pids = tmp_path / "pids.json"
    spec = write_spec(tmp_path, {"notebook": PROBE, "fixed": {"sleep_s": 600.0, "child": True, "escape": True,
                                                             "pid_file": str(pids)}})
    proc = _start_sweep(spec, tmp_path / "r")
    try:
        _wait_for(pids, proc)
        got = json.loads(pids.read_text())
        tree = psutil.Process(proc.pid).children(recursive=True)
        # the daemon's parent died: it was re-parented to the worker (a subreaper), not to init
        assert {got["kernel"], got["child"], got["setsid"], got["daemon"]} <= {p.pid for p in tree}, \
            "the point is a descendant of the sweep"
        os.kill(proc.pid, signal.SIGKILL)  # the sweep alone, not its group
        proc.wait()
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert alive == [], f"orphans survived the sweep: {[p.cmdline() for p in alive]}"
        assert [p.name for p in own_tmpdir.iterdir() if p.name.startswith("ryzlab-k-")] == []
    finally:
        _kill_session(proc)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_second_sweep_on_the_same_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    pids = tmp_path / "pids.json"
    out = tmp_path / "r"
    slow = write_spec(tmp_path, {"notebook": PROBE, "fixed": {"sleep_s": 600.0, "pid_file": str(pids)}}, "slow.yaml")
    fast = write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [1]}}, "fast.yaml")
    proc = _start_sweep(slow, out)
    try:
        _wait_for(pids, proc)
        before = (out / "manifest.jsonl").read_bytes() if (out / "manifest.jsonl").exists() else b""
        tmps = sorted(p.name for p in out.glob(".tmp-*"))
        with pytest.raises(SweepLocked, match=f"in use by another sweep \\(pid {proc.pid} "):
            run_sweep(fast, out=out, progress=False)
        assert sorted(p.name for p in out.glob(".tmp-*")) == tmps, "the live sweep's files are untouched"
        after = (out / "manifest.jsonl").read_bytes() if (out / "manifest.jsonl").exists() else b""
        assert after == before
        r = subprocess.run([sys.executable, "-m", "ryzlab.cli", "sweep", str(fast), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "in use by another sweep" in r.stderr and "Traceback" not in r.stderr
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _kill_session(proc)
    with caplog.at_level("WARNING", logger="ryzlab.workbench.sweep"):
        summary = run_sweep(fast, out=out, progress=False)  # the dead sweep's lock is stale: taken over
    assert summary.ok == 1
    assert f"taking over a stale lock (pid {proc.pid} on " in caplog.text
    assert (out / ".lock").read_text() == "", "released when the sweep ends"


def test_threads_default_to_cores_over_jobs_and_are_recorded(tmp_path):
    from ryzlab.workbench.point import cores

    spec = write_spec(tmp_path, {"notebook": PROBE, "zip": {"sleep_s": [0.0, 0.01]}})
    out = tmp_path / "r"
    summary = run_sweep(spec, jobs=2, out=out, progress=False)
    assert summary.ok == 2
    want = max(1, cores() // 2)
    for p in expand(load_spec(spec)):
        df = pd.read_parquet(out / p.run_id / "metrics.parquet")
        assert df["torch_threads"].tolist() == [want] and df["omp"].tolist() == [str(want)]
        assert df["cwd"].tolist() == [str(FIXTURES.resolve())], "the kernel runs beside its notebook"
        assert df["ryzlab"].tolist() == [str(Path(ryzlab.__file__).resolve())], "the sweep's own ryzlab"
        env = json.loads((out / p.run_id / "env.json").read_text())
        assert (env["threads"], env["jobs"], env["cores"]) == (want, 2, cores())


def test_oversubscribed_threads_warn(tmp_path, caplog):
    from ryzlab.workbench.point import cores
    from ryzlab.workbench.sweep import resolve_threads

    with caplog.at_level("WARNING", logger="ryzlab.workbench.sweep"):
        assert resolve_threads(2, cores()) == cores()
    assert f"--jobs 2 x --threads {cores()} = {2 * cores()} threads on {cores()} cores" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ryzlab.workbench.sweep"):
        assert resolve_threads(1, None) == cores()
        assert resolve_threads(cores() + 3, None) == 1
    assert caplog.text == ""
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        resolve_threads(1, 0)


def test_repeat_runs_each_point_n_times_with_a_repeat_parameter(tmp_path):
    spec = write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [1, 2]}, "repeat": 3})
    pts = expand(load_spec(spec))
    assert sorted((p.params["x"], p.params["repeat"]) for p in pts) == [(x, r) for x in (1, 2) for r in range(3)]
    assert len({p.run_id for p in pts}) == 6
    assert all("repeat" not in p.notebook_params for p in pts)
    # run a smaller one (two kernels, not six: issue 24 keeps `make test` short); the expansion is checked above
    small = write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [2]}, "repeat": 2}, "small.yaml")
    out = tmp_path / "r"
    summary = run_sweep(load_spec(small), jobs=2, out=out, progress=False)
    assert summary.ok == 2
    for p in expand(load_spec(small)):
        df = pd.read_parquet(out / p.run_id / "metrics.parquet")
        assert df["repeat"].tolist() == [p.params["repeat"]] * 3 and df["x"].tolist() == [p.params["x"]] * 3
    # a block may override the spec's repeat; once (the default) adds no parameter
    spec2 = write_spec(tmp_path, {"repeat": 2, "experiments": [{"notebook": POINTS, "grid": {"x": [1]}},
                                                                {"notebook": POINTS, "grid": {"x": [5]}, "repeat": 1}]},
                       "two.yaml")
    assert sorted(str(p.params) for p in expand(load_spec(spec2))) == [
        "{'x': 1, 'repeat': 0}", "{'x': 1, 'repeat': 1}", "{'x': 5}"]


def test_resume_after_kill_runs_only_missing_points(tmp_path):
    # events, not the clock (issue 24): x=1 finishes, x=2 is held (it waits for a file) while the
    # sweep is killed, so exactly one point is done; three points, not four with 1 s sleeps
    sig, go = tmp_path / "sig", tmp_path / "go"
    sig.mkdir()
    spec = write_spec(tmp_path, {"name": "resume", "notebook": WAITS,
                                 "zip": {"x": [1, 2, 3], "wait_for": [None, str(go), str(go)]},
                                 "fixed": {"signal_dir": str(sig)}})
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "ryzlab.cli", "sweep", str(spec), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (any(r["status"] == "ok" for r in read_jsonl(out / "manifest.jsonl"))
               and list(sig.glob("running-2-*"))):
        assert proc.poll() is None, "the sweep ended before x=2 was running"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the sweep alone, as a user would; rerun at once
    proc.wait()
    first = {r["run_id"] for r in read_jsonl(out / "manifest.jsonl") if r["status"] == "ok"}
    assert len(first) == 1
    go.touch()
    try:
        summary = run_sweep(spec, out=out, progress=False)
    finally:
        _kill_session(proc)
    assert summary.skipped == 1 and summary.ok == 2
    rows = read_jsonl(out / "manifest.jsonl")
    for run_id in first:
        assert sum(r["run_id"] == run_id for r in rows) == 1, "a finished point must not run again"
    assert [r["status"] for r in rows] == ["ok"] * 3, "no point ran twice, no bogus failure from an orphan"
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert len(load_sweep(out).metrics) == 3 * 2


def test_bad_jobs_and_timeout_values(tmp_path):
    spec = write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [1]}})
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        run_sweep(spec, jobs=0, out=tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--timeout must be > 0"):
        run_sweep(spec, timeout=-1, out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_run_point_returns_the_run_files_and_store_point_writes_them(tmp_path, monkeypatch):
    """The one-point API an executor (a Ray task) calls: files back as bytes, stored by the caller."""
    from ryzlab.workbench.point import run_point, store_point
    from ryzlab.workbench.sweep import is_done, manifest_status, sweep_env

    # run_point's work folders go to a temp dir of this test alone: another test run on the same
    # machine runs the same points (same run ids) under the shared /tmp
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    ok, bad = expand(load_spec(write_spec(tmp_path, {"notebook": POINTS, "grid": {"x": [1, 2]},
                                                     "fixed": {"fail_at": 2}})))
    env = sweep_env(jobs=1, threads=1)
    res = run_point(ok, env=env, threads=1)
    assert res.entry["status"] == "ok" and res.entry["run_id"] == ok.run_id
    assert {"params.json", "run.ipynb", "metrics.parquet", "env.json", "kernel.log"} <= set(res.files)
    out = tmp_path / "r"
    store_point(out, res)
    assert is_done(out, ok.run_id, manifest_status(out))
    assert pd.read_parquet(out / ok.run_id / "metrics.parquet")["y"].tolist() == [0, 1, 2]
    failed = run_point(bad, env=env, threads=1)
    assert failed.entry["status"] == "failed" and "boom at x=2" in failed.entry["message"]
    assert "metrics.parquet" not in failed.files and "run.ipynb" in failed.files
    slow = expand(load_spec(write_spec(tmp_path, {"notebook": POINTS, "fixed": {"sleep_s": 600.0}}, "slow.yaml")))[0]
    timed = run_point(slow, env=env, threads=1, timeout=15)
    # the clock starts when the point is handed out: under load the kernel may still be warming up
    assert timed.entry["status"] == "timeout" and timed.entry["error"] == "Timeout"
    assert "kernel.log" in timed.files and set(timed.files) <= {"kernel.log", "params.json", "run.ipynb"}
    assert not list((tmp_path / "tmp").iterdir()), "nothing left on disk"


def test_a_worker_that_died_before_its_point_fails_that_point_only(tmp_path):
    from ryzlab.workbench.point import PointProcess

    (point,) = expand(load_spec(write_spec(tmp_path, {"notebook": POINTS})))
    pp = PointProcess(tmp_path)
    pp.proc.kill()
    pp.proc.wait()
    pp.assign(point, {})  # no BrokenPipeError out of here
    assert pp.poll() and pp.entry is None
    entry = pp.lost_entry("failed", None)
    assert entry["error"] == "WorkerDied" and f"exited with code {-signal.SIGKILL}" in entry["message"]
    pp.close()
    assert not pp.log_path.exists()


def test_dry_run_estimates_time_from_earlier_ok_points_of_the_same_notebook(tmp_path, capsys):
    """Issue 23.3: `--dry-run` on a results folder with past runs prints how long the rest will take."""
    from ryzlab.cli import main
    from ryzlab.io import append_jsonl

    spec = write_spec(tmp_path, {"name": "est", "notebook": POINTS, "grid": {"x": [1, 2, 3, 4]}})
    out = tmp_path / "est"
    assert main(["sweep", str(spec), "--out", str(out), "--dry-run", "--jobs", "2"]) == 0
    assert "estimate from past runs" not in capsys.readouterr().out, "no past runs: nothing to estimate from"
    out.mkdir()
    for i, (status, wall) in enumerate([("ok", 10.0), ("ok", 20.0), ("ok", 30.0), ("failed", 500.0)]):
        append_jsonl(out / "manifest.jsonl", {"run_id": f"points-old{i}", "experiment": "points", "status": status,
                                              "wall_s": wall, "params": {"x": 100 + i}})
    append_jsonl(out / "manifest.jsonl", {"run_id": "other-1", "experiment": "other", "status": "ok", "wall_s": 900.0})
    assert main(["sweep", str(spec), "--out", str(out), "--dry-run", "--jobs", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # 4 points x the median ok wall time (20 s; the failed point and the other notebook do not count) / 2 at once
    assert last.startswith("estimate from past runs: ~40 s for 4 point(s)"), last
    assert "points 4 x 20.0 s / 2 at a time (median of 3 earlier ok points)" in last
