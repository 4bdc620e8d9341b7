#!/usr/bin/env bash
# prunedm's GPU checks as one budgeted run (docs/GPU.md): steps ordered by truth per device-second, each in its
# own process under `timeout`, given min(its budget, time left), skipped with a log line when it will not fit.
# Results go to --out (default $OUT or ./gpu-out) as they come: at most 8 files, the rest in details.tar.gz.
#   usage: bash scripts/gpu-check.sh [--budget S] [--out DIR] [--only STEP,...] [--dry-run]
#   --dry-run: on a CPU machine, every step's logic with the CPU and reference kernels standing in (tiny shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# step:budget_s:min_s. Budgets sum to 450 s; a step starts only with at least min_s left.
PLAN=(env:15:3 setup:55:5 correctness:80:15 pytest:95:20 sanitizer:60:15 timing:80:15 e2e:60:20)
RESERVE_S=5  # the last summary and tarball, after the last step
# A CPU machine shared with other work may run a dry run several times slower: GPU_CHECK_TIME_SCALE=N multiplies
# the budget and every step's share (the plan printed stays the real one).
scale=${GPU_CHECK_TIME_SCALE:-1}
[[ "$scale" =~ ^[1-9]$ ]] || { echo "gpu-check.sh: GPU_CHECK_TIME_SCALE must be a whole number in [1, 9], got '$scale'" >&2; exit 2; }

die() { echo "gpu-check.sh: $*" >&2; exit 2; }
budget=450 out="${OUT:-$ROOT/gpu-out}" dry="" only=""
value() { [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]]; }  # an option's value: present, not the next option
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) value "$@" || die "--budget needs a number of seconds"; budget=$2; shift 2 ;;
    --out) value "$@" || die "--out needs a directory"; out=$2; shift 2 ;;
    --only) value "$@" || die "--only needs a comma-separated list of steps"; only=$2; shift 2 ;;
    --dry-run) dry=--dry-run; shift ;;
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (expected --budget S, --out DIR, --only STEP,..., --dry-run)" ;;
  esac
done
[[ "$budget" =~ ^[0-9]+$ ]] && [ "$budget" -ge 10 ] && [ "$budget" -le 3600 ] \
  || die "--budget must be a whole number of seconds in [10, 3600], got '$budget'"
names=$(for s in "${PLAN[@]}"; do printf '%s ' "${s%%:*}"; done)
for step in ${only//,/ }; do
  [[ " $names" == *" $step "* ]] || die "--only: unknown step '$step' (steps: $names)"
done
if [ -e "$out" ] && [ ! -d "$out" ]; then die "--out $out exists and is not a directory"; fi

# The hard self-timeout: whatever a step does, the whole run ends by budget + 15 s.
if [ -z "${PRUNEDM_GPU_CHECK_INNER:-}" ]; then
  PRUNEDM_GPU_CHECK_INNER=1 exec timeout -k 5 $((budget * scale + 15)) bash "$0" --budget "$budget" --out "$out" \
    ${only:+--only "$only"} $dry
fi

mkdir -p "$out" || die "cannot create --out $out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/prunedm-gpu-check.XXXXXX")
export out work dry PYTHON
# prunedm's caches (NVRTC images, auto's timings) start empty and stay out of the user's ~/.cache: the sanitizer
# step reuses the kernels the correctness step compiled, and a dry run leaves nothing behind.
export PRUNEDM_CACHE_DIR="$work/cache"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
deadline=$((start + budget * scale - RESERVE_S))
log="$out/gpu-check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
printf 'step\tstatus\tseconds\tbudget_s\tgiven_s\tnote\n' > "$work/steps.tsv"

say "gpu-check: budget ${budget} s${dry:+ (dry run)}, results in $out"
say "plan (step, budget s):"
total=0
for s in "${PLAN[@]}"; do
  IFS=: read -r name cap _ <<< "$s"
  total=$((total + cap))
  say "  $(printf '%-12s %4d' "$name" "$cap")"
done
say "  $(printf '%-12s %4d' total "$total") (+${RESERVE_S} s summary)"
[ "$scale" = 1 ] || say "  (GPU_CHECK_TIME_SCALE=$scale: every share x$scale on this slow machine)"

pack() {  # summary.json and details.tar.gz, refreshed after every step so a cut-short run returns what it found
  "$PYTHON" scripts/gpu_check/summary.py "$work" "$out" $dry >> "$log" 2>&1
  local tmp="$out/.details.tar.gz.prunedm-tmp-$$"
  tar -czf "$tmp" -C "$work" --exclude=./setup/site --exclude=./cache . 2>> "$log" && mv -f "$tmp" "$out/details.tar.gz"
}

run_step() {  # run_step NAME CAP MIN COMMAND...: the command gets its share as $SHARE (seconds, minus a margin)
  local name=$1 planned=$2 cap=$(($2 * scale)) min=$(($3 * scale)); shift 3
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
    printf '%s\tskipped\t0\t%s\t0\tnot in --only\n' "$name" "$planned" >> "$work/steps.tsv"; return
  fi
  local left=$((deadline - $(date +%s)))
  local give=$((cap < left ? cap : left))
  if [ "$give" -lt "$min" ]; then
    say "== $name: skipped, needs ${min} s and ${left} s are left"
    printf '%s\tskipped\t0\t%s\t0\tneeds %s s, %s s left\n' "$name" "$planned" "$min" "$left" >> "$work/steps.tsv"
    return
  fi
  say "== $name (${give} s of ${left} s left)"
  export SHARE=$((give > 6 ? give - 3 : give))
  local t0; t0=$(date +%s)
  # In a child bash that knows the step functions: `timeout` runs programs, not functions.
  timeout -k 3 "$give" bash -c "$(declare -f py_step step_pytest step_sanitizer); \"\$@\"" _ "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0)) status=ok
  case $rc in 0) ;; 124 | 137) status=timeout ;; *) status="failed (exit $rc)" ;; esac
  say "== $name: $status in ${took} s"
  printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$took" "$planned" "$give" >> "$work/steps.tsv"
  pack
}

step_pytest() {
  mkdir -p "$work/pytest"
  local args=(-m cuda -q -p no:cacheprovider --tb=short -o junit_family=xunit2 --junitxml="$out/pytest-cuda.xml")
  "$PYTHON" -c "import xdist" 2> /dev/null && args+=(-n "$([ -n "$dry" ] && echo 2 || echo 8)")
  local plugin; plugin=$("$PYTHON" -c "import pytest_timeout; print(pytest_timeout.__file__)" 2> /dev/null)
  if [ -n "$plugin" ]; then
    args+=(--timeout 60)
    # Ending the session itself before the step's timeout lets pytest still write the junit XML.
    grep -q session_timeout "$plugin" && args+=(--session-timeout $((SHARE > 20 ? SHARE - 10 : SHARE)))
  fi
  # A dry run collects one GPU test module (its tests skip on CPU): the whole suite's collection would not fit.
  [ -n "$dry" ] && args+=(tests/ops/test_cuda_ops.py)
  # The full output (tracebacks) goes to the tarball; the log gets its summary.
  "$PYTHON" -m pytest "${args[@]}" > "$work/pytest/pytest.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR) |passed|failed|skipped|error" "$work/pytest/pytest.log" | tail -60
  [ $rc -eq 5 ] && return 0  # no test selected is not a failure of the run
  return $rc
}

step_sanitizer() {
  mkdir -p "$work/sanitizer"
  local calls=(scripts/gpu_check/sanitize_calls.py --out "$work/sanitizer" $dry)
  if ! command -v compute-sanitizer > /dev/null; then
    echo "compute-sanitizer not found: the calls run unsanitized${dry:+ (dry run)}"
    "$PYTHON" "${calls[@]}"; return
  fi
  local tools=(memcheck racecheck initcheck) status=0 i=0
  local end=$(($(date +%s) + SHARE))
  for tool in "${tools[@]}"; do
    local left=$((end - $(date +%s))) tools_left=$((${#tools[@]} - i))
    local slot=$((left / tools_left)); i=$((i + 1))
    if [ "$slot" -lt 5 ]; then echo "$tool: skipped, ${left} s left"; printf '%s\tskipped\t\n' "$tool" >> "$work/sanitizer/result.tsv"; continue; fi
    local extra=()
    [ "$tool" = initcheck ] && extra=(--track-unused-memory no)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 2 "$slot" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --print-limit 30 "${extra[@]}" --log-file "$work/sanitizer/$tool.log" "$PYTHON" "${calls[@]}"
    local rc=$?
    local errors; errors=$(grep -h "ERROR SUMMARY" "$work/sanitizer/$tool.log" 2> /dev/null | tail -1)
    echo "$tool: exit $rc ${errors:-no summary}"
    printf '%s\t%s\t%s\n' "$tool" "$rc" "$errors" >> "$work/sanitizer/result.tsv"
    [ $rc -eq 0 ] || status=1
  done
  return $status
}

py_step() {  # a Python step under scripts/gpu_check: its share, its work dir, the dry-run flag
  local script=$1 name=$2
  mkdir -p "$work/$name"
  "$PYTHON" "scripts/gpu_check/$script" --out "$out" --work "$work/$name" --seconds "$SHARE" $dry
}

for s in "${PLAN[@]}"; do
  IFS=: read -r name cap min <<< "$s"
  # The setup step's PYTHONPATH (carried wheels, the tree) holds for every step after it.
  [ -f "$work/setup/env.sh" ] && . "$work/setup/env.sh"
  case $name in
    env) run_step env "$cap" "$min" py_step env_info.py env ;;
    setup) run_step setup "$cap" "$min" bash scripts/gpu_check/setup.sh "$work/setup" $dry ;;
    correctness) run_step correctness "$cap" "$min" py_step correctness.py correctness ;;
    pytest) run_step pytest "$cap" "$min" step_pytest ;;
    sanitizer) run_step sanitizer "$cap" "$min" step_sanitizer ;;
    timing) run_step timing "$cap" "$min" py_step timing.py timing ;;
    e2e) run_step e2e "$cap" "$min" py_step end_to_end.py e2e ;;
  esac
done
say "gpu-check: done in $(($(date +%s) - start)) s"
pack
find "$out" -maxdepth 1 -name '.*.prunedm-tmp-*' -delete
# Exit status: 0 when no step failed or timed out (skips are not failures).
! cut -f2 "$work/steps.tsv" | grep -qE '^(failed|timeout)'
