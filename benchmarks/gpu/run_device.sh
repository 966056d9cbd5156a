#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call: build with CUDA, the CUDA tests,
# compute-sanitizer over every launcher, and the GPU benchmarks of the open targets.
# The device has torch, pybind11, scikit-build-core, cmake, ninja and nvcc but no network, so
# the build runs without isolation.
#
# A lease is short (15 minutes of device time in all, one command at most 10) and only 8 files
# come back from $OUT, so: every step runs under its own timeout (a hung step cannot starve the
# ones after it), the key lines go to $OUT/summary.txt as they happen, and the full logs and
# result files are re-packed into $OUT/logs.tgz after every step (a command killed at its limit
# still returns what had finished).
# QUICK=1 (a short lease): the benchmarks of the open targets come before the sanitizers;
# no full test suite, racecheck or profile.
set -uo pipefail
out=${OUT:-gpu-out}
work=${WORK:-/tmp/fastmerge-gpu}
mkdir -p "$out" "$work"
summary="$out/summary.txt"
export FASTMERGE_CUDA=ON FASTMERGE_CUDA_ARCHS=${FASTMERGE_CUDA_ARCHS:-90} PYTHONUNBUFFERED=1
started=$SECONDS

note() { echo "$*" | tee -a "$summary"; }
pack() { tar -czf "$out/logs.tgz" -C "$work" . 2>/dev/null; }
# step NAME SECONDS COMMAND...: run COMMAND with its output in $work/NAME.log, then record
# its exit status (124: timed out) and the lines matching $keep in the summary.
keep='passed|failed|error|Error|Fatal|FAILED|ERROR SUMMARY|speed-up|copy bandwidth|x[0-9]+ +[0-9]+ \|'
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  note "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s; $((SECONDS - started)) s in all)"
  grep -E "$keep" "$work/$name.log" | tail -25 | tee -a "$summary"
  pack
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$summary"
step build 300 python3 -m pip install --no-build-isolation --no-deps -q . || {
  tail -40 "$work/build.log" | tee -a "$summary"; exit 1; }
(cd /tmp && python3 -c "import fastmerge, json; print(json.dumps(fastmerge.build_info()))") \
  2>&1 | tee -a "$summary"

# pytest-xdist is on the device image; the tests pass with or without it.
parallel=(); python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
py=(python3 -X faulthandler)  # an array: timeout runs commands, not shell functions
step tests_cuda_vs_cpu 120 "${py[@]}" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_cuda.py
if [ -n "${QUICK:-}" ]; then
  step tests_cuda_rows 180 "${py[@]}" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests -k cuda
else
  step tests_all 420 "${py[@]}" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests
fi

# Open targets: issue 2 (fused TIES >= 50% of device copy bandwidth), issue 5 (batched_svd
# >= 3x torch.linalg.svd on small matrices), issue 6 (ToMe and kv_merge >= 3x their torch
# references).
benches() {
  step bench_gta 120 "${py[@]}" benchmarks/gpu/bench_gpu.py --json "$work/bench_gpu.json"
  step bench_batched_svd 90 "${py[@]}" benchmarks/bench_subspace.py --device cuda --only-svd \
    --txt "$work/svd-gpu.txt" --json "$work/svd-gpu.json"
  step bench_tome 120 "${py[@]}" benchmarks/bench_tome.py --device cuda \
    --txt "$work/tome-gpu.txt" --json "$work/tome-gpu.json"
  step bench_kvmerge 120 "${py[@]}" benchmarks/bench_kvmerge.py --device cuda --skip-loop \
    --txt "$work/kvmerge-gpu.txt" --json "$work/kvmerge-gpu.json"
}
sanitizers() {
  step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 benchmarks/gpu/sanitize_ops.py
  [ -n "${QUICK:-}" ] || step racecheck 300 compute-sanitizer --tool racecheck \
    --error-exitcode 3 python3 benchmarks/gpu/sanitize_ops.py
}
if [ -n "${QUICK:-}" ]; then
  benches; sanitizers
else
  sanitizers; benches
  step bench_subspace 300 "${py[@]}" benchmarks/bench_subspace.py --device cuda --ref-reps 1 \
    --txt "$work/subspace-gpu.txt" --json "$work/subspace-gpu.json"
  step profile 120 "${py[@]}" benchmarks/gpu/profile_ops.py
fi
note "done in $((SECONDS - started)) s"
