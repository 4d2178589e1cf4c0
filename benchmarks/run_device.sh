#!/usr/bin/env bash
# One device call: timing fidelity + regression power (benchmarks/gpu_timing.py), then the digits
# suite's torch cases on CUDA. Needs .whl/ (pytorch-quantization 2.1.3) carried; OUT set by caller.
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
export PYTHONUNBUFFERED=1
timeout ${TIMING_LIMIT:-300} python3 benchmarks/gpu_timing.py --out "$OUT" --budget-s ${BUDGET:-260} 2>&1 | tee "$OUT/timing.log"
echo "gpu_timing rc=$?"
timeout ${SUITE_LIMIT:-150} python3 -m pytest -p qatcheck.plugin suites/test_digits.py -q -rA --qatcheck-device cuda \
  --qatcheck-backends torch -k "accuracy or parity" --qatcheck-baselines /tmp/b --update-baselines \
  --qatcheck-cache /tmp/qcache --qatcheck-reports /tmp/reports --junitxml "$OUT/junit.xml" -p no:cacheprovider 2>&1 \
  | tee "$OUT/suite.log" | tail -40
echo "suite rc=$?"
cp /tmp/b/*.json "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv
