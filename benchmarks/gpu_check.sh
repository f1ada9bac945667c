#!/usr/bin/env bash
# The GPU check of fastcon's Triton path, in one run of about 8 minutes on one H100 / H200:
#
#   bash benchmarks/gpu_check.sh              # from the repository root; nothing is installed
#   bash benchmarks/gpu_check.sh --dry-run    # print the steps and their time limits only
#
# Steps (each under its own time limit; one that fails or runs out of time does not stop the
# others, and its log says how far it got):
#   1. pytest -m gpu tests/test_triton_gpu.py (CUDA graph and torch.compile tests first);
#   2. the interleaved speed sweep (benchmarks/interleaved_sweep.py): SupCon, SCHaNe, focal;
#      bf16 and fp32; D = 128; N = 256 ... 65536; Triton eager, Triton in a CUDA graph, the
#      dense reference and torch.compile of it;
#   3. the profile of one call (benchmarks/profile_calls.py): SupCon bf16 at N = 1024 and 8192,
#      kernels per call, GPU busy vs wall time, host synchronisations;
#   4. the A/B of the statistics kernel's plain loop (benchmarks/stats_pair_ab.py): as shipped
#      against two tiles per iteration with the second product in flight during the softmax.
# Output in benchmarks/results/gpu/ (GPU_CHECK_OUT), every file named after the device:
#   gpu_check_<gpu>.md (summary), speed_<gpu>.{csv,md}, profile_<gpu>.{csv,md},
#   stats_pair_ab_<gpu>.{csv,md}, <gpu>_<step>.log.
# Time limits (seconds) can be changed: GPU_CHECK_PYTEST_S, GPU_CHECK_SWEEP_S, GPU_CHECK_PROFILE_S,
# GPU_CHECK_AB_S.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
PYTEST_S=${GPU_CHECK_PYTEST_S:-140}
SWEEP_S=${GPU_CHECK_SWEEP_S:-190}
PROFILE_S=${GPU_CHECK_PROFILE_S:-45}
AB_S=${GPU_CHECK_AB_S:-75}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# The sweep stops its own work a little before its time limit, so that it writes its files.
SWEEP_BUDGET=$((SWEEP_S - 25))
STEPS=(
  "pytest|$PYTEST_S|$PYTHON -m pytest -m gpu tests/test_triton_gpu.py -v -rfE -p no:cacheprovider"
  "sweep|$SWEEP_S|$PYTHON benchmarks/interleaved_sweep.py --device cuda --budget-s $SWEEP_BUDGET --out $OUT"
  "profile|$PROFILE_S|$PYTHON benchmarks/profile_calls.py --device cuda --sizes 1024 8192 --out $OUT"
  "stats-ab|$AB_S|$PYTHON benchmarks/stats_pair_ab.py --rounds 2 --reps 10 --out $OUT"
)

if [[ "${1:-}" == "--dry-run" ]]; then
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$s"
    echo "$name (limit ${limit} s): $cmd"
  done
  exit 0
fi

if ! gpu=$($PYTHON -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())' 2>/dev/null); then
  echo "gpu_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False)" >&2
  exit 2
fi
slug=$(printf '%s' "$gpu" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//' | tr 'A-Z' 'a-z')
mkdir -p "$OUT"
summary="$OUT/gpu_check_${slug}.md"
versions=$($PYTHON -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")' 2>&1 || true)
{
  echo "# GPU check: $gpu"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $versions, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | exit status | seconds | log |"
  echo "|---|---|---|---|"
} > "$summary"

failed=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  log="$OUT/${slug}_${name}.log"
  echo "== $name (limit ${limit} s): $cmd"
  start=$(date +%s)
  set +e
  # shellcheck disable=SC2086  # the command is split into words on purpose
  timeout --kill-after=10 "$limit" $cmd > "$log" 2>&1
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  status=$rc
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="$rc (time limit)"; fi
  if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); fi
  echo "| $name | $status | $took | $(basename "$log") |" >> "$summary"
  tail -n 3 "$log"
done

{
  echo
  echo "## pytest"
  echo
  echo '```'
  grep -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)|^(FAILED|ERROR) |passed|failed" "$OUT/${slug}_pytest.log" | tail -n 80 || true
  echo '```'
  for part in speed profile stats_pair_ab; do
    if [[ -f "$OUT/${part}_${slug}.md" ]]; then
      echo
      sed 's/^# /## /' "$OUT/${part}_${slug}.md"
    fi
  done
} >> "$summary"
echo "wrote $summary ($failed step(s) failed)"
exit $(( failed > 0 ))
