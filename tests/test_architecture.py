"""The package's shape, checked: imports go one way (layers in docs/architecture.md), no cycles,
no module past 500 lines. Imports inside functions count too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "ryzlab"
MAX_LINES = 500


def layers() -> list[list[str]]:
    """The ```layers block of docs/architecture.md: one line per layer, lowest first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    out = []
    for line in block.group(1).splitlines():
        if line.strip():
            _, _, mods = line.partition(":")
            out.append(mods.split())
    return out


def modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> ryzlab modules it imports (anywhere in the file; TYPE_CHECKING blocks excepted).

    ``from pkg import sub`` depends on ``pkg.sub``; a module never depends on its own ancestors
    (Python runs them first anyway, and they are the module's own package)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()

        def visit(node: ast.AST) -> None:
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                    continue
                if isinstance(ch, ast.Import):
                    deps.update(a.name for a in ch.names)
                elif isinstance(ch, ast.ImportFrom):
                    base = ch.module or ""
                    if ch.level:
                        parts = name.split(".") if is_pkg else name.split(".")[:-1]
                        parts = parts[: len(parts) - (ch.level - 1)]
                        base = ".".join(parts + ([ch.module] if ch.module else []))
                    for a in ch.names:
                        deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
                visit(ch)

        visit(tree)
        resolved = set()
        for d in deps:
            while d and d not in mods:
                d = d.rpartition(".")[0]
            if d and d != name and not name.startswith(d + "."):
                resolved.add(d)
        graph[name] = resolved
    return graph


def layer_of(module: str, table: list[list[str]]) -> int:
    best = (-1, -1)
    for i, prefixes in enumerate(table):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[1]:
                best = (i, len(p))
    return best[0]


def test_every_module_has_a_layer():
    table = layers()
    missing = sorted(m for m in modules() if layer_of(m, table) < 0)
    assert not missing, f"modules in no layer of docs/architecture.md: {missing}"


def test_imports_never_go_up_a_layer():
    table = layers()
    bad = []
    for mod, deps in imports(modules()).items():
        for d in deps:
            if layer_of(d, table) > layer_of(mod, table):
                bad.append(f"{mod} (layer {layer_of(mod, table)}) imports {d} (layer {layer_of(d, table)})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = strongly_connected(imports(modules()))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a constructed graph with a cycle and a layer crossing."""
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    table = [["ryzlab.config"], ["ryzlab.kv"], ["ryzlab.models"]]
    assert layer_of("ryzlab.kv.cache", table) == 1 < layer_of("ryzlab.models.hf", table) == 2


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_past_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it along its seam"
