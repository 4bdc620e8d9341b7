#!/usr/bin/env bash
# Step 1 of gpu-check.sh: install the carried wheels (.whl/) the image lacks into a --target dir, load the carried
# prebuilt prunedm._C (.gpu/), build on the device only when it is missing, stale or fails to load.
#   usage: setup.sh WORK_DIR [--dry-run]   (writes WORK_DIR/env.sh, which later steps source, and setup.json)
#   GPU_CHECK_WHEELS_DIR / GPU_CHECK_PREBUILT_DIR: other folders than .whl and .gpu (tests use them).
# A dry run changes nothing in the tree: it reports what it would copy or build and checks what is importable.
set -uo pipefail
work=$1
dry=${2:-}
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
mkdir -p "$work"
wheels=${GPU_CHECK_WHEELS_DIR:-.whl}
prebuilt=${GPU_CHECK_PREBUILT_DIR:-.gpu}
say() { echo "setup: $*"; }

# Wheels: on the device all of them (make gpu-prebuild carries only what the image lacks or has too old); on a
# dry run only those whose distribution is missing, so a dev venv's own versions stay in charge.
site="$work/site"
installed=()
if compgen -G "$wheels/*.whl" > /dev/null; then
  missing=()
  for wheel in "$wheels"/*.whl; do
    dist=$(basename "$wheel" | cut -d- -f1)
    if [ "$dry" = --dry-run ] && "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2> /dev/null; then
      continue
    fi
    missing+=("$wheel")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${missing[@]}" \
      && installed=("${missing[@]}") || say "pip could not install the carried wheels"
  fi
  say "${#installed[@]} carried wheel(s) installed, $(( $(ls "$wheels"/*.whl | wc -l) - ${#installed[@]} )) already present"
else
  say "no $wheels/ carried: diffusers and torch-pruning must already be importable"
fi
pythonpath="$root${installed:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$pythonpath"

# prunedm's package_dir mapping (kernels/, bench/, csrc/) for a tree that is not pip-installed. Asked of the
# metadata, not by importing prunedm: every torch import costs seconds.
if [ ! -e prunedm/kernels ] && ! "$PYTHON" -c "import importlib.metadata as m; m.version('prunedm')" 2> /dev/null; then
  if [ "$dry" = --dry-run ]; then
    say "would link prunedm/kernels, prunedm/bench, prunedm/_csrc (dry run: left alone)"
  else
    ln -sfn ../kernels prunedm/kernels && ln -sfn ../bench prunedm/bench && ln -sfn ../csrc prunedm/_csrc
  fi
fi

ext_suffix=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
carried="$prebuilt/_C$ext_suffix"
source="none"
# Loads _C, checks its ops registered, and writes what prunedm can run here (one torch import for both).
loads() { "$PYTHON" -c "
import json, sys, torch
from prunedm import _C
assert hasattr(torch.ops.prunedm, 'sparse_linear_2to4'), 'ops not registered'
import prunedm
with open(sys.argv[1], 'w') as f:
    json.dump(prunedm.extension_info(), f)
print('prunedm._C loads: WITH_CUDA =', _C.WITH_CUDA)" "$work/extension-info.json" 2>&1; }
if [ -f "$carried" ]; then
  built=$("$PYTHON" -c "import json; print(json.load(open('$prebuilt/BUILD.json'))['csrc_sha256'])" 2> /dev/null)
  now=$("$PYTHON" scripts/gpu_check/source_hash.py "$root")
  if [ "$built" != "$now" ]; then
    say "carried $carried was built from another csrc/ (BUILD.json $built, tree $now): not used"
  elif [ "$dry" = --dry-run ]; then
    say "would copy $carried into prunedm/ (dry run: left alone)"
  else
    cp -f "$carried" "prunedm/_C$ext_suffix" && source="carried"
  fi
elif compgen -G "$prebuilt/_C*.so" > /dev/null; then
  say "carried $(ls "$prebuilt"/_C*.so | head -1) is for another Python (this one wants _C$ext_suffix): not used"
fi
if out=$(loads); then
  [ "$source" = carried ] || source="present"
  say "$out ($source)"
elif [ "$dry" = --dry-run ]; then
  say "prunedm._C does not load here; would build it (dry run: skipped): $(echo "$out" | tail -1)"
  source="missing"
else
  say "prunedm._C does not load ($(echo "$out" | tail -1)): building on the device"
  arch=$("$PYTHON" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")
  start=$(date +%s)
  if MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$arch" "$PYTHON" setup.py -q build_ext --inplace > "$work/build.log" 2>&1 \
    && out=$(loads); then
    source="built on device in $(( $(date +%s) - start )) s for sm_$arch"
    say "$out ($source)"
  else
    source="failed"
    say "build failed: $(tail -3 "$work/build.log")"
  fi
fi

printf 'export PYTHONPATH=%q\n' "$pythonpath" > "$work/env.sh"
info='{}'
if [ -s "$work/extension-info.json" ]; then
  info=$(cat "$work/extension-info.json")
elif ! info=$("$PYTHON" -c "import json, prunedm; print(json.dumps(prunedm.extension_info()))" 2> "$work/import.err"); then
  say "import prunedm fails: $(tail -1 "$work/import.err")"
  info='{}'
fi
"$PYTHON" - "$work/setup.json" "$source" "$info" "${installed[@]}" << 'EOF'
import importlib.util, json, os, sys
# prunedm/_atomic.py by path: stdlib only, so it works even when `import prunedm` does not.
spec = importlib.util.spec_from_file_location("_atomic", "prunedm/_atomic.py")
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
path, source, info, wheels = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
data = {"extension": source, "wheels_installed": [os.path.basename(w) for w in wheels], "extension_info": info}
atomic.write_text_atomic(path, json.dumps(data, indent=1) + "\n")
EOF
case "$source" in failed) exit 1 ;; esac
[ "$info" != '{}' ]
