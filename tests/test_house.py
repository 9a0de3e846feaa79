"""The shape of archiver/: the layers the README's module table states, modules and functions short enough
to read. A module is named by its path under archiver/ without `.py`: `worker`, `fanout/coordinator`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "archiver"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450
# Fan-out is a layer of small modules, each one of its steps or one thing it keeps (issue 22).
MAX_FANOUT_MODULE_LINES = 300


def layers() -> dict[str, int]:
    """Module name -> its row in the README's module table, 0 at the top."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| module | owns |") :].split("\n\n", 1)[0]
    rows: dict[str, int] = {}
    for row, line in enumerate(table.splitlines()[2:]):
        first_cell = line.split("|")[1]
        for module in re.findall(r"`archiver/([\w/]+)\.py`", first_cell):
            rows[module] = row
    return rows


def imported_modules(path: Path) -> set[str]:
    """archiver modules a file imports, at the top or inside functions (TYPE_CHECKING imports too). A
    package is no module: `from archiver import fanout` names `fanout`, which no row of the table has."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if (node.module + ".").startswith("archiver."):
                base = node.module.removeprefix("archiver").removeprefix(".").replace(".", "/")
                for alias in node.names:
                    submodule = f"{base}/{alias.name}".lstrip("/")
                    found.add(submodule if (PACKAGE / f"{submodule}.py").exists() or not base else base)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("archiver.").replace(".", "/")
                for a in node.names
                if a.name.startswith("archiver.")
            )
    return found


def module_name(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if not path.name.startswith("__")]


def test_every_module_is_in_the_readme_table() -> None:
    assert sorted(layers()) == sorted(module_name(path) for path in modules())


def test_no_module_imports_one_above_it() -> None:
    """A module imports only modules on its own row of the README's table or below it: data flows one
    way, and the lower layers never reach up."""
    row = layers()
    upward = [
        f"{module_name(path)} (row {row[module_name(path)]}) imports {name} (row {row.get(name)})"
        for path in modules()
        for name in imported_modules(path)
        if name not in row or row[name] < row[module_name(path)]
    ]
    assert upward == []


def test_no_module_is_too_long_to_read() -> None:
    """No module over ~450 lines, and none of fan-out's over ~300: each owns one step or one thing."""
    long = []
    for path in modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_FANOUT_MODULE_LINES if module_name(path).startswith("fanout/") else MAX_MODULE_LINES
        if lines > limit:
            long.append(f"{module_name(path)}: {lines} lines (at most {limit})")
    assert long == []


def test_no_function_is_over_60_lines() -> None:
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert long == []
