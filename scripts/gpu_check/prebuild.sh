#!/usr/bin/env bash
# Builds, on a CPU machine, what a GPU run carries (docs/GPU.md): prunedm._C for the device image (Python 3.12,
# torch 2.11.0+cu130; sm_80 + sm_90a + compute_80 PTX) into .gpu/, and the pure-Python wheels it lacks into .whl/.
#   usage: scripts/gpu_check/prebuild.sh      (make gpu-prebuild; knobs: GPU_PYTHON, GPU_TORCH, MAX_JOBS, GPU_WHEELS)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# pyenv's shim refuses versions the local .python-version does not name: take the interpreter itself.
GPU_PYTHON=${GPU_PYTHON:-$(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
GPU_PYTHON=${GPU_PYTHON:-$(command -v python3.12 || true)}
GPU_TORCH=${GPU_TORCH:-torch==2.11.0}
GPU_ARCHS=${GPU_ARCHS:-8.0+PTX;9.0a}
# diffusers with its dependencies, torch-pruning and clean-fid without theirs (torch, torchvision: the image's).
GPU_WHEELS=${GPU_WHEELS:-diffusers==0.42.1}
GPU_WHEELS_NO_DEPS=${GPU_WHEELS_NO_DEPS:-torch-pruning==1.6.1 clean-fid==0.1.35}
# What the image has (docs/GPU.md): never carried, so the image's numpy, Pillow and torch's own deps stay in charge.
IMAGE_HAS=" numpy scipy scikit_learn matplotlib pillow contourpy cycler fonttools kiwisolver pyparsing python_dateutil
six packaging pytest pluggy iniconfig pyyaml tqdm ninja pybind11 torch triton filelock typing_extensions sympy mpmath
networkx jinja2 markupsafe fsspec setuptools "
venv=$root/.gpu-venv
src=/tmp/prunedm-gpu-src
[ -n "$GPU_PYTHON" ] || { echo "gpu-prebuild: no python3.12 found; set GPU_PYTHON=/path/to/python3.12" >&2; exit 2; }

# A scratch venv that mirrors the image's torch, so the extension's ABI matches the device's.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${GPU_TORCH#torch==}')" 2>/dev/null; then
  "$GPU_PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q "$GPU_TORCH" numpy ninja pybind11 setuptools wheel
fi
# What the image has besides torch, so the import check below sees what the device will.
"$venv/bin/python" -c "import PIL, packaging, yaml, tqdm" 2> /dev/null || "$venv/bin/pip" install -q pillow packaging pyyaml tqdm

# Build from a copy of the working tree (tracked + untracked, not ignored files), never in the checkout:
# other builds and the .so the checkout's venv loads stay untouched.
# The copy keeps its build/ (and tar keeps mtimes), so ninja recompiles only what changed since the last run.
mkdir -p "$src"
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$src"
cd "$src"
rm -f prunedm/_C*.so
# torch's build finds ninja on PATH.
export PATH="$venv/bin:$PATH" TORCH_CUDA_ARCH_LIST="$GPU_ARCHS" MAX_JOBS="${MAX_JOBS:-1}" PRUNEDM_REQUIRE_CUDA_BUILD=1
start=$(date +%s)
"$venv/bin/python" setup.py -q build_ext --inplace
build_s=$(( $(date +%s) - start ))
cd "$root"

so=$(ls "$src"/prunedm/_C*.so)
# The temporaries live in .gpu/ itself, so the rename into place never crosses a filesystem.
mkdir -p .gpu
find .gpu -name '.*.prunedm-tmp-*' -delete
tmp=".gpu/.$(basename "$so").prunedm-tmp-$$"
cp "$so" "$tmp" && strip --strip-debug "$tmp" && mv -f "$tmp" ".gpu/$(basename "$so")"
# The commit and a hash of the csrc/ built (the copy's): gpu-check.sh reads them (the carried tree has no .git)
# and rebuilds on the device when they are stale.
"$venv/bin/python" - "$root" "$build_s" "$(python3 scripts/gpu_check/source_hash.py "$src")" <<'EOF'
import json, os, subprocess, sys, torch
root, build_s, csrc_sha256 = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def git(*args):
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True).stdout.strip()
info = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "csrc_sha256": csrc_sha256, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "python": "%d.%d" % sys.version_info[:2], "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
        "build_seconds": build_s, "so": sorted(f for f in os.listdir(os.path.join(root, ".gpu")) if f.endswith(".so"))}
tmp = os.path.join(root, ".gpu", ".BUILD.json.prunedm-tmp-%d" % os.getpid())
with open(tmp, "w") as f:
    json.dump(info, f, indent=1)
os.replace(tmp, os.path.join(root, ".gpu", "BUILD.json"))
print(json.dumps(info, indent=1))
EOF

# The wheels the image lacks, for Python 3.12 (the logic of ../shared/gpu/fetch-wheels.sh), resolved here.
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$download")
# shellcheck disable=SC2086
"$venv/bin/python" -m pip download -q "${platform[@]}" $GPU_WHEELS
# shellcheck disable=SC2086
"$venv/bin/python" -m pip download -q --no-deps "${platform[@]}" $GPU_WHEELS_NO_DEPS
mkdir -p .whl
find .whl -maxdepth 1 -type f -name '*.whl' -delete
for wheel in "$download"/*.whl; do
  dist=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z-.' 'a-z__')
  [[ "$IMAGE_HAS" == *" $dist "* ]] || cp "$wheel" .whl/
done
ls .whl

# The check the device will do: the carried .so loads and registers its ops under Python 3.12 + torch 2.11,
# with the wheels installed the way gpu-check.sh installs them (no index, no deps, a --target dir).
site=$(mktemp -d)
trap 'rm -rf "$download" "$site"' EXIT
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
cp ".gpu/$(basename "$so")" "$src/prunedm/$(basename "$so")"
for pkg in kernels bench; do ln -sfn "../$pkg" "$src/prunedm/$pkg"; done
ln -sfn ../csrc "$src/prunedm/_csrc"
(cd "$src" && PYTHONPATH="$src:$site" "$venv/bin/python" -c "
import json, torch, prunedm, diffusers, torch_pruning
from prunedm import _C
ops = sorted(n for n in dir(torch.ops.prunedm) if not n.startswith('_'))
assert _C.WITH_CUDA and 'sparse_linear_2to4' in ops, ops
print(json.dumps({'torch': torch.__version__, 'diffusers': diffusers.__version__, 'with_cuda': _C.WITH_CUDA, 'ops': ops}))
")
du -ch .gpu/*.so .whl/*.whl | tail -1
total_kib=$(du -ck .gpu .whl | tail -1 | cut -f1)
[ "$total_kib" -le $((40 * 1024)) ] || { echo "gpu-prebuild: .gpu + .whl hold ${total_kib} KiB, over 40 MiB" >&2; exit 1; }
echo "gpu-prebuild: .gpu/ and .whl/ ready (${total_kib} KiB); carry them: [\".gpu\", \".whl\"]"
