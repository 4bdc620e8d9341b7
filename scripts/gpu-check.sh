#!/usr/bin/env bash
# Runs prunedm's GPU checks on a GPU machine (see ../shared/gpu/README.md): installs the wheels
# carried in .whl/, builds the extension against that machine's torch, runs the `cuda` tests and
# the GPU benchmarks, and leaves logs and results under $OUT (default: ./gpu-out).
#   usage: scripts/gpu-check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quick="${1:-}"
status=0

if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
arch=$(python3 -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")
start=$(date +%s)
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
# An image without `wheel` (or with an old setuptools) cannot build editable wheels: build in place then.
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
  ln -sfn ../kernels prunedm/kernels  # what package_dir maps when installed
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "build_seconds=$(( $(date +%s) - start ))" | tee "$OUT/build-time.txt"
python3 -c "import prunedm, json; print(json.dumps(prunedm.extension_info(), indent=1))" | tee "$OUT/extension-info.json"

python3 -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" 2>&1 | tee "$OUT/pytest-cuda.log" || status=1

if command -v compute-sanitizer > /dev/null && [ "$quick" != "--quick" ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
      tests/ops/test_cuda_ops.py tests/ops/test_cuda_sparse_mm.py -k "compress or decompress or nm_mask or linear or conv" \
      -x > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
    tail -3 "$OUT/sanitizer-$tool.log"
  done
fi

# bench.run: ops, layers (dense / torch / prunedm / auto) and whole models with plots; then the rest.
for bench in bench.run bench.gumbel bench.pruning; do
  if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$bench') is None)"; then
    python3 -m "$bench" --device cuda --out "$OUT/bench" ${quick:+--quick} 2>&1 | tee "$OUT/$bench.log" || status=1
  fi
done
exit $status
