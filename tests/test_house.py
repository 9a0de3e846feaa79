"""The shape of archiver/: the layers the README's module table states, and functions short enough to read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "archiver"
MAX_FUNCTION_LINES = 60


def layers() -> dict[str, int]:
    """Module name -> its row in the README's module table, 0 at the top."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| module | owns |") :].split("\n\n", 1)[0]
    rows: dict[str, int] = {}
    for row, line in enumerate(table.splitlines()[2:]):
        first_cell = line.split("|")[1]
        for module in re.findall(r"`archiver/(\w+)\.py`", first_cell):
            rows[module] = row
    return rows


def imported_modules(path: Path) -> set[str]:
    """archiver modules a file imports, at the top or inside functions (TYPE_CHECKING imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "archiver":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("archiver."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("archiver."))
    return found


def modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.glob("*.py")) if not path.name.startswith("__")]


def test_every_module_is_in_the_readme_table() -> None:
    assert sorted(layers()) == sorted(path.stem for path in modules())


def test_no_module_imports_one_above_it() -> None:
    """A module imports only modules on its own row of the README's table or below it: data flows one
    way, and the lower layers never reach up."""
    row = layers()
    upward = [
        f"{path.stem} (row {row[path.stem]}) imports {name} (row {row[name]})"
        for path in modules()
        for name in imported_modules(path)
        if row[name] < row[path.stem]
    ]
    assert upward == []


def test_no_function_is_over_60_lines() -> None:
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert long == []
