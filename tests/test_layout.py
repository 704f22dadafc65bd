"""The repository's layout rules that import-linter cannot see (bench/ is no package)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at any depth (inside functions too), and every string
    that names a module of tests/ (`python -m tests.x` in a child's command line)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("tests.")
            and " " not in node.value
        ):
            found.append(node.value)
    return found


def test_no_bench_imports_the_tests() -> None:
    """What a bench shares with the tests (fakes, process helpers) lives in testkit/."""
    benches = sorted((REPO / "bench").glob("*.py"))
    assert benches
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in benches
        for module in imported_modules(path)
        if module == "tests" or module.startswith("tests.")
    ]
    assert not offenders, "bench/ must not import tests/ (use testkit/):\n" + "\n".join(offenders)
