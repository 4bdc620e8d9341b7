"""gpu-check.sh's summary.json: each step's status and time, and the headline of what each step found.
Standard library only, and rewritten after every step, so a run cut short still says how far it got."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _atomic():
    # prunedm/_atomic.py by path: stdlib only, and `import prunedm` may be what failed.
    spec = importlib.util.spec_from_file_location("_prunedm_atomic", ROOT / "prunedm" / "_atomic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _junit(path: Path) -> dict | None:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    return {**counts, "failed": failed[:50]}


def build(work: Path, out: Path, dry_run: bool) -> dict:
    with open(work / "steps.tsv", newline="") as f:
        steps = [{k: int(v) if k.endswith("_s") or k == "seconds" else v for k, v in row.items()}
                 for row in csv.DictReader(f, delimiter="\t")]  # fmt: skip
    summary: dict = {"dry_run": dry_run, "steps": steps, "plan_total_s": sum(s["budget_s"] for s in steps)}
    env = _json(out / "env.json")
    if env:
        summary["device"], summary["commit"] = env.get("device"), env.get("commit")
        summary["versions"] = env.get("versions")
    setup = _json(work / "setup" / "setup.json")
    if setup:
        summary["setup"] = setup
    correctness = _json(out / "correctness.json")
    if correctness:
        summary["correctness"] = {k: correctness.get(k) for k in ("counts", "worst_rel_err")}
        summary["correctness"]["failed"] = [c for c in correctness.get("cases", [])
                                            if c.get("status") in ("FAIL", "ERROR")][:30]  # fmt: skip
    junit = _junit(out / "pytest-cuda.xml")
    if junit:
        summary["pytest_cuda"] = junit
    sanitizer = work / "sanitizer" / "result.tsv"
    if sanitizer.exists():
        rows = [line.split("\t") for line in sanitizer.read_text().splitlines() if line.strip()]
        summary["sanitizer"] = {r[0]: {"exit": r[1] if len(r) > 1 else "", "summary": r[2] if len(r) > 2 else ""}
                                for r in rows}  # fmt: skip
    for name in ("timing", "e2e"):
        data = _json(out / f"{name}.json")
        if data and "headline" in data:
            summary[name] = data["headline"]
    return summary


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: summary.py WORK_DIR OUT_DIR [--dry-run]", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    summary = build(work, out, "--dry-run" in argv[2:])
    _atomic().write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
