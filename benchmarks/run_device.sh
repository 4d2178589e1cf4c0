#!/usr/bin/env bash
# One GPU-machine call for issue 4 (see benchmarks/RESULTS.md):
#   1. the built-in suites' torch cases on CUDA (calibration and QAT run on CUDA), recorded into a
#      scratch baseline directory, then run again against those baselines (CUDA-graph latency on
#      the same device fingerprint);
#   2. timing fidelity + regression power of TorchRunner.timed_call (benchmarks/gpu_timing.py).
# Needs .whl/ carried (pytorch-quantization 2.1.3 and pycocotools wheels for the machine's Python).
# Usage: OUT=dir bash benchmarks/run_device.sh [suites|timing|all]   (default all)
PART=${1:-all}
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT/r"
. benchmarks/device_env.sh "$OUT/r/gpu.txt"
SUITES="suites/test_digits.py suites/test_digits_entropy.py suites/test_digitdet.py"
run_suites() {
  python3 -m pytest -p qatcheck.plugin -p no:cacheprovider -q -rfE $SUITES --qatcheck-device cuda \
    --qatcheck-require cuda --qatcheck-backends torch,onnxruntime --qatcheck-baselines /tmp/b \
    --qatcheck-cache /tmp/qcache --qatcheck-reports "$OUT/r" --qatcheck-no-progress "$@"
}
if [ "$PART" != timing ]; then
start=$(date +%s)
timeout ${SUITE_LIMIT:-240} bash -c "$(declare -f run_suites); SUITES='$SUITES'; OUT='$OUT'; run_suites --update-baselines" \
  2>&1 | tee "$OUT/r/suite-record.log" | grep -v "^test_latency" | tail -90
echo "record rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${SUITE_LIMIT:-240} bash -c "$(declare -f run_suites); SUITES='$SUITES'; OUT='$OUT'; run_suites --junitxml $OUT/r/junit.xml" \
  2>&1 | tee "$OUT/r/suite-check.log" | grep -v "^test_latency" | tail -40
echo "check rc=$? in $(( $(date +%s) - start )) s"
cp /tmp/b/*.json "$OUT/r/" 2>/dev/null
fi
[ "$PART" != suites ] && timeout ${TIMING_LIMIT:-280} python3 benchmarks/gpu_timing.py --out "$OUT/r" --budget-s ${BUDGET:-240} 2>&1 | tee "$OUT/r/timing.log" | tail -40
echo "gpu_timing rc=$?"
tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
