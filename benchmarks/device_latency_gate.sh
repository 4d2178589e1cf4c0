#!/usr/bin/env bash
# The latency-gate benchmark (benchmarks/latency_gate.py) on the GPU machine: torch on CUDA
# (CUDA-graph timing, fake-quant through its frozen twin) and ONNX Runtime's CPU provider.
# Needs .whl/ carried (pytorch-quantization 2.1.3 and pycocotools for the machine's Python).
# Usage: OUT=dir bash benchmarks/device_latency_gate.sh <latency_gate.py arguments>
# A benchmark longer than one device command: the first call leaves $OUT/state.tgz (the recorded
# baselines and latency-reference artifacts) and $OUT/latency-gate.json; carry both (as
# .gate/state.tgz and .gate/latency-gate.json) into the next call, which goes on from them.
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
. benchmarks/device_env.sh "$OUT/gpu.txt"
STATE=/tmp/gate-state; mkdir -p "$STATE"
APPEND=()
if [ -f .gate/state.tgz ]; then
  tar xzf .gate/state.tgz -C "$STATE" && APPEND=(--append .gate/latency-gate.json)
fi
timeout "${GATE_LIMIT:-540}" python3 benchmarks/latency_gate.py --out "$OUT" --state "$STATE" "${APPEND[@]}" "$@" \
  -- -p qatcheck.plugin --qatcheck-device cuda \
  --qatcheck-require cuda --qatcheck-backends torch,onnxruntime --qatcheck-cache /tmp/qcache \
  ${GATE_PYTEST_ARGS:-}
echo "latency_gate rc=$?"
tar czf "$OUT/state.tgz" -C "$STATE" baselines latency-reference
