"""Efficiency of the mma.sp kernels read from their SASS, no GPU needed: `python -m bench.sass`.

Compiles the kernels of csrc/cuda/sparse_gemm_kernel.cuh to cubins with nvcc (sm_80 and sm_90a by default)
through csrc/cuda/nvrtc_entry.cu, the torch-free translation unit that instantiates the same four kernels
the extension's sparse_mm.cu / sparse_conv.cu launch, with the extension's nvcc flags (setup.py's plus
torch's half/bf16 defines), so a compile takes seconds instead of a torch build. Then, per kernel and arch,
from cuobjdump and ptxas: registers, spill bytes, local memory, shared memory, and the hottest loop: the
innermost loop (backward branch target .. branch) holding HMMA.SP, with its instructions that are not
HMMA.SP per HMMA.SP (static count; forward branches inside the loop are counted as if taken through).
Writes DIR/NAME.json and DIR/NAME.md (default bench/results/sass/sass.*)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "csrc" / "cuda" / "nvrtc_entry.cu"
INCLUDE = REPO / "csrc" / "include"
# setup.py's nvcc flags for the extension, and the defines torch.utils.cpp_extension adds
# (COMMON_NVCC_FLAGS) to every CUDA source of an extension.
SETUP_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
ARCHS = ("sm_80", "sm_90a")

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RES = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH or the CUDA toolkit, else the one triton's wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    if nvcc:
        beside = Path(os.path.realpath(nvcc)).parent / "cuobjdump"
        if beside.is_file():
            return str(beside)
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.is_file() else None


# -- parsers (pure text in, dicts out: tests/test_bench_sass.py runs them on a checked-in snippet) -----------


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass output -> {function: [(address, instruction text without the ';')]}."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        instr = _INSTR.match(line)
        if instr and current is not None:
            current.append((int(instr.group(1), 16), instr.group(2)))
    return functions


def opcode(text: str) -> str:
    """The opcode of an instruction ('@!P0 BRA 0x10' -> 'BRA')."""
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def branch_target(text: str) -> int | None:
    """The target address of a BRA (its last hex operand), else None."""
    if opcode(text).split(".")[0] != "BRA":
        return None
    targets = re.findall(r"0x([0-9a-f]+)", text)
    return int(targets[-1], 16) if targets else None


def hottest_loop(instrs: list[tuple[int, str]]) -> dict | None:
    """The innermost loop holding HMMA.SP: its address range, size, HMMA.SP count, other instructions per
    HMMA.SP and its most frequent other opcodes; None when no loop holds one."""
    loops = []
    for address, text in instrs:
        target = branch_target(text)
        if target is not None and target <= address:
            body = [(a, t) for a, t in instrs if target <= a <= address]
            hmma = sum(opcode(t).startswith("HMMA.SP") for _, t in body)
            if hmma:
                loops.append((len(body), target, address, hmma, body))
    if not loops:
        return None
    size, start, end, hmma, body = min(loops, key=lambda loop: loop[0])
    others = Counter(opcode(t).split(".")[0] for _, t in body if not opcode(t).startswith("HMMA.SP"))
    return {
        "start": hex(start),
        "end": hex(end),
        "instructions": size,
        "hmma_sp": hmma,
        "other_per_hmma_sp": round((size - hmma) / hmma, 2),
        "calls": others.get("CALL", 0),
        "top_other_opcodes": dict(others.most_common(12)),
    }


def _per_function(text: str, header: re.Pattern, fields_of) -> dict[str, dict[str, int]]:
    """{function: fields_of(line)} for the first line after each header line (group 1: the function) where
    fields_of returns a dict."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        match = header.search(line)
        if match:
            current = match.group(1)
        elif current and (fields := fields_of(line)) is not None:
            out[current], current = fields, None
    return out


def _resources(line: str) -> dict[str, int] | None:
    if "REG:" not in line:
        return None
    fields = dict(re.findall(r"([A-Z_\[\]0-9]+):(\d+)", line))
    return {name: int(fields.get(key, 0)) for name, key in
            (("registers", "REG"), ("stack", "STACK"), ("shared", "SHARED"), ("local", "LOCAL"))}  # fmt: skip


def _spills(line: str) -> dict[str, int] | None:
    match = _SPILLS.search(line)
    return None if match is None else {"spill_stores": int(match.group(2)), "spill_loads": int(match.group(3))}


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage -> {function: {'registers', 'stack', 'shared', 'local'}}."""
    return _per_function(text, _RES, _resources)


def parse_ptxas_spills(text: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {function: {'spill_stores', 'spill_loads'}} (bytes)."""
    return _per_function(text, _PTXAS_ENTRY, _spills)


def kernel_label(mangled: str) -> str:
    """'_ZN7prunedm16sparse_gemm_cuda18sparse_gemm_kernelI6__halfLb1ELb0E...' -> 'sparse_gemm_kernel<fp16, conv>';
    the bool template arguments in order: conv / linear, then split-k when set; none for the reduction."""
    name, rest = mangled, mangled.removeprefix("_ZN")
    while (length := re.match(r"\d+", rest)) is not None:  # the length-prefixed nested names
        start = length.end()
        name, rest = rest[start : start + int(length.group())], rest[start + int(length.group()) :]
    dtype = "bf16" if "bfloat16" in mangled else "fp16" if "__half" in mangled else "?"
    flags = re.findall(r"Lb([01])E", mangled)
    parts = [dtype] + [("linear", "conv")[int(f)] for f in flags[:1]] + ["split-k" for f in flags[1:2] if f == "1"]
    return f"{name}<{', '.join(parts)}>"


def analyze(sass: str, res_usage: str, ptxas_log: str, arch: str) -> list[dict]:
    """One row per kernel function of one arch's cubin."""
    resources, spills = parse_res_usage(res_usage), parse_ptxas_spills(ptxas_log)
    rows = []
    for name, instrs in sorted(parse_sass(sass).items()):
        row = {"arch": arch, "kernel": kernel_label(name), "function": name, "sass_instructions": len(instrs)}
        row.update(resources.get(name, {}))
        row.update(spills.get(name, {}))
        row["hottest_loop"] = hottest_loop(instrs)
        rows.append(row)
    return rows


# -- compiling ---------------------------------------------------------------------------------------------


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release [\d.]+, (V[\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def compile_cubin(nvcc: str, arch: str, out_dir: Path, source: Path = ENTRY) -> tuple[Path, str]:
    """nvcc -cubin of the kernels for one arch; returns the cubin and ptxas's -v log."""
    cubin = out_dir / f"kernels-{arch}.cubin"
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-std=c++17", *SETUP_NVCC_FLAGS, *TORCH_NVCC_DEFINES]
    cmd += ["-DPRUNEDM_NVRTC=1", f"-I{INCLUDE}", "-Xptxas", "-v", str(source), "-o", str(cubin)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{done.stderr[-4000:]}")
    return cubin, done.stderr


def measure(archs=ARCHS, nvcc: str | None = None, cuobjdump: str | None = None) -> tuple[dict, list[dict]]:
    """Compile and analyze each arch: (environment, rows)."""
    nvcc = nvcc or shutil.which("nvcc")
    cuobjdump = cuobjdump or find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError("bench.sass needs nvcc and cuobjdump (PATH, the CUDA toolkit or triton's wheel)")
    from .common import git_commit

    env = {
        "nvcc": nvcc_version(nvcc),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(ENTRY.relative_to(REPO)),
        "flags": SETUP_NVCC_FLAGS + TORCH_NVCC_DEFINES,
    }
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="prunedm-sass-") as tmp:
        for arch in archs:
            cubin, log = compile_cubin(nvcc, arch, Path(tmp))
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True)
            res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True)
            rows += analyze(sass.stdout, res.stdout, log, arch)
    return env, rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        "# mma.sp kernels read from SASS (`python -m bench.sass`)",
        "",
        f"nvcc {env['nvcc']}, commit {env['commit']}, {env['date']}; `{env['source']}` with "
        f"`{' '.join(env['flags'])}`.",
        "",
        "Hot loop: the innermost loop holding HMMA.SP (static instructions from the backward branch's target "
        "to the branch). Other/HMMA.SP: its instructions that are not HMMA.SP per HMMA.SP.",
        "",
        "| arch | kernel | regs | spill st/ld B | local B | smem B | loop instr | HMMA.SP | other/HMMA.SP | calls |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loop = r["hottest_loop"] or {}
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {r.get('registers', '?')} | {r.get('spill_stores', '?')}/"
            f"{r.get('spill_loads', '?')} | {r.get('local', '?')} | {r.get('shared', '?')} | "
            f"{loop.get('instructions', '-')} | {loop.get('hmma_sp', '-')} | {loop.get('other_per_hmma_sp', '-')} | "
            f"{loop.get('calls', '-')} |"
        )
    lines += ["", "Most frequent other opcodes in each hot loop:", ""]
    for r in rows:
        loop = r["hottest_loop"] or {}
        top = ", ".join(f"{k} {v}" for k, v in loop.get("top_other_opcodes", {}).items())
        lines.append(f"- {r['arch']} {r['kernel']}: {top or '-'}")
    return "\n".join(lines) + "\n"


def write(out_dir: str | os.PathLike, name: str, env: dict, rows: list[dict]) -> tuple[Path, Path]:
    from prunedm._atomic import write_text_atomic

    out = Path(out_dir)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    write_text_atomic(json_path, json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    write_text_atomic(md_path, markdown(env, rows))
    return json_path, md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help=f"nvcc -arch (repeatable; default {', '.join(ARCHS)})")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sass"), help="output folder")
    parser.add_argument("--name", default="sass", help="file name stem of the JSON and markdown")
    args = parser.parse_args(argv)
    for arch in args.arch or []:
        if not re.fullmatch(r"sm_\d+[a-z]?", arch):
            parser.error(f"--arch: expected an nvcc arch like sm_80 or sm_90a, got {arch!r}")
    try:
        env, rows = measure(tuple(args.arch or ARCHS))
    except RuntimeError as err:
        print(f"bench.sass: {err}", file=sys.stderr)
        return 2
    json_path, md_path = write(args.out, args.name, env, rows)
    print(markdown(env, rows))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
