"""The harness loads as one module: tests import it as prunedm.bench (never as a top-level `bench`, which would
load each file a second time), and the CLI imports it only when `prunedm bench` runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_tests_import_the_harness_as_prunedm_bench():
    top_level = {
        str(path.relative_to(TESTS)): sorted(m for m in _imported_modules(path) if m.split(".")[0] == "bench")
        for path in sorted(TESTS.rglob("*.py"))
    }
    assert {path: names for path, names in top_level.items() if names} == {}
    assert "prunedm.bench" in _imported_modules(TESTS / "test_bench_run.py")  # the scan reads real imports


def test_importing_the_cli_does_not_import_the_harness():
    code = (
        "import sys, prunedm.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench' or m.startswith('prunedm.bench')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
