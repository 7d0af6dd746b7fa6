"""Sweep specs as hostile input: strict YAML, bounded size, plain names, grids counted before expansion."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from ryzlab.config import ConfigError
from ryzlab.workbench.spec import MAX_POINTS, count_points, expand, load_spec

FIXTURES = Path(__file__).parent / "fixtures"
POINTS = str(FIXTURES / "points.ipynb")


def spec_file(tmp_path: Path, text: str | bytes, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


ALIAS_BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: YAML aliases \(\*name\) are not allowed"):
        load_spec(spec_file(tmp_path, ALIAS_BOMB))
    # a single harmless alias (and a merge key) is refused too: one rule, no budget to tune
    text = f"notebook: {POINTS}\nfixed: &f {{x: 1}}\ngrid:\n  <<: *f\n"
    with pytest.raises(ConfigError, match="line 4: YAML aliases"):
        load_spec(spec_file(tmp_path, text))


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    text = f"notebook: {POINTS}\ngrid:\n  x: [1, 2]\ngrid:\n  x: [3]\n"
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'grid' \(first at line 2\)"):
        load_spec(spec_file(tmp_path, text))
    text = f"notebook: {POINTS}\ngrid:\n  x: [1, 2]\n  x: [3]\n"
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'x' \(first at line 3\)"):
        load_spec(spec_file(tmp_path, text))


@pytest.mark.parametrize("text, message", [
    ("notebook: [unclosed\n", "not valid YAML: while parsing a flow sequence"),
    ("a: b: c\n", "not valid YAML: mapping values are not allowed here"),
    (b"notebook: \xff\xfe points\n", r"spec is not UTF-8 text \(byte 10\)"),
    ("- just\n- a list\n", "a spec is a mapping"),
    ("{[1, 2]: x}\n", "a mapping key must be a plain value"),
    ("[" * 5000 + "]" * 5000, "YAML nested too deeply|not valid YAML"),
])
def test_malformed_specs_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(spec_file(tmp_path, text))


@pytest.mark.parametrize("value, what", [
    ("!!set {a, b}", "set"), ("!!binary aGVsbG8=", "binary"), ("2024-01-01", "timestamp"),
    ("2001-12-14t21:59:43.10-05:00", "timestamp"), ("!!omap [a: 1, b: 2]", "omap"), ("!!pairs [a: 1]", "pairs"),
])
def test_yaml_values_that_are_not_json_are_refused(tmp_path, value, what):
    """A set's order follows the hash seed (the same spec re-ran a point into a second folder), a
    timestamp or bytes would reach the notebook as something no JSON parameter can be."""
    text = f"notebook: {POINTS}\ngrid:\n  x: [1, 2]\nfixed:\n  y: {value}\n"
    with pytest.raises(ConfigError, match=rf"line 5: .*{what}.* is not a JSON value"):
        load_spec(spec_file(tmp_path, text))
    quoted = load_spec(spec_file(tmp_path, f"notebook: {POINTS}\nfixed:\n  y: '2024-01-01'\n"))
    assert quoted.blocks[0].fixed == {"y": "2024-01-01"}


def test_a_spec_with_too_many_values_is_refused_before_parsing(tmp_path, monkeypatch):
    import ryzlab.workbench.spec as spec_mod

    big = f"notebook: {POINTS}\ngrid:\n  x: [" + ",".join(["1"] * 500_000) + "]\n"  # 1 MiB, 500k items
    assert len(big) < spec_mod.MAX_SPEC_BYTES
    monkeypatch.setattr(spec_mod.yaml, "load", lambda *a, **k: pytest.fail("the YAML parser ran"))
    with pytest.raises(ConfigError, match=rf"more than the {spec_mod.MAX_SPEC_VALUES} values a spec may hold"):
        load_spec(spec_file(tmp_path, big))
    monkeypatch.undo()
    # the parser counts too (values without separators: nested lists), and stops at the bound
    monkeypatch.setattr(spec_mod, "MAX_SPEC_VALUES", 50)
    nested = f"notebook: {POINTS}\nfixed:\n  x: " + "[" * 60 + "]" * 60 + "\n"
    with pytest.raises(ConfigError, match="more than the 50 values a spec may hold"):
        load_spec(spec_file(tmp_path, nested))
    assert load_spec(spec_file(tmp_path, f"notebook: {POINTS}\ngrid:\n  x: [1, 2, 3]\n")).blocks[0].size == 3


def test_dry_run_escapes_control_characters_in_parameter_values(tmp_path, capsys):
    from ryzlab.cli import main

    text = f'name: esc\nnotebook: {POINTS}\ngrid:\n  x: ["\\e[2J\\e[31mred\\a", "ok text", "rtl\\u202eevil\\r"]\n'
    assert main(["sweep", str(spec_file(tmp_path, text)), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e"), repr(out)
    assert "x=\\x1b[2J\\x1b[31mred\\x07" in out and "x=ok text" in out and "x=rtl\\u202eevil\\r" in out


def test_oversized_spec_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"spec is 1048577 bytes; a spec is at most 1048576 bytes"):
        load_spec(spec_file(tmp_path, "#" * (1 << 20) + "\n"))


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", "", "-x", "a..b", "x" * 101, 3, "caf\u00e9"])
def test_path_like_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        load_spec(spec_file(tmp_path, yaml.safe_dump({"name": name, "notebook": POINTS})))


def test_plain_names_pass(tmp_path):
    for name in ("demo", "kv-2.1", "A_b"):
        assert load_spec(spec_file(tmp_path, yaml.safe_dump({"name": name, "notebook": POINTS}))).name == name


def test_non_notebook_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"notebook 'notes.txt' is not a Jupyter notebook \(.ipynb\); notebooks in"):
        load_spec(spec_file(tmp_path, "notebook: notes.txt\n"))
    with pytest.raises(ConfigError, match="'notebook' must be a notebook name or path, got 3"):
        load_spec(spec_file(tmp_path, "notebook: 3\n"))


def test_a_file_named_ipynb_that_is_not_a_notebook_fails_validation(tmp_path):
    from ryzlab.workbench.sweep import plan

    (tmp_path / "fake.ipynb").write_text("this is not json")
    with pytest.raises(ConfigError, match="fake.ipynb: not a readable Jupyter notebook"):
        plan(spec_file(tmp_path, "notebook: fake.ipynb\n"))


def test_grid_size_is_checked_before_expansion(tmp_path):
    axes = {f"a{i}": list(range(10)) for i in range(6)}  # 10^6 points: never built
    spec = load_spec(spec_file(tmp_path, yaml.safe_dump({"notebook": POINTS, "grid": axes, "repeat": 3})))
    assert count_points(spec) == 3 * 10 ** 6
    t0 = time.process_time()
    with pytest.raises(ConfigError) as e:
        expand(spec)
    assert time.process_time() - t0 < 1.0, "refused from the axis lengths, not by building the grid"
    msg = str(e.value)
    assert f"expands to 3000000 points (points: 3000000), more than the limit of {MAX_POINTS}" in msg
    assert "--max-points 3000000" in msg and len(msg.splitlines()) == 2
    small = load_spec(spec_file(tmp_path, yaml.safe_dump({"notebook": POINTS, "grid": {"x": [1, 2, 3]}})))
    with pytest.raises(ConfigError, match="more than the limit of 2"):
        expand(small, max_points=2)
    assert len(expand(small, max_points=3)) == 3  # the override
    with pytest.raises(ConfigError, match="--max-points must be >= 1, got 0"):
        expand(small, max_points=0)


def test_repeat_values_and_the_reserved_parameter(tmp_path):
    for bad in (0, -1, 1.5, True, "2", 1001):
        with pytest.raises(ConfigError, match=r"repeat must be an integer in 1..1000"):
            load_spec(spec_file(tmp_path, yaml.safe_dump({"notebook": POINTS, "repeat": bad})))
    with pytest.raises(ConfigError, match="'repeat' is set by the sweep"):
        load_spec(spec_file(tmp_path, yaml.safe_dump({"notebook": POINTS, "grid": {"repeat": [1, 2]}})))


def test_block_jobs_caps_points_at_once(tmp_path):
    spec = load_spec(spec_file(tmp_path, yaml.safe_dump({"jobs": 3, "experiments": [
        {"notebook": POINTS, "grid": {"x": [1, 2]}, "jobs": 1},
        {"notebook": POINTS, "grid": {"x": [3]}}]})))
    assert [p.jobs for p in expand(spec)] == [1, 1, 3]
    assert [b.jobs for b in load_spec(spec_file(tmp_path, yaml.safe_dump({"notebook": POINTS}))).blocks] == [None]
    for bad in (0, 1.5, True, "1"):
        with pytest.raises(ConfigError, match=r"jobs must be an integer in 1..1024"):
            load_spec(spec_file(tmp_path, yaml.safe_dump({"notebook": POINTS, "jobs": bad})))
    with pytest.raises(ConfigError, match="grid at the top of a spec with 'experiments' would be ignored"):
        load_spec(spec_file(tmp_path, yaml.safe_dump({"grid": {"x": [1]}, "experiments": [{"notebook": POINTS}]})))


def test_a_spec_is_made_of_spec_blocks(tmp_path):
    """One name per concept: the spec's block is `SpecBlock` (kv.blocks.Block and the model's Block are others)."""
    import ryzlab.workbench.spec as spec_mod
    from ryzlab.workbench.spec import SpecBlock

    p = tmp_path / "s.yaml"
    p.write_text("name: s\nexperiments:\n  - notebook: attention_bench\n    grid: {context: [64]}\n"
                 "  - notebook: attention_bench\n    grid: {context: [128]}\n")
    spec = load_spec(p)
    assert len(spec.blocks) == 2 and all(type(b) is SpecBlock for b in spec.blocks)
    assert not hasattr(spec_mod, "Block")


def test_serving_load_fields_are_loadspecs():
    """The serving experiment's load knobs are the load generator's (LoadFields), declared once;
    the experiment keeps its own shorter defaults."""
    import typing

    from ryzlab.config import LoadFields, ParallelFields, field_names
    from ryzlab.experiments.serving import Config
    from ryzlab.loadgen.load import LoadSpec

    assert issubclass(Config, LoadFields) and issubclass(LoadSpec, LoadFields) and issubclass(Config, ParallelFields)
    for name in field_names(LoadFields):
        assert typing.get_type_hints(Config)[name] == typing.get_type_hints(LoadSpec)[name]
    assert (LoadSpec().rate, LoadSpec().concurrency, LoadSpec().num_requests) == (10.0, 4, 64)
    assert (Config().rate, Config().concurrency, Config().num_requests) == (8.0, 16, 48)
