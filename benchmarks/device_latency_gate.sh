#!/usr/bin/env bash
# The latency-gate benchmark (benchmarks/latency_gate.py) on the GPU machine: torch on CUDA
# (CUDA-graph timing, fake-quant through its frozen twin) and ONNX Runtime's CPU provider.
# Needs .whl/ carried (pytorch-quantization 2.1.3 and pycocotools for the machine's Python).
# Usage: OUT=dir bash benchmarks/device_latency_gate.sh <latency_gate.py arguments>
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
. benchmarks/device_env.sh "$OUT/gpu.txt"
python3 benchmarks/latency_gate.py --out "$OUT" "$@" -- -p qatcheck.plugin --qatcheck-device cuda \
  --qatcheck-require cuda --qatcheck-backends torch,onnxruntime --qatcheck-cache /tmp/qcache \
  ${GATE_PYTEST_ARGS:-}
