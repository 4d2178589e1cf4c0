# Sourced by the GPU-machine scripts: install the carried wheels (.whl/: pytorch-quantization 2.1.3
# and pycocotools for the machine's Python), point Python at them and at this checkout, keep the
# generated data in /tmp, and log the GPU's state into $1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 QATCHECK_DATA_CACHE=/tmp/qdata
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv | tee "$1"
