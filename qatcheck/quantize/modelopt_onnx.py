"""ONNX-level PTQ by NVIDIA ModelOpt (``modelopt.onnx.quantization``), as an alternative writer of
the ``trt_ptq`` / ``partial`` graphs (``--qatcheck-trt-ptq modelopt``).

It starts from the same fp32 ONNX and the same calibration batches as qatcheck's own
:mod:`qatcheck.quantize.onnx_ptq` and takes the same :class:`~qatcheck.quantize.onnx_ptq.OnnxPTQConfig`,
so the two are interchangeable and comparable (:mod:`qatcheck.analysis.ptq_crosscheck`):

* calibrator ``minmax`` -> ModelOpt's ``calibration_method="max"``; ``entropy`` -> ``"entropy"``
  (ONNX Runtime's ``EntropyCalibrater`` with ModelOpt's defaults: 128 histogram bins and 128
  quantized bins, which is *not* TensorRT's 2048-bin KL search - see the cross-check). ModelOpt's
  int8 path knows no percentile: ``modelopt.onnx.quantization.int8`` silently maps every method
  but ``entropy`` to MinMax, so ``percentile`` is refused here rather than quietly built as max;
* per-channel weights only (ModelOpt's int8 always quantizes Conv / ConvTranspose weights per
  output channel): ``per_channel=False`` is refused;
* ``exclude`` (the ``partial`` mode's ``QuantSettings.keep_precision``) is resolved to ONNX node
  names exactly as our PTQ resolves it (:func:`~qatcheck.quantize.onnx_ptq.resolve_layers`) and
  passed as anchored ``nodes_to_exclude`` patterns;
* CPU only: ``calibration_eps=["cpu"]`` (no TensorRT, no CUDA), ``high_precision_dtype="fp32"`` (the
  default ``fp16`` converts the graph to fp16, which this project does not want for int8 modes);
* where to put Q/DQ is ModelOpt's decision (its TensorRT fusion patterns: residual-Add inputs,
  pooling, concat elimination...), not qatcheck's ``QUANTIZABLE_OPS`` rule. The output uses opset
  >= 19 (ModelOpt's minimum for int8).

ModelOpt writes intermediate files next to its input and output, so it runs on a private copy in
a temporary directory; the result is checked with ``onnx.checker`` and written atomically.
This module imports ModelOpt only when it quantizes: the artifact builder imports it cheaply.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable

import numpy as np

from qatcheck.errors import ArtifactError, ConfigError, DataError
from qatcheck.quantize.onnx_ptq import OnnxQuantizer

#: qatcheck calibrator -> ModelOpt ``calibration_method`` (int8)
MODELOPT_METHODS: dict[str, str] = {"minmax": "max", "entropy": "entropy"}
#: the ``--qatcheck-trt-ptq`` value that selects this quantizer for trt_ptq / partial
OPTION_VALUE = "modelopt"
#: what to install for it (pyproject's ``modelopt`` extra)
INSTALL_HINT = "pip install -e '.[modelopt]' (nvidia-modelopt with its ONNX dependencies)"
#: ModelOpt's int8 path writes at least this opset (fp16/fp32 scales in Q/DQ)
MODELOPT_MIN_OPSET = 19


def unavailable_reason() -> str | None:
    """Why ModelOpt's ONNX PTQ cannot run here (None when it can)."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception as exc:  # ImportError, or a missing transitive dependency raising anything
        return (f"modelopt.onnx.quantization is not importable ({type(exc).__name__}: {exc}); "
                f"{INSTALL_HINT}")
    return None


def version() -> str:
    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        return "absent"


def quantizer_id() -> str:
    """What enters the cache key of a graph ModelOpt wrote (its version shapes the result)."""
    return f"nvidia-modelopt {version()}"


@dataclass
class ModelOptResult:
    """What :func:`quantize_modelopt` did."""

    quantized_nodes: list[str]
    excluded_nodes: list[str]
    qdq_pairs: int
    calibration_method: str
    opset: int


def check_config(config) -> str:
    """The ModelOpt calibration method for ``config`` (an OnnxPTQConfig), or a ConfigError."""
    method = MODELOPT_METHODS.get(config.calibrator)
    if method is None:
        raise ConfigError(
            f"calibrator {config.calibrator!r} has no ModelOpt counterpart: ModelOpt's int8 ONNX PTQ "
            f"offers calibration_method 'max' and 'entropy' only (qatcheck minmax -> max, entropy -> "
            f"entropy; its int8 path would silently build anything else as max). Use "
            f"QuantSettings.calibrator minmax or entropy, or build with --qatcheck-trt-ptq qdq")
    if not config.per_channel:
        raise ConfigError("QuantSettings.per_channel=False: ModelOpt's int8 ONNX PTQ always quantizes "
                          "weights per output channel; use per_channel=True or --qatcheck-trt-ptq qdq")
    return method


class _DropNvml(logging.Filter):
    """ModelOpt logs an ERROR when it cannot count GPUs (no NVML on a CPU machine): harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to get GPU count" not in record.getMessage()


def _import_modelopt():
    reason = unavailable_reason()
    if reason:
        raise ConfigError(f"--qatcheck-trt-ptq {OPTION_VALUE}: {reason}")
    import modelopt.onnx.quantization as moq

    log = logging.getLogger("modelopt.onnx")
    if not any(isinstance(f, _DropNvml) for f in log.filters):
        log.addFilter(_DropNvml())
    return moq


def _calibration_array(batches: Iterable[np.ndarray], value, path: Path) -> tuple[np.ndarray, tuple]:
    """All calibration batches as one array (ModelOpt splits it back into batches of the first
    batch's shape, given as ``calibration_shapes``), checked like our PTQ checks them."""
    from qatcheck.quantize.onnx_ptq import _as_feed

    arrays = []
    for index, batch in enumerate(batches):
        feed = _as_feed(batch, value, index)
        if not np.isfinite(feed).all():
            raise DataError(f"calibration batch {index} has NaN/Inf; check the calibration data")
        if arrays and feed.shape != arrays[0].shape:
            raise DataError(f"calibration batch {index} has shape {tuple(feed.shape)}, batch 0 "
                            f"{tuple(arrays[0].shape)}: ModelOpt's ONNX PTQ takes batches of one shape")
        arrays.append(feed)
    if not arrays:
        raise DataError(f"no calibration batches were given for {path}; ONNX PTQ needs at least one")
    return np.concatenate(arrays), tuple(arrays[0].shape)


def _log_tail(buf: io.StringIO, lines: int = 15) -> str:
    tail = [line for line in buf.getvalue().splitlines() if line.strip()][-lines:]
    return ("\nModelOpt's last output:\n  " + "\n  ".join(tail)) if tail else ""


def quantize_modelopt(model_path: str | Path, out_path: str | Path, calib_batches: Iterable[np.ndarray],
                      config, input_name: str | None = None, progress: bool = False) -> ModelOptResult:
    """Calibrate a plain fp32 ONNX with ModelOpt's int8 ONNX PTQ and write the Q/DQ graph.

    Same contract as :func:`qatcheck.quantize.onnx_ptq.quantize_onnx`: ``config`` is an
    :class:`~qatcheck.quantize.onnx_ptq.OnnxPTQConfig`, ``calib_batches`` are fed to
    ``input_name`` (default: the graph's first input). A dynamic-axes ONNX stays dynamic: the
    batches are fed at their own shape. ``progress`` is accepted for symmetry (ModelOpt logs
    instead).
    """
    import onnx

    from qatcheck.quantize.onnx_ptq import (_check, _data_inputs, _default_opset, _load_model,
                                            _name_unnamed_nodes, _pick_input, _save_atomic,
                                            resolve_layers)

    method = check_config(config)
    model_path, out_path = Path(model_path), Path(out_path)
    model = _load_model(model_path)
    _name_unnamed_nodes(model.graph)
    inputs = _data_inputs(model.graph)
    if len(inputs) > 1:
        raise ConfigError(f"{model_path} has {len(inputs)} graph inputs; qatcheck feeds ModelOpt's "
                          "calibration one input (use --qatcheck-trt-ptq qdq)")
    feed = _pick_input(model.graph, input_name)
    excluded = list(dict.fromkeys(n for hits in resolve_layers(model, config.exclude).values() for n in hits))
    data, batch_shape = _calibration_array(calib_batches, feed, model_path)
    moq = _import_modelopt()
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="qatcheck-modelopt-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "quantized.onnx"
        onnx.save(model, str(src))
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                moq.quantize(
                    str(src), quantize_mode="int8", calibration_method=method,
                    calibration_data={feed.name: data},
                    calibration_shapes=f"{feed.name}:{'x'.join(str(d) for d in batch_shape)}",
                    calibration_eps=["cpu"], high_precision_dtype="fp32",
                    nodes_to_exclude=[re.escape(n) + "$" for n in excluded] or None,
                    output_path=str(dst), log_level="WARNING")
        except Exception as exc:
            raise ArtifactError(f"ModelOpt's ONNX PTQ ({quantizer_id()}, calibration_method={method!r}) "
                                f"failed on {model_path}: {type(exc).__name__}: {exc}{_log_tail(log)}") from exc
        if not dst.is_file():
            raise ArtifactError(f"ModelOpt's ONNX PTQ wrote no model for {model_path}{_log_tail(log)}")
        qmodel = onnx.load(str(dst))
    _check(qmodel, model_path)
    _check_result(qmodel, model, excluded, model_path)
    _save_atomic(qmodel, out_path)
    dq_out = {o for n in qmodel.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n.name for n in qmodel.graph.node
                 if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and set(n.input) & dq_out]
    pairs = sum(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    return ModelOptResult(quantized_nodes=quantized, excluded_nodes=excluded, qdq_pairs=pairs,
                          calibration_method=method, opset=_default_opset(qmodel))


def _check_result(qmodel, fp32, excluded: list[str], path: Path) -> None:
    """The graph ModelOpt wrote keeps the fp32 graph's interface, has Q/DQ, and leaves the
    excluded nodes' inputs unquantized."""
    def io_names(m):
        return ([i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}],
                [o.name for o in m.graph.output])

    if io_names(qmodel) != io_names(fp32):
        raise ArtifactError(f"ModelOpt changed the inputs/outputs of {path}: {io_names(fp32)} -> "
                            f"{io_names(qmodel)}")
    if not any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node):
        raise ArtifactError(f"ModelOpt's ONNX PTQ inserted no Q/DQ into {path} (no quantizable node?)")
    dq_out = {o for n in qmodel.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    leaked = [n.name for n in qmodel.graph.node if n.name in set(excluded) and set(n.input[:2]) & dq_out]
    if leaked:
        raise ArtifactError(f"ModelOpt quantized the inputs of excluded node(s) {', '.join(leaked)} in "
                            f"{path} (nodes_to_exclude did not hold)")


class ModelOptPTQ(OnnxQuantizer):
    """NVIDIA ModelOpt's ONNX PTQ (:func:`quantize_modelopt`): ``--qatcheck-trt-ptq modelopt``."""

    name = "modelopt"

    def quantize(self, model_path, out_path, calib_batches, config, input_name=None, progress=False):
        return quantize_modelopt(model_path, out_path, calib_batches, config, input_name=input_name,
                                 progress=progress)

    def cache_id(self) -> str:
        return quantizer_id()  # with ModelOpt's version

    def setting(self) -> str:
        return f"{self.name}=={version()}"

    def missing_reason(self) -> str | None:
        return unavailable_reason()
