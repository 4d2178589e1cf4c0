#!/usr/bin/env bash
# One GPU-machine call for issue 14 (NVIDIA ModelOpt on the PyTorch side, and the fp8 mode):
#   the two ModelOpt suites (suites/test_digits_modelopt.py, suites/test_digitdet_modelopt.py) on
#   CUDA - calibration and QAT on the GPU, the torch cases on CUDA, ONNX Runtime on its best
#   provider - recorded into a scratch baseline directory (latency included), then run again
#   against those baselines. fp8 latency is measured only on an FP8-capable GPU (compute
#   capability >= 8.9: the log's first lines say which), as fake-quant latency.
# Needs .whl/ carried: device_env.sh's wheels (pytorch-quantization, pycocotools) and .whl/modelopt/
# (nvidia-modelopt 0.47.0 and its dependencies, cp312 manylinux; only those the image lacks, or has
# older, are installed - the image's own packages are never shadowed by older ones).
# Usage: OUT=dir bash benchmarks/device_modelopt.sh     (about 6 min; SUITE_LIMIT=s per pass,
#        SUITES="..." to run fewer suites, CHECKS=n clean reruns against the recording, default 1)
set -o pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT/r"
start_all=$(date +%s)
. benchmarks/device_env.sh "$OUT/r/gpu.txt"

# ModelOpt's wheels, into their own target ahead of the image on the path
python3 - > "$OUT/r/modelopt-install.txt" <<'EOF'
import glob, importlib.metadata as md, os, re
from packaging.version import Version
picked = []
for whl in sorted(glob.glob(".whl/modelopt/*.whl")):
    name, ver = os.path.basename(whl).split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(ver):
        picked.append(whl)
    print(f"{name} {ver}: {'install (image has ' + str(have) + ')' if whl in picked else 'image has ' + have}")
open("/tmp/modelopt-wheels.txt", "w").write("\n".join(picked))
EOF
if [ -s /tmp/modelopt-wheels.txt ]; then
  xargs python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-mo \
    < /tmp/modelopt-wheels.txt || exit 1
fi
export PYTHONPATH=/tmp/site-mo:$PYTHONPATH
# ModelOpt JIT-compiles its CUDA fake-quant kernels with nvcc on first use (minutes, and nothing to
# compile with on an image without the CUDA toolkit); its PyTorch fallback computes the same values.
# QATCHECK_MODELOPT_CUDA_EXT=auto lets ModelOpt try.
export QATCHECK_MODELOPT_CUDA_EXT=${QATCHECK_MODELOPT_CUDA_EXT:-0}
python3 - 2>&1 <<'EOF' | tee "$OUT/r/modelopt-env.txt"
import torch, onnxruntime
from qatcheck.quantize.modelopt_quant import missing_reason, version, fp8_latency_skip
print("modelopt", version(), "|", missing_reason("the ModelOpt suites") or "imports")
print("torch", torch.__version__, "cuda", torch.version.cuda, "onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("fp8 latency on cuda:", fp8_latency_skip("cuda") or "measured (fake-quant)")
EOF

SUITES=${SUITES:-"suites/test_digits_modelopt.py suites/test_digitdet_modelopt.py"}
run_suites() {
  python3 -m pytest -p qatcheck.plugin -p no:cacheprovider -q -rfEs $SUITES --qatcheck-device cuda \
    --qatcheck-require cuda --qatcheck-backends torch,onnxruntime --qatcheck-baselines /tmp/bmo \
    --qatcheck-cache /tmp/qcache-mo --qatcheck-reports "$OUT/r" --qatcheck-no-progress "$@"
}
start=$(date +%s)
timeout ${SUITE_LIMIT:-170} bash -c "$(declare -f run_suites); SUITES='$SUITES'; OUT='$OUT'; run_suites --update-baselines" \
  2>&1 | tee "$OUT/r/suite-record.log" | grep -v "^test_latency" | tail -80
echo "record rc=$? in $(( $(date +%s) - start )) s"
for i in $(seq 1 ${CHECKS:-1}); do
  start=$(date +%s)
  timeout ${SUITE_LIMIT:-170} bash -c "$(declare -f run_suites); SUITES='$SUITES'; OUT='$OUT'; run_suites --junitxml $OUT/r/junit-$i.xml" \
    2>&1 | tee "$OUT/r/suite-check-$i.log" | grep -v "^test_latency" | tail -60
  echo "check $i rc=$? in $(( $(date +%s) - start )) s"
done
cp /tmp/bmo/*.json "$OUT/r/" 2>/dev/null
echo "total $(( $(date +%s) - start_all )) s"
tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
