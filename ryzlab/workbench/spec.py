"""Sweep specs: parse a YAML spec (hostile input: bounded, strict), expand its grid into points.

    spec = load_spec("specs/demo.yaml")   # YAML -> Spec; every structural problem is a ConfigError
    n = count_points(spec)                # from the axis lengths alone: nothing is built
    points = expand(spec)                 # grid x zip x fixed x repeat -> [Point], refused past max_points

A spec is data a user may have downloaded: YAML aliases are refused (a 1 KB alias bomb expands
past gigabytes), duplicate keys are refused (YAML's "last one wins" silently drops a grid), the
file size and the number of values are bounded before anything is built, values that JSON
cannot hold (``!!set``, ``!!binary``, timestamps, ordered maps) are refused, and the grid is
counted *before* it is expanded.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ryzlab.config import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = PACKAGE_DIR / "notebooks"
"""The experiment notebooks: a plain folder inside the package (``ryzlab/notebooks``), so a checkout
without symlinks and an installed wheel find them the same way."""
SPEC_KEYS = ("name", "notebook", "grid", "zip", "fixed", "repeat", "jobs", "resources", "description")
BLOCK_KEYS = ("notebook", "grid", "zip", "fixed", "repeat", "jobs", "resources", "description")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "custom")
"""A block's ``resources:`` (``--executor ray`` task options, see :mod:`ryzlab.workbench.executors.ray`)."""
SWEEP_PARAMS = ("repeat",)
"""Point parameters the sweep adds itself (never passed to the notebook)."""
MAX_POINTS = 10_000
"""Default bound on a sweep's size; ``--max-points`` raises it. A point costs a kernel (seconds)."""
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000
"""Values (YAML nodes) a spec may hold. The demo has a few hundred; a 10,000-point zip of a few
axes fits. Checked before parsing (from the separators) and while composing, so a 1 MiB spec of
500k list items is refused in milliseconds, not after building half a gigabyte of nodes."""
MAX_REPEAT = 1000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True, kw_only=True)
class SpecBlock:
    """One notebook with its grid: the cartesian product of ``grid``, times ``zip`` (axes that
    vary together), each point completed by ``fixed``, each run ``repeat`` times."""

    notebook: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    repeat: int = 1
    """Runs per point; with ``repeat > 1`` every point gets a ``repeat`` parameter 0..N-1."""
    jobs: int | None = None
    """At most this many of the block's points at once (``jobs: 1``: timings taken alone, even
    under ``--jobs 2``); None: the sweep's ``--jobs``."""
    resources: dict[str, Any] = field(default_factory=dict)
    """Ray task options of each point (``--executor ray``), replacing its defaults key by key."""

    @property
    def size(self) -> int:
        """Points this block expands to, computed from the axis lengths (nothing is built)."""
        zip_len = len(next(iter(self.zip.values()))) if self.zip else 1
        return math.prod(len(v) for v in self.grid.values()) * zip_len * self.repeat


@dataclass(frozen=True, kw_only=True)
class Spec:
    name: str
    blocks: tuple[SpecBlock, ...]
    path: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Point:
    notebook: Path
    experiment: str
    params: dict[str, Any]
    """The notebook's parameters, plus ``repeat`` when the spec repeats points."""
    run_id: str
    jobs: int | None = None
    """Its block's cap on points at once (None: the sweep's --jobs)."""
    resources: dict[str, Any] = field(default_factory=dict)
    """Its block's ``resources:`` (``--executor ray``); where a point runs, so not in its run_id."""

    @property
    def label(self) -> str:
        return f"{self.experiment}({', '.join(f'{k}={printable(str(v))}' for k, v in self.params.items())})"

    @property
    def notebook_params(self) -> dict[str, Any]:
        """What the notebook receives: the point's parameters without the sweep's own."""
        return {k: v for k, v in self.params.items() if k not in SWEEP_PARAMS}

    def to_json(self) -> dict[str, Any]:
        return {"notebook": str(self.notebook), "experiment": self.experiment, "params": self.params,
                "run_id": self.run_id, "jobs": self.jobs}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Point":
        return cls(notebook=Path(d["notebook"]), experiment=d["experiment"], params=d["params"], run_id=d["run_id"],
                   jobs=d.get("jobs"))


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\r``, ``\\u202e``): a
    parameter value printed to a terminal must not move its cursor, clear it or reverse the line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# ----------------------------------------------------------------------------- YAML
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, duplicate keys, values JSON cannot hold and more than
    :data:`MAX_SPEC_VALUES` nodes."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError([f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a spec "
                               "(they can expand without bound); write the values out"])
        self.nodes = getattr(self, "nodes", 0) + 1
        if self.nodes > MAX_SPEC_VALUES:
            mark = self.peek_event().start_mark
            raise ConfigError([f"line {mark.line + 1}: the spec holds more than the {MAX_SPEC_VALUES} values a "
                               f"spec may hold"])
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ConfigError([f"line {key_node.start_mark.line + 1}: a mapping key must be a plain "
                                   f"value, got {key!r}"]) from None
            if key in seen:
                raise ConfigError([f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first at "
                                   f"line {seen[key]}); YAML would silently keep only the last one"])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_NOT_JSON = {"timestamp": "a timestamp (quote it to pass the text)", "set": "a set (!!set: its order follows the "
             "hash seed; write a list)", "binary": "bytes (!!binary)", "omap": "an ordered map (!!omap; write a "
             "mapping)", "pairs": "a list of pairs (!!pairs; write a mapping)"}


def _refuse_not_json(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    what = _NOT_JSON[node.tag.rsplit(":", 1)[-1]]
    raise ConfigError([f"line {node.start_mark.line + 1}: {what} is not a JSON value; a spec holds strings, numbers, "
                       f"booleans, null, lists and mappings only"])


for _tag in _NOT_JSON:
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_not_json)


def _count_values(text: str) -> int:
    """An upper bound on the collection entries of ``text``, read without parsing: each one needs a
    ',' (flow style) or a line of its own (block style)."""
    return text.count(",") + text.count("\n") + 1


def parse_yaml(path: Path) -> Any:
    """Read ``path`` as strict YAML; every way it can be wrong is a :class:`ConfigError`."""
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise ConfigError([f"spec is {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes"], str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"spec is not UTF-8 text (byte {e.start}); is it a YAML file?"], str(path)) from None
    values = _count_values(text)
    if values > MAX_SPEC_VALUES:
        raise ConfigError([f"spec has {values} lines and ',' separators: more than the {MAX_SPEC_VALUES} values a "
                           f"spec may hold (checked before parsing)"], str(path))
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {' '.join(str(e).split())}"], str(path)) from None
    except RecursionError:
        raise ConfigError(["YAML nested too deeply"], str(path)) from None


# ----------------------------------------------------------------------------- spec
def _resolve_notebook(name: str, base: Path) -> Path:
    p = Path(name)
    candidates = [p, base / p, NOTEBOOK_DIR / p]
    if p.suffix != ".ipynb":
        candidates += [c.with_name(c.name + ".ipynb") for c in candidates]
    have = sorted(q.stem for q in NOTEBOOK_DIR.glob("*.ipynb"))
    for c in candidates:
        if c.is_file():
            if c.suffix != ".ipynb":
                raise ConfigError([f"notebook {name!r} is not a Jupyter notebook (.ipynb); "
                                   f"notebooks in {NOTEBOOK_DIR}: {', '.join(have)}"])
            return c.resolve()
    raise ConfigError([f"notebook {name!r} not found; notebooks in {NOTEBOOK_DIR}: {', '.join(have)}"])


def _count(raw: Any, key: str, where: str, top: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= top:
        raise ConfigError([f"{where}: {key} must be an integer in 1..{top}, got {raw!r}"])
    return raw


def _repeat(raw: Any, where: str) -> int:
    return _count(raw, "repeat", where, MAX_REPEAT)


def check_resources(raw: Any, where: str) -> list[str]:
    """Problems with a block's ``resources:`` mapping (empty list: fine)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [f"{where}: 'resources' must be a mapping with keys {', '.join(RESOURCE_KEYS)}"]
    problems = [f"{where}: unknown resources key {k!r}; valid keys: {', '.join(RESOURCE_KEYS)}"
                for k in raw if k not in RESOURCE_KEYS]
    amounts = [(k, raw[k]) for k in ("num_cpus", "num_gpus", "memory") if k in raw]
    custom = raw.get("custom", {})
    if not isinstance(custom, dict):
        problems.append(f"{where}: resources.custom must be a mapping of Ray resource name -> amount")
    else:
        amounts += [(f"custom.{k}", v) for k, v in custom.items()]
    for k, v in amounts:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            problems.append(f"{where}: resources.{k} must be a finite number >= 0, got {v!r}"
                            + (" (memory is in bytes)" if k == "memory" else ""))
    return problems


def _block(raw: Any, base: Path, where: str, repeat: int, jobs: int | None = None) -> SpecBlock:
    problems = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: expected a mapping with keys {', '.join(BLOCK_KEYS)}"])
    for k in raw:
        if k not in BLOCK_KEYS:
            problems.append(f"{where}: unknown key {k!r}; valid keys: {', '.join(BLOCK_KEYS)}")
    if "notebook" not in raw:
        problems.append(f"{where}: 'notebook' is required")
    elif not isinstance(raw["notebook"], str):
        problems.append(f"{where}: 'notebook' must be a notebook name or path, got {raw['notebook']!r}")
    grid, zp, fixed = raw.get("grid") or {}, raw.get("zip") or {}, raw.get("fixed") or {}
    for key, section in (("grid", grid), ("zip", zp), ("fixed", fixed)):
        if not isinstance(section, dict):
            problems.append(f"{where}: {key!r} must be a mapping of parameter -> value(s)")
    if problems:
        raise ConfigError(problems)
    if "repeat" in raw:
        repeat = _repeat(raw["repeat"], where)
    if "jobs" in raw:
        jobs = _count(raw["jobs"], "jobs", where, 1024)
    for key, values in list(grid.items()) + list(zp.items()):
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: {key!r} must be a non-empty list of values, got {values!r}")
    if len({len(v) for v in zp.values() if isinstance(v, list)}) > 1:
        problems.append(f"{where}: zip axes must have equal lengths, got "
                        + ", ".join(f"{k}={len(v)}" for k, v in zp.items()))
    problems.extend(check_resources(raw.get("resources"), where))
    names = list(grid) + list(zp) + list(fixed)
    for dup in sorted({str(n) for n in names if names.count(n) > 1}):
        problems.append(f"{where}: parameter {dup!r} appears in more than one of grid/zip/fixed")
    for n in names:
        if not isinstance(n, str) or not n.isidentifier():
            problems.append(f"{where}: parameter name {n!r} is not a Python identifier")
        elif n in SWEEP_PARAMS:
            problems.append(f"{where}: {n!r} is set by the sweep (use the spec key `repeat: N`)")
    if problems:
        raise ConfigError(problems)
    return SpecBlock(notebook=_resolve_notebook(raw["notebook"], base), grid=dict(grid), zip=dict(zp),
                 fixed=dict(fixed), repeat=repeat, jobs=jobs, resources=dict(raw.get("resources") or {}))


def check_name(name: Any, where: str = "") -> str:
    """A sweep name becomes a folder under results/: a plain name, never a path."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError([f"name {name!r} must be a plain folder name: letters, digits, '-', '_', '.', "
                           "starting with a letter or digit, no '..' or '/'"], where)
    return name


def load_spec(path: str | os.PathLike) -> Spec:
    """Parse a sweep spec; structural problems raise :class:`ConfigError` before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"spec file {str(path)!r} does not exist"])
    raw = parse_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: a spec is a mapping; see specs/demo.yaml"])
    valid = SPEC_KEYS + ("experiments",)
    unknown = [f"unknown key {k!r}; valid keys: {', '.join(valid)}" for k in raw if k not in valid]
    if unknown:
        raise ConfigError(unknown, str(path))
    name = check_name(raw["name"] if "name" in raw else path.stem, str(path))
    repeat = _repeat(raw["repeat"], "spec") if "repeat" in raw else 1
    jobs = _count(raw["jobs"], "jobs", "spec", 1024) if "jobs" in raw else None
    try:
        if "experiments" in raw:
            if "notebook" in raw:
                raise ConfigError(["use either 'notebook' (one block) or 'experiments' (a list), not both"])
            items = raw["experiments"]
            if not isinstance(items, list) or not items:
                raise ConfigError(["'experiments' must be a non-empty list of {notebook, grid, zip, fixed}"])
            stray = [k for k in ("grid", "zip", "fixed", "resources") if k in raw]
            if stray:
                raise ConfigError([f"{', '.join(stray)} at the top of a spec with 'experiments' would be "
                                   "ignored; put them in the blocks"])
            blocks = tuple(_block(b, path.parent, f"experiments[{i}]", repeat, jobs) for i, b in enumerate(items))
        else:
            blocks = (_block({k: v for k, v in raw.items() if k in BLOCK_KEYS and k not in ("repeat", "jobs")},
                             path.parent, "spec", repeat, jobs),)
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    return Spec(name=name, blocks=blocks, path=path.resolve())


def run_id_for(notebook: Path, params: dict[str, Any], content: bytes | None = None) -> str:
    """Stable id of (notebook content, params): same inputs -> same folder -> resumable."""
    h = hashlib.sha256(notebook.read_bytes() if content is None else content)
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return f"{notebook.stem}-{h.hexdigest()[:12]}"


def count_points(spec: Spec) -> int:
    return sum(b.size for b in spec.blocks)


def expand(spec: Spec, *, max_points: int = MAX_POINTS) -> list[Point]:
    """Every point of ``spec``; refused (before anything is built) past ``max_points``."""
    if max_points < 1:
        raise ConfigError([f"--max-points must be >= 1, got {max_points}"])
    n = count_points(spec)
    if n > max_points:
        sizes = ", ".join(f"{b.notebook.stem}: {b.size}" for b in spec.blocks)
        raise ConfigError([f"the spec expands to {n} points ({sizes}), more than the limit of {max_points}; "
                           f"shrink the grid or raise the limit with --max-points {n}"], spec.name)
    points: list[Point] = []
    for b in spec.blocks:
        gkeys = list(b.grid)
        zkeys = list(b.zip)
        zrows = list(zip(*(b.zip[k] for k in zkeys))) if zkeys else [()]
        content = b.notebook.read_bytes()
        for gvals in itertools.product(*(b.grid[k] for k in gkeys)):
            for zvals in zrows:
                params = {**b.fixed, **dict(zip(gkeys, gvals)), **dict(zip(zkeys, zvals))}
                for r in range(b.repeat):
                    p = {**params, "repeat": r} if b.repeat > 1 else params
                    points.append(Point(notebook=b.notebook, experiment=b.notebook.stem, params=p,
                                        run_id=run_id_for(b.notebook, p, content), jobs=b.jobs,
                                        resources=b.resources))
    seen: dict[str, Point] = {}
    for p in points:
        if p.run_id in seen:
            raise ConfigError([f"two points are identical: {p.label}"])
        seen[p.run_id] = p
    return points
