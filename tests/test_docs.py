"""The user docs stay true to the tree: every command listed, every package folder in the layout, every path
they name exists, and no page is an orphan."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# a path ends where a word does (a `<placeholder>` part makes it no path: tests/test_<module>.py)
PATH = re.compile(r"(?<![\w/.-])((?:ryzlab|benchmarks|specs|tests|docs)/[\w./-]*\w)(?!<|[\w/-]|\.\w)")


def test_readme_lists_every_command():
    from ryzlab.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {c for c in commands if f"\nryzlab {c} " not in readme} == set()


def test_readme_layout_covers_every_package_folder():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    folders = {p.parent.name for p in (ROOT / "ryzlab").glob("*/__init__.py")} | {"notebooks"}
    assert {f for f in folders if f"ryzlab/{f}/" not in layout} == set()
    assert "docs/architecture.md" in layout and not re.search(r"^notebooks/", layout, re.M)


def test_every_path_the_docs_name_exists():
    missing = [(doc.relative_to(ROOT).as_posix(), p) for doc in DOCS for p in PATH.findall(doc.read_text())
               if not (ROOT / p).exists()]
    assert missing == []


def test_reports_page_is_linked():
    for page in ("README.md", "docs/README.md"):
        assert "reports.md" in (ROOT / page).read_text(), page
