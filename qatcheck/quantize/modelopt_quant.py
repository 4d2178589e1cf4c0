"""NVIDIA ModelOpt (``modelopt.torch.quantization``) as the PyTorch-side quantizer.

Two users: ``torch_ptq`` / ``qat`` with ``QuantSettings.torch_quantizer="modelopt"`` (int8,
``INT8_DEFAULT_CFG`` or ``QuantSettings.modelopt_config``), and the opt-in ``fp8`` mode
(``FP8_DEFAULT_CFG``: E4M3 per-tensor weights and activations). Everything else - the QAT loop, the
artifact cache, the checks - is the pytorch-quantization path's; this module supplies quantize,
save / load, export and the quantizer list the structure check reads.

Calibrators (``QuantSettings.torch_calibrator``; weights are always calibrated with max):

* ``max`` -> ModelOpt's ``"max"`` algorithm (``mtq.quantize(model, config, forward_loop)``);
* ``entropy`` / ``percentile`` -> ModelOpt's ``HistogramCalibrator`` on the activation quantizers,
  finished with ``TensorQuantizer.load_calib_amax("entropy" | "percentile")`` - the same histogram
  searches as pytorch-quantization's (``percentile`` at ``QuantSettings.percentile``);
* ``mse`` -> refused (ConfigError when the recipe is built): ModelOpt's ``"mse"`` algorithm searches
  *weight* ranges only (activations stay max), and ``HistogramCalibrator``'s ``"mse"`` method is
  broken in 0.47 (``_compute_amax_mse`` passes ``num_bits`` where ``fake_tensor_quant`` takes its
  ``bias``: digits top-1 9.8 %). ModelOpt's weight search stays reachable through
  ``modelopt_config={..., "algorithm": "mse"}``.

The fp8 mode takes ``QuantSettings.fp8_calibrator``: ``max`` or ``percentile`` (entropy and mse
search the int8 grid).

Export: the TorchScript exporter (``dynamo=False``). The dynamo exporter fails on both with torch
2.14 / ModelOpt 0.47 (int8: ``GuardOnDataDependentSymNode`` in ``torch.export``; fp8: no ONNX
translation for ModelOpt's fp8 op). int8 is opset 17, as pytorch-quantization's export. ModelOpt
writes FP8 as TensorRT's custom ``trt::TRT_FP8QuantizeLinear`` / ``TRT_FP8DequantizeLinear``;
:func:`export_onnx` rewrites them to standard opset-19 ``QuantizeLinear`` / ``DequantizeLinear`` with
``float8e4m3fn`` zero points (what ``modelopt.onnx``'s FP8 exporter does too, without its
onnx-graphsurgeon dependency), which ONNX Runtime's CPU provider executes.

ONNX Runtime 1.32 has one optimizer bug on such graphs: its level-2 rewrite ``ReluQuantRewrite``
drops a ``Relu`` whose only consumer is a ``QuantizeLinear`` with any zero-point type other than
int8 / uint8, believing the quantizer clamps negatives - E4M3 is signed, so the ``Relu`` is lost
(digits top-1 99.26 % -> 13.3 %). The fp8 export therefore lists the activation quantizers' zero
points as graph inputs with initializers (``_shield_zero_points``): ONNX Runtime then treats them
as overridable, not constant, and leaves the ``Relu``; the values, the single real input
(``session.get_inputs()``) and TensorRT's parse (an initializer wins over a graph input) are
unchanged. Disabling ``ReluQuantRewrite`` in the ONNX Runtime session instead (``disabled_optimizers``)
would make the shield unnecessary.

Saved models (the artifact cache's ``.pt``): ModelOpt's own ``mto.modelopt_state`` (which
quantizers exist, their formats, calibrators and enabled state) with the state dict (amax buffers
included); :func:`load` rebuilds with ``mto.restore_from_modelopt_state`` and ``load_state_dict`` -
bit-identical outputs, ``torch.load(weights_only=True)`` safe.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.fsutil import atomic_path
from qatcheck.modes import FP8_MIN_CAPABILITY
from qatcheck.quantize.torch_common import TorchQuantizer, feed_calibration, read_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from qatcheck.recipe import QuantSettings

__all__ = ["ModelOpt", "INSTALL_HINT", "missing_reason", "require", "version", "quantize", "save", "load",
           "is_modelopt_model", "quantizer_names", "quantizer_scales", "export_onnx", "fp8_latency_skip"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[modelopt]'"
_SAVE_FORMAT = "qatcheck.modelopt_quant/1"
#: the int8 export's opset (pytorch-quantization's), and the first with float8 Q/DQ
INT8_OPSET = 17
FP8_OPSET = 19
#: E4M3's largest finite value: ModelOpt's FP8 scale is amax / 448
_E4M3_MAX = 448.0
#: smallest amax the fp8 export writes (an all-zero tensor would divide by zero); as torch_quant's
_AMAX_FLOOR = 2.0 ** -23
#: QATCHECK_MODELOPT_CUDA_EXT=0: skip ModelOpt's JIT-compiled CUDA kernels (its pure-PyTorch
#: fallback computes the same fake-quant; compiling them needs nvcc and takes minutes)
_CUDA_EXT_ENV = "QATCHECK_MODELOPT_CUDA_EXT"


# ---- availability ------------------------------------------------------------------------------

def missing_reason(what: str = "this case") -> str | None:
    """Why ModelOpt cannot be used here (None when ``modelopt.torch.quantization`` imports)."""
    if importlib.util.find_spec("modelopt") is None:
        return f"{what} needs NVIDIA ModelOpt (nvidia-modelopt), which is not installed: {INSTALL_HINT}"
    try:
        _mtq()
    except Exception as exc:  # noqa: BLE001 - a broken install is the same user problem
        return (f"{what} needs NVIDIA ModelOpt, but modelopt.torch.quantization does not import "
                f"({type(exc).__name__}: {exc}): {INSTALL_HINT}")
    return None


def require(what: str) -> None:
    """Skip the running test (pytest's skip, with the install hint) when ModelOpt is missing: an
    optional extra, like the YOLO recipe's ultralytics."""
    reason = missing_reason(what)
    if reason:
        import pytest

        pytest.skip(reason)


def version() -> str:
    """The installed nvidia-modelopt version ("absent" without it): part of the artifacts' keys."""
    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        return "absent"


def _mtq():
    """``modelopt.torch.quantization``, imported quietly (it prints and warns on import)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import modelopt.torch.opt  # noqa: F401
        import modelopt.torch.quantization as mtq
    if os.environ.get(_CUDA_EXT_ENV, "").strip() == "0":
        from modelopt.torch.quantization import extensions

        for getter in (extensions.get_cuda_ext, extensions.get_cuda_ext_fp8):
            getter.extension = None  # ModelOpt's cache: None = not available -> PyTorch fallback
    return mtq


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ModelOpt prints ("Inserted 35 quantizers") and warns per call; keep the test output clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ---- configs -----------------------------------------------------------------------------------

def _set_entry(entries: list, name: str, **cfg: Any) -> None:
    """Update the ``cfg`` of the ``quant_cfg`` entry for ``name`` (ModelOpt 0.47's list form)."""
    for entry in entries:
        if isinstance(entry, dict) and entry.get("quantizer_name") == name and "cfg" in entry:
            entry["cfg"] = {**entry["cfg"], **cfg}
            return
    raise ConfigError(f"the ModelOpt config has no {name!r} entry to set {cfg} on")


def build_config(quant: QuantSettings, fp8: bool = False) -> tuple[dict, str | None]:
    """The ModelOpt config for the settings, and the histogram method that finishes calibration
    (None: the config's own ``algorithm`` calibrates). See the module doc for the mapping."""
    mtq = _mtq()
    if fp8:
        config, method = copy.deepcopy(mtq.FP8_DEFAULT_CFG), (
            None if quant.fp8_calibrator == "max" else quant.fp8_calibrator)
    elif quant.modelopt_config is not None:
        return copy.deepcopy(dict(quant.modelopt_config)), None
    else:
        config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
        method = None if quant.torch_calibrator == "max" else quant.torch_calibrator
        if method not in (None, "entropy", "percentile"):
            raise ConfigError(f"torch_calibrator {quant.torch_calibrator!r} has no ModelOpt counterpart "
                              "(see qatcheck.quantize.modelopt_quant)")
        if not quant.per_channel:
            _set_entry(config["quant_cfg"], "*weight_quantizer", axis=None)
    config["quant_cfg"] = [dict(e) if isinstance(e, dict) else e for e in config["quant_cfg"]]
    if method is not None:
        _set_entry(config["quant_cfg"], "*input_quantizer", calibrator="histogram")
        config["algorithm"] = None  # quantizers only; _calibrate_histogram collects and finishes
    return config, method


# ---- quantize ------------------------------------------------------------------------------------

def _tensor_quantizer_cls():
    return _mtq().nn.TensorQuantizer


def _quantizers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    cls = _tensor_quantizer_cls()
    for name, module in model.named_modules():
        if isinstance(module, cls):
            yield name, module


def _enabled(model: nn.Module) -> Iterator[tuple[str, Any]]:
    return ((n, q) for n, q in _quantizers(model) if q.is_enabled)


def _forward_loop(batches: Iterable[Any], device: torch.device, progress: bool):
    """ModelOpt's ``forward_loop(model)``: the recipe's calibration batches, shape-checked."""
    def loop(model: nn.Module) -> None:
        feed_calibration(model, batches, device, progress=progress, desc="calibrate (modelopt)")
    return loop


def _calibrate_histogram(model: nn.Module, loop, method: str, percentile: float) -> None:
    """Activation histograms (ModelOpt's HistogramCalibrator), finished with ``method``; weights
    keep their max calibrators. ModelOpt's own ``finish_stats_collection`` passes one method to
    every calibrator (a MaxCalibrator refuses it), hence this loop."""
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection

    enable_stats_collection(model)
    loop(model)
    kwargs = {"percentile": percentile} if method == "percentile" else {}
    for _, q in _enabled(model):
        cal = q._calibrator
        if isinstance(cal, HistogramCalibrator):
            if cal.compute_amax(method, **kwargs) is not None:
                q.load_calib_amax(method, **kwargs)
        elif cal is not None and cal.compute_amax() is not None:
            q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def quantize(model: nn.Module, quant: QuantSettings, batches: Iterable[Any], *, fp8: bool = False,
             device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """A calibrated ModelOpt copy of ``model`` (int8 by the settings, or FP8 E4M3), in eval mode on
    ``device``. A quantizer that saw no data (a layer not called in eval) is disabled with a log line,
    as torch_quant.calibrate does: it has no range and is absent from the export."""
    mtq = _mtq()
    config, method = build_config(quant, fp8)
    device = torch.device(device)
    qmodel = copy.deepcopy(model).eval().to(device)
    loop = _forward_loop(batches, device, progress)
    with _quiet():
        if method is None:
            qmodel = mtq.quantize(qmodel, config, loop)
        else:
            qmodel = mtq.quantize(qmodel, config)
            _calibrate_histogram(qmodel, loop, method, quant.percentile)
    names = list(_enabled(qmodel))
    if not names:
        raise ConfigError(f"ModelOpt inserted no enabled quantizer into {type(model).__name__} "
                          "(no Conv / Linear / pooling layer its config quantizes?)")
    for name, q in names:
        amax = getattr(q, "amax", None)
        if amax is None or not bool(torch.isfinite(amax).all()):
            log.warning("quantizer %s saw no data during calibration (layer not called in eval?); "
                        "disabling it", name)
            q.disable()
    return qmodel.eval()


# ---- save / load -------------------------------------------------------------------------------

def _settings_id(quant: QuantSettings, fp8: bool) -> str:
    return repr(("fp8", quant.fp8_calibrator, quant.percentile) if fp8 else
                ("int8", quant.torch_calibrator, quant.percentile, quant.per_channel, quant.modelopt_config))


def save(qmodel: nn.Module, path: str | os.PathLike[str], quant: QuantSettings, fp8: bool = False) -> None:
    """Store a calibrated (or fine-tuned) ModelOpt model: ``mto.modelopt_state`` and the state dict."""
    import modelopt.torch.opt as mto

    with _quiet():
        state = mto.modelopt_state(qmodel)
    payload = {"format": _SAVE_FORMAT, "modelopt_version": version(), "settings": _settings_id(quant, fp8),
               "modelopt_state": state,
               "state_dict": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}}
    # into a file object: given a path, torch.save names its archive after the (random temp) file
    # name, and every build of the same state got another digest
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load(model: nn.Module, path: str | os.PathLike[str], quant: QuantSettings, fp8: bool = False) -> nn.Module:
    """Rebuild a model stored by :func:`save` on the fp32 ``model`` (a copy is made), in eval mode,
    without calibrating: bit-identical outputs to the saved model."""
    _mtq()
    import modelopt.torch.opt as mto

    path = Path(path)
    payload = read_checkpoint(path, _SAVE_FORMAT, "ModelOpt checkpoint")
    if payload["settings"] != _settings_id(quant, fp8):
        raise ArtifactError(f"{path}: saved with other quantization settings ({payload['settings']}) than "
                            f"requested ({_settings_id(quant, fp8)})")
    try:
        with _quiet():
            qmodel = mto.restore_from_modelopt_state(copy.deepcopy(model).cpu(), payload["modelopt_state"])
            qmodel.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:
        raise ArtifactError(f"{path}: does not match the model built from the recipe "
                            f"({type(exc).__name__}: {exc})") from exc
    return qmodel.eval()


# ---- inspection (structure check) --------------------------------------------------------------

def is_modelopt_model(module: nn.Module) -> bool:
    """Whether ``module`` holds ModelOpt quantizers (never imports ModelOpt: a process that has not
    imported it has none)."""
    mod = sys.modules.get("modelopt.torch.quantization.nn")
    cls = getattr(mod, "TensorQuantizer", None)
    return cls is not None and any(isinstance(m, cls) for m in module.modules())


def quantizer_names(qmodel: nn.Module) -> list[str]:
    """The enabled quantizers (``layer1.conv1.input_quantizer``): the tensors that get Q/DQ."""
    return [name for name, _ in _enabled(qmodel)]


def _is_fp8(q) -> bool:
    return isinstance(q.num_bits, tuple)


def _export_scales(q) -> np.ndarray:
    """The scale(s) the export writes for quantizer ``q``: int8 ``amax / 127`` in float32, a zero
    scale replaced by 1 (ModelOpt's ``export_int8``); fp8 ``1 / (448 / amax)`` (``export_fp8``)."""
    amax = q.amax.detach().float().cpu()
    if _is_fp8(q):
        return np.float32(1.0 / (_E4M3_MAX / max(float(amax.max()), _AMAX_FLOOR)))
    bound = (1 << (q.num_bits - 1 + int(q.unsigned))) - 1
    scale = (amax.squeeze() if amax.numel() > 1 else amax.reshape(())) / bound
    scale = scale.masked_fill(scale == 0, 1.0)
    return scale.numpy().astype(np.float32)


def quantizer_scales(qmodel: nn.Module) -> list[tuple[str, str, np.ndarray]]:
    """``(name, kind, scales)`` per enabled quantizer, named like the structure check's ONNX side:
    ``<module>.input_quantizer`` -> ``<module>:input``, ``weight_quantizer`` -> ``<module>:weight``,
    anything else -> ``<path>:input``."""
    missing = [n for n, q in _enabled(qmodel) if q.amax is None]
    if missing:
        raise ArtifactError(f"{len(missing)} enabled ModelOpt quantizer(s) have no amax (calibrate "
                            f"first): {', '.join(missing[:8])}")
    out = []
    for name, q in _enabled(qmodel):
        owner, _, attr = name.rpartition(".")
        if attr == "weight_quantizer":
            out.append((f"{owner}:weight", "weight", _export_scales(q)))
        elif attr == "input_quantizer":
            out.append((f"{owner}:input", "activation", _export_scales(q)))
        else:
            out.append((f"{name}:input", "activation", _export_scales(q)))
    return out


# ---- export ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _floored_fp8_amax(qmodel: nn.Module) -> Iterator[None]:
    """An all-zero tensor calibrates to amax 0: ModelOpt's fp8 export would divide by it. Floored
    for the export only, restored afterwards."""
    saved = []
    for _, q in _enabled(qmodel):
        if _is_fp8(q) and q.amax is not None and float(q.amax.max()) < _AMAX_FLOOR:
            saved.append((q, q.amax.detach().clone()))
            q.amax = torch.full_like(q.amax, _AMAX_FLOOR)
    try:
        yield
    finally:
        for q, amax in saved:
            q.amax = amax


def export_onnx(qmodel: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], input_name: str,
                output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]] | None = None,
                fp8: bool | None = None) -> None:
    """Export a calibrated ModelOpt model as a TensorRT-style Q/DQ ONNX (int8: opset 17; fp8:
    opset 19 with float8e4m3fn zero points), written atomically, then cleaned (:func:`_finish`).
    ``fp8`` None: fp8 when any enabled quantizer is E4M3."""
    import onnx

    if fp8 is None:
        fp8 = any(_is_fp8(q) for _, q in _enabled(qmodel))

    uncalibrated = [n for n, q in _enabled(qmodel) if q.amax is None or not bool(torch.isfinite(q.amax).all())]
    if uncalibrated:
        raise ArtifactError(f"cannot export: {len(uncalibrated)} ModelOpt quantizer(s) have no finite amax "
                            f"(calibrate first): {', '.join(uncalibrated[:8])}")
    param = next(qmodel.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = qmodel.training
    qmodel.eval()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), _quiet(), _floored_fp8_amax(qmodel):
            torch.onnx.export(qmodel, (example.to(device),), str(tmp), input_names=[input_name],
                              output_names=list(output_names), dynamic_axes=dynamic_axes,
                              opset_version=FP8_OPSET if fp8 else INT8_OPSET, do_constant_folding=True,
                              dynamo=False)
            model = _finish(onnx.load(str(tmp)), fp8)
            onnx.checker.check_model(model, full_check=True)
            onnx.save(model, str(tmp))
    finally:
        qmodel.train(was_training)


def _finish(model, fp8: bool):
    """The exported graph, cleaned: no-op Casts (float -> float, which ModelOpt's int8 symbolic
    leaves in front of shared inputs) removed; for fp8, TensorRT's custom FP8 Q/DQ rewritten to
    standard ones and the activation zero points shielded from ONNX Runtime (module doc)."""
    _drop_noop_casts(model)
    if fp8:
        _standard_fp8_qdq(model)
        _shield_zero_points(model)
    return model


def _elem_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _drop_noop_casts(model) -> None:
    g = model.graph
    types = _elem_types(model)
    outputs = {o.name for o in g.output}
    for node in [n for n in g.node if n.op_type == "Cast"]:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src, dst = node.input[0], node.output[0]
        if to is None or types.get(src) != to or dst in outputs:
            continue
        for other in g.node:
            for i, name in enumerate(other.input):
                if name == dst:
                    other.input[i] = src
        g.node.remove(node)


def _standard_fp8_qdq(model) -> None:
    """``trt::TRT_FP8QuantizeLinear(x, scale)`` -> ``QuantizeLinear(x, scale, zp: float8e4m3fn 0,
    saturate=1)``, and the DequantizeLinear likewise; the Q outputs' stale uint8 value_info goes,
    and so does the ``trt`` opset import."""
    from onnx import TensorProto, helper

    g = model.graph
    q_outputs = set()
    for node in g.node:
        if node.domain != "trt" or node.op_type not in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            continue
        zp = f"{node.name}/zero_point"
        g.initializer.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
        node.domain = ""
        node.input.append(zp)
        if node.op_type == "TRT_FP8QuantizeLinear":
            node.op_type = "QuantizeLinear"
            node.attribute.append(helper.make_attribute("saturate", 1))
            q_outputs.add(node.output[0])
        else:
            node.op_type = "DequantizeLinear"
    kept = [v for v in g.value_info if v.name not in q_outputs]
    del g.value_info[:]
    g.value_info.extend(kept)
    custom = [n for n in g.node if n.domain == "trt"]
    if custom:
        raise ArtifactError(f"the fp8 export kept TensorRT custom op(s) {sorted({n.op_type for n in custom})}")
    imports = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(imports)


def _shield_zero_points(model) -> None:
    """List the activation QuantizeLinear zero points as graph inputs too (see the module doc:
    ONNX Runtime 1.32's ReluQuantRewrite drops a Relu in front of an FP8 QuantizeLinear whose zero
    point is a constant). Weight quantizers (constant inputs) keep constant zero points, so ONNX
    Runtime still folds their Q into float8 weights."""
    from onnx import helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def constant(name: str) -> bool:
        p = producers.get(name)
        return name in inits or (p is not None and p.op_type == "Constant")

    listed = {i.name for i in g.input}
    for node in g.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or constant(node.input[0]):
            continue
        zp = inits.get(node.input[2])
        if zp is not None and zp.name not in listed:
            g.input.append(helper.make_tensor_value_info(zp.name, zp.data_type, list(zp.dims)))
            listed.add(zp.name)


# ---- fp8 latency -------------------------------------------------------------------------------

def fp8_latency_skip(device: str) -> str | None:
    """Why an fp8 latency means nothing on ``device`` (a runner's device: ``cpu``, ``cuda:0``,
    ``CPUExecutionProvider``, ``CUDAExecutionProvider``...): anything but an FP8-capable GPU
    (compute capability >= 8.9, ``torch.cuda.get_device_capability``). None: measure it."""
    d = (device or "").lower()
    gpu = d.startswith("cuda") or d in ("cudaexecutionprovider", "tensorrtexecutionprovider")
    if not gpu:
        return (f"fp8 latency is not measured on {device or 'this device'}: without an FP8-capable GPU "
                f"(compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}) fp8 runs as a "
                "simulation whose timing says nothing about FP8")
    if not torch.cuda.is_available():
        return f"fp8 latency: {device} is a GPU device but torch sees no CUDA device to check for FP8"
    index = int(d.split(":", 1)[1]) if d.startswith("cuda:") else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(index))
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (f"fp8 latency is not measured on {name} (compute capability {cap[0]}.{cap[1]} < "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: no FP8 tensor cores)")
    return None


class ModelOpt(TorchQuantizer):
    """NVIDIA ModelOpt as a :class:`~qatcheck.quantize.torch_common.TorchQuantizer`
    (``QuantSettings.torch_quantizer="modelopt"``, and the ``fp8`` mode): the functions of this module."""

    name = "modelopt"

    def version(self) -> str:
        return version()

    def missing_reason(self, what: str = "this case") -> str | None:
        return missing_reason(what)

    def quiet(self):
        return _quiet()

    def quantize(self, model, quant, batches, *, fp8=False, device="cpu", progress=False):
        return quantize(model, quant, batches, fp8=fp8, device=device, progress=progress)

    def save(self, qmodel, path, quant, fp8=False):
        save(qmodel, path, quant, fp8=fp8)

    def load(self, model, path, quant, fp8=False):
        return load(model, path, quant, fp8=fp8)

    def export_onnx(self, qmodel, example, path, input_name, output_names, dynamic_axes=None):
        export_onnx(qmodel, example, path, input_name, output_names, dynamic_axes)

    def is_quantizer(self, module):
        # never imports ModelOpt: a process that has not imported it holds none of its quantizers
        mod = sys.modules.get("modelopt.torch.quantization.nn")
        cls = getattr(mod, "TensorQuantizer", None)
        return cls is not None and isinstance(module, cls)

    def owns(self, module):
        return is_modelopt_model(module)

    def is_enabled(self, quantizer):
        return bool(quantizer.is_enabled)

    def set_enabled(self, quantizer, on):
        (quantizer.enable if on else quantizer.disable)()

    def names(self, qmodel):
        return quantizer_names(qmodel)

    def scales(self, qmodel):
        return quantizer_scales(qmodel)

    def needs_freeze(self, model):
        from qatcheck.quantize import frozen_modelopt

        return frozen_modelopt.needs_freeze(model)

    def freeze(self, model):
        from qatcheck.quantize import frozen_modelopt

        return frozen_modelopt.freeze_model(model)
