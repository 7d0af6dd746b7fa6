"""The ryzlab command line: help, info, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml


def ryzlab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ryzlab.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_help_lists_commands():
    r = ryzlab("--help")
    assert r.returncode == 0
    for word in ("sweep", "report", "info", "examples:"):
        assert word in r.stdout
    assert "--jobs" in ryzlab("sweep", "--help").stdout


def test_info_says_what_hardware_is_present():
    r = ryzlab("info")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "python" in r.stdout
    import torch

    if not torch.cuda.is_available():
        assert "no NVIDIA device: CPU ranks" in r.stdout


def test_bad_spec_gives_clear_error_and_exit_2(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"notebook": "attention_bench", "grid": {"dtype": ["fp7"]}}))
    r = ryzlab("sweep", str(spec), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "dtype='fp7' is not valid; choose one of" in r.stderr
    assert not (tmp_path / "out").exists()
    assert ryzlab("sweep", str(tmp_path / "missing.yaml")).returncode == 2


def test_report_on_a_folder_that_is_not_a_sweep(tmp_path):
    r = ryzlab("report", str(tmp_path))
    assert r.returncode == 2 and "no manifest.jsonl" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_version():
    from ryzlab import __version__

    r = ryzlab("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ryzlab {__version__}"


def test_dry_run_lists_points_and_writes_nothing(tmp_path):
    from pathlib import Path

    from ryzlab.workbench.spec import expand, load_spec

    points = str(Path(__file__).parent / "fixtures" / "points.ipynb")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "dry", "notebook": points, "grid": {"x": [1, 2, 3]}, "repeat": 2}))
    out = tmp_path / "out"
    r = ryzlab("sweep", str(spec), "--out", str(out), "--dry-run", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    want = expand(load_spec(spec))
    assert [ln.split()[:2] for ln in lines[:-1]] == [["todo", p.run_id] for p in want]
    assert "x=2" in lines[2] and "repeat=0" in lines[2]
    assert lines[-1].startswith("sweep dry: 6 points, 0 done, 6 to run") and "dry run: nothing ran" in lines[-1]
    assert not out.exists()
    r = ryzlab("sweep", str(spec), "--out", str(out), "--dry-run", "--max-points", "5")
    assert r.returncode == 2 and "more than the limit of 5" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text", [
    b"notebook: [unclosed\n",
    b"\xff\xfe\x00garbage",
    b'a: &a ["x","x"]\nb: [*a, *a]\n',
    b"notebook: attention_bench\ngrid: {context: [16]}\ngrid: {context: [32]}\n",
    b"name: ..\nnotebook: attention_bench\n",
    b"notebook: README.md\n",
])
def test_hostile_specs_exit_2_without_traceback(tmp_path, text):
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent.parent / "README.md", tmp_path / "README.md")
    spec = tmp_path / "s.yaml"
    spec.write_bytes(text)
    r = ryzlab("sweep", str(spec), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("ryzlab sweep: invalid config")
    assert not (tmp_path / "out").exists()


def test_serve_bad_port_and_missing_model_are_clean_errors():
    r = ryzlab("serve", "--port", "99999")
    assert r.returncode == 2 and "--port must be in 1..65535, got 99999" in r.stderr and "Traceback" not in r.stderr
    r = ryzlab("serve", "--model", "/nonexistent")
    assert r.returncode == 2 and "'/nonexistent': no such file or folder" in r.stderr and "Traceback" not in r.stderr


def test_a_wheel_ships_the_notebooks(tmp_path):
    """A non-editable install finds the notebooks: they are package data (ryzlab/notebooks)."""
    import zipfile
    from pathlib import Path

    from ryzlab.workbench.spec import NOTEBOOK_DIR, PACKAGE_DIR

    root = Path(__file__).resolve().parent.parent
    assert NOTEBOOK_DIR == PACKAGE_DIR / "notebooks"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("ryzlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("ryzlab/notebooks/"))
    assert shipped == sorted(p.name for p in (root / "ryzlab" / "notebooks").glob("*.ipynb"))


HEAVY = ("torch", "pandas", "transformers", "papermill")


def test_help_version_and_argument_errors_import_nothing_heavy():
    """--help, --version, every COMMAND --help and an argparse error answer without torch & co. (issue 22:
    `ryzlab --help` took 1.6 s importing torch for a choices list). Checked in sys.modules, not in seconds."""
    code = f"""
import json, sys
from ryzlab.cli import build_parser, main
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
seen = {{}}
for argv in [["--help"], ["--version"], ["kv-plan"], ["serve", "--codec", "int9"], ["loadgen", "--url"],
             *[[c, "--help"] for c in commands]]:
    try:
        main(argv)
    except SystemExit:
        pass
    seen[" ".join(argv)] = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps({{"commands": commands, "seen": seen}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout.splitlines()[-1])
    assert {"sweep", "report", "compare", "info", "serve", "loadgen", "generate", "kv-plan", "bench"} <= set(out["commands"])
    assert {argv: mods for argv, mods in out["seen"].items() if mods} == {}


def test_serve_context_defaults_to_the_models_and_the_served_name_is_settable():
    """Issue 23: --max-model-len was fixed at 1024 (SmolLM2 holds 8k); it now defaults to the model's context."""
    from ryzlab.cli import build_parser
    from ryzlab.serve.cli import make_backend, replica_spec

    p = build_parser()
    assert replica_spec(p.parse_args(["serve"])).engine.max_model_len == 4096  # reference.json's max_seq_len
    assert replica_spec(p.parse_args(["serve", "--max-model-len", "512"])).engine.max_model_len == 512
    backend = make_backend(p.parse_args(["serve", "--served-model-name", "smol", "--num-blocks", "64"]))
    try:
        assert backend.model_name == "smol" and backend.max_model_len == 4096
    finally:
        backend.shutdown()
    r = ryzlab("serve", "--served-model-name", " ")
    assert r.returncode == 2 and "--served-model-name is empty" in r.stderr


def test_generate_says_what_it_loads_on_stderr_and_prints_only_the_completion():
    r = ryzlab("generate", "--prompt", "def f(", "--max-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert len(json.loads(r.stdout)["token_ids"]) == 3  # stdout stays one JSON line
    assert "ryzlab generate: loading reference on 1 rank(s)" in r.stderr and "3 tokens in" in r.stderr


def test_serve_max_num_seqs_defaults_to_the_kv_capacity():
    """Issue 20: the default --max-num-seqs derives from the KV capacity (it was a constant 16)."""
    from ryzlab.cli import build_parser
    from ryzlab.serve.cli import replica_spec

    p = build_parser()
    assert replica_spec(p.parse_args(["serve"])).engine.max_num_seqs == 256            # 1024 blocks: the token budget
    assert replica_spec(p.parse_args(["serve", "--num-blocks", "40"])).engine.max_num_seqs == 40
    spec = replica_spec(p.parse_args(["serve", "--num-blocks", "40", "--max-num-seqs", "7"]))
    assert spec.engine.max_num_seqs == 7 and not spec.engine.compile
    assert replica_spec(p.parse_args(["serve", "--compile"])).engine.compile
    r = ryzlab("serve", "--max-num-seqs", "0")
    assert r.returncode == 2 and "--max-num-seqs must be >= 1" in r.stderr


def test_the_peer_gets_the_same_batch_cap_as_ryzlab():
    from ryzlab.loadgen.client import server_argv

    for engine in ("ryzlab", "transformers"):
        argv = server_argv(engine, model="reference", port=1, num_blocks=64, max_num_seqs=12)
        assert argv[argv.index("--max-num-seqs") + 1] == "12"
