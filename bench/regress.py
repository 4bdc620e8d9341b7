"""Regression check of benchmark results: compare each row's speed relative to its baseline (dense, or
the op's reference backend) in a current run against a saved baseline run, and fail on a drop.

    python -m bench.regress --baseline bench/results/baseline-cpu.json --current bench/out [--max-drop 0.15]

Inputs are JSON files written by bench.common.write_results ({"environment", "rows"}); a directory
means every such JSON in it. Rows match by identity (op/model/layer/variant, shape, dtype, backend,
batch, device). The compared number is a speedup, higher = faster: speedup_vs_dense or
speedup_vs_baseline as written, else 1 / ratio_to_dense or 1 / latency_ratio (time ratios). Ratios
measured within one run cancel most machine-to-machine differences; absolute times are not compared.

Quality rows (bench.quality_seeds: fid_mean and fid_std over seeds) match by (variant, finetune_steps,
finetune_lr) and fail when the current FID mean exceeds the baseline's by more than the two seed spreads (std + std).

Exit status: 0 no regression; 1 some speedup dropped by more than --max-drop (relative); 2 an input
could not be read. Rows present on only one side are listed, and do not fail the check."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IDENTITY_FIELDS = ("op", "model", "layer", "variant", "shape", "dtype", "backend", "batch", "device")
# Speedups as written (higher = faster), then time ratios (lower = faster), in order of preference.
SPEEDUP_FIELDS = ("speedup_vs_dense", "speedup_vs_baseline")
TIME_RATIO_FIELDS = ("ratio_to_dense", "latency_ratio")


class UnreadableResults(ValueError):
    """An input that is not a results JSON (or a directory of them) written by write_results."""


def _result_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise UnreadableResults(f"{path}: a directory with no .json result files")
        return files
    if not path.is_file():
        raise UnreadableResults(f"{path}: no such file or directory")
    return [path]


def load_rows(path: str | Path) -> list[dict]:
    """The rows of one results JSON, or of every results JSON in a directory, each with its environment's
    device filled in when the row has none. Raises UnreadableResults for anything else."""
    path = Path(path)
    rows = []
    for file in _result_files(path):
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnreadableResults(f"{file}: not readable JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            if path.is_dir():
                continue  # other JSON in a results folder (e.g. per-variant records) is not a results file
            raise UnreadableResults(f"{file}: expected {{'environment': ..., 'rows': [...]}} from write_results")
        env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
        for row in data["rows"]:
            if not isinstance(row, dict):
                raise UnreadableResults(f"{file}: a row is not an object: {row!r}")
            rows.append({"device": _device_kind(env.get("device")), **row} if "device" not in row else row)
    if not rows and path.is_dir():
        raise UnreadableResults(f"{path}: no results JSON (with 'rows') in the directory")
    return rows


def _device_kind(device: str | None) -> str | None:
    """environment()'s device without its details: "cpu (x86_64, 2 threads)" -> "cpu"; GPU names stay."""
    return device.split(" (")[0] if isinstance(device, str) else device


def identity(row: dict) -> tuple:
    """The row's identity: (field, value) for each identity field it has."""
    return tuple((field, str(row[field])) for field in IDENTITY_FIELDS if row.get(field) is not None)


def speedup(row: dict) -> float | None:
    """The row's speed relative to its same-run baseline, higher = faster; None when it has none."""
    for field in SPEEDUP_FIELDS:
        value = row.get(field)
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return float(value)
    for field in TIME_RATIO_FIELDS:
        value = row.get(field)
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return 1.0 / float(value)
    return None


def compare(baseline: list[dict], current: list[dict], max_drop: float) -> dict:
    """Match rows by identity and compare speedups. Returns {"compared": [...], "regressions": [...],
    "only_baseline": [...], "only_current": [...], "duplicates": [...]}; a regression is a relative drop
    (baseline - current) / baseline greater than max_drop."""
    if not 0.0 <= max_drop < 1.0:
        raise ValueError(f"max_drop must be in [0, 1), got {max_drop}")
    index_base, index_cur, duplicates = {}, {}, []
    for rows, index in ((baseline, index_base), (current, index_cur)):
        for row in rows:
            key = identity(row)
            if key in index:
                duplicates.append(key)  # the later row wins
            index[key] = row
    compared, regressions = [], []
    for key, base_row in index_base.items():
        if key not in index_cur:
            continue
        before, after = speedup(base_row), speedup(index_cur[key])
        if before is None or after is None:
            continue
        change = (after - before) / before
        entry = {"key": key, "baseline": before, "current": after, "change": change, "regressed": change < -max_drop}
        compared.append(entry)
        if entry["regressed"]:
            regressions.append(entry)
    return {
        "compared": compared,
        "regressions": regressions,
        "only_baseline": [k for k in index_base if k not in index_cur],
        "only_current": [k for k in index_cur if k not in index_base],
        "duplicates": duplicates,
    }


def _label(key: tuple) -> str:
    return " ".join(value for _, value in key)


def format_report(report: dict, max_drop: float) -> str:
    """A plain-text table of the comparison and the unmatched rows."""
    lines = []
    width = max([len(_label(e["key"])) for e in report["compared"]] + [10])
    lines.append(f"{'row':<{width}}  {'baseline':>9}  {'current':>9}  {'change':>8}  status")
    for entry in report["compared"]:
        status = f"REGRESSION (> {max_drop:.0%} drop)" if entry["regressed"] else "ok"
        lines.append(
            f"{_label(entry['key']):<{width}}  {entry['baseline']:>8.3f}x  {entry['current']:>8.3f}x  "
            f"{entry['change']:>+8.1%}  {status}"
        )
    for title, keys in (
        ("only in the baseline", report["only_baseline"]),
        ("only in the current run", report["only_current"]),
    ):  # noqa: E501
        if keys:
            lines.append(f"{len(keys)} row(s) {title}:")
            lines += [f"  {_label(k)}" for k in keys]
    if report["duplicates"]:
        lines.append(f"{len(report['duplicates'])} duplicate identities (the later row was used)")
    n, bad = len(report["compared"]), len(report["regressions"])
    lines.append(f"{n} row(s) compared, {bad} regression(s)" if n else "no rows in common: nothing compared")
    return "\n".join(lines)


def compare_quality(baseline: list[dict], current: list[dict]) -> list[dict]:
    """Quality rows (with fid_mean, fid_std) matched by (variant, finetune_steps, finetune_lr); each entry says
    whether the current FID mean is worse than the baseline's by more than std + std (the seed-spread rule)."""

    def index(rows):
        return {(r.get("variant"), r.get("finetune_steps"), r.get("finetune_lr")): r for r in rows
                if "fid_mean" in r and "fid_std" in r}  # fmt: skip

    base, cur = index(baseline), index(current)
    entries = []
    for key in base.keys() & cur.keys():
        b, c = base[key], cur[key]
        allowed = float(b["fid_std"]) + float(c["fid_std"])
        worse = float(c["fid_mean"]) - float(b["fid_mean"])
        entries.append({"key": key, "baseline": b["fid_mean"], "current": c["fid_mean"], "regressed": worse > allowed})
    return sorted(entries, key=lambda e: (str(e["key"][1]), str(e["key"][0])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="results JSON (or directory) to compare against")
    parser.add_argument("--current", required=True, help="results JSON or directory of a new run")
    parser.add_argument("--max-drop", type=float, default=0.15, help="largest allowed relative speedup drop")
    args = parser.parse_args(argv)
    if not 0.0 <= args.max_drop < 1.0:
        parser.error(f"--max-drop must be in [0, 1), got {args.max_drop}")
    try:
        baseline, current = load_rows(args.baseline), load_rows(args.current)
    except UnreadableResults as exc:
        print(f"bench.regress: {exc}", file=sys.stderr)
        return 2
    report = compare(baseline, current, args.max_drop)
    print(format_report(report, args.max_drop))
    quality = compare_quality(baseline, current)
    for entry in quality:
        status = "REGRESSION (beyond the seed spread)" if entry["regressed"] else "ok"
        print(f"quality {entry['key'][0]} @ {entry['key'][1]} steps: FID {entry['baseline']:.2f} -> "
              f"{entry['current']:.2f}  {status}")  # fmt: skip
    return 1 if report["regressions"] or any(e["regressed"] for e in quality) else 0


if __name__ == "__main__":
    raise SystemExit(main())
