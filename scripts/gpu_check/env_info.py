"""Step 0 of gpu-check.sh: the machine every number is measured on: GPU, driver, clocks, versions, commit.
The commit comes from files the carried tree has (.gpu/BUILD.json, .git/HEAD), never from running git."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess

import torch
from _common import ROOT, parse_args, write_json


def read_commit() -> dict:
    """The commit the tree was carried at: .gpu/BUILD.json (written by make gpu-prebuild), else .git's files."""
    import json

    found: dict = {}
    build = ROOT / ".gpu" / "BUILD.json"
    if build.is_file():
        info = json.loads(build.read_text())
        found.update(commit=info.get("commit"), dirty=info.get("dirty"), source=".gpu/BUILD.json")
    head = ROOT / ".git" / "HEAD"
    if not found.get("commit") and head.is_file():
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            name = ref[5:]
            loose = ROOT / ".git" / name
            if loose.is_file():
                found.update(commit=loose.read_text().strip(), source=f".git/{name}")
            elif (ROOT / ".git" / "packed-refs").is_file():
                for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + name):
                        found.update(commit=line.split()[0], source=".git/packed-refs")
        else:
            found.update(commit=ref, source=".git/HEAD")
    return found or {"commit": "unknown", "source": "no .gpu/BUILD.json or .git in the carried tree"}


def nvidia_smi(args) -> dict:
    """GPU name, driver, clocks, power and temperature as nvidia-smi reports them (the full -q text goes to work/)."""
    if shutil.which("nvidia-smi") is None:
        return {"available": False, "reason": "nvidia-smi not found"}
    fields = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,memory.total,compute_mode,persistence_mode")  # fmt: skip
    query = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True, text=True,
                           timeout=20)  # fmt: skip
    full = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20)
    (args.work / "nvidia-smi-q.txt").write_text(full.stdout + full.stderr)
    lines = query.stdout.strip().splitlines()
    if query.returncode or len(lines) < 2:
        return {"available": False, "reason": (query.stderr or query.stdout).strip()[:300]}
    names = [h.strip() for h in lines[0].split(",")]
    return {"available": True, "gpus": [dict(zip(names, (v.strip() for v in line.split(",")))) for line in lines[1:]]}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}  # fmt: skip
    # Installed versions from the metadata: importing diffusers alone takes seconds.
    for dist in ("triton", "cupy-cuda13x", "cupy-cuda12x", "diffusers", "torch-pruning", "numpy", "huggingface-hub"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    try:
        found["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    except AttributeError:
        found["cusparselt"] = None
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        found["nvcc"] = out.strip().splitlines()[-1] if out.strip() else None
    found["compute_sanitizer"] = shutil.which("compute-sanitizer")
    return found


def main() -> int:
    args = parse_args(__doc__)
    info = {"commit": read_commit(), "versions": versions(), "nvidia_smi": nvidia_smi(args), "dry_run": args.dry_run,
            "cpu": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                          "count": torch.cuda.device_count()}  # fmt: skip
    else:
        info["device"] = {"name": "cpu (dry run)" if args.dry_run else "none", "count": 0}
    write_json(args.out / "env.json", info)
    gpus = info["nvidia_smi"].get("gpus") or [{}]
    versions_ = info["versions"]
    print(f"env: {info['device']['name']}, driver {gpus[0].get('driver_version', 'n/a')}, torch "
          f"{versions_['torch']}, triton {versions_['triton']}, commit {info['commit']['commit']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
