"""The bad-input contract every fuzz case checks: a bad input ends with exit code 2 and one line on
stderr naming what is wrong, no traceback, and nothing half-written in the run's --out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunedm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
def rejects(tmp_path, capsys):
    """rejects(argv, *words, out=None): run `prunedm argv` in-process and check the bad-input contract.

    `words` must all appear (case-insensitive) in the one stderr line. `out` is the job's --out
    directory (if it exists before the call, its listing must be unchanged; if it did not, it must
    not exist afterwards). Returns the error line."""

    def check(argv: list[str], *words: str, out: Path | None = None) -> str:
        before = _listing(out) if out is not None and out.exists() else None
        capsys.readouterr()
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, f"exit {code}, stderr: {err}"
        assert len(lines) == 1, f"expected one line on stderr, got: {err}"
        assert "Traceback" not in err
        for word in words:
            assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
        if out is not None:
            if before is None:
                assert not out.exists(), f"{out} left behind: {_listing(out)}"
            else:
                assert _listing(out) == before, f"{out} changed: {_listing(out) ^ before}"
        return lines[0]

    return check


def run_subprocess(argv: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """`python -m prunedm argv` in a child process (for kill-and-resume and environment cases)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "prunedm", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )
