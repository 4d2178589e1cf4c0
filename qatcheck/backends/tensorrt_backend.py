"""TensorRT backend: applies a :class:`~qatcheck.backends.trt_plan.BuildPlan` with the TensorRT
Python API, caches the engine, runs and times it.

Nothing is decided here: which ONNX, flags, calibrator, pinned layers, profiles and cache key all
come from ``trt_plan.plan_build`` (tested without TensorRT). This module only talks to TensorRT.

Why the TensorRT API and not Polygraphy: the adapter needs per-layer precision pins (a network
post-processing step in Polygraphy), its own calibrator cache and stream/event timing around
``execute_async_v3`` (also possible through a CUDA graph); with those, Polygraphy's loaders would
wrap about ten API calls and add a dependency whose TensorRT 11 support we cannot check here.
Buffers are torch CUDA tensors (torch is a qatcheck dependency), so no cuda-python is needed.

Written from the TensorRT 10.x / 11.x Python API documentation; its tests
(tests/test_tensorrt_backend.py) run where TensorRT and a GPU exist.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from qatcheck.backends import trt_plan
from qatcheck.backends.base import Backend, BuildContext, Runner, TimedCall
from qatcheck.backends.trt_audit import PrecisionAudit, parse_engine_info
from qatcheck.errors import ArtifactError, ConfigError


def _trt():
    import tensorrt as trt

    return trt


def _logger():
    trt = _trt()
    if not hasattr(_logger, "obj"):
        _logger.obj = trt.Logger(trt.Logger.WARNING)
    return _logger.obj


def gpu_capability() -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_calibrator(cal: trt_plan.CalibrationPlan, batches: Iterable[np.ndarray], cache_path: Path):
    """An instance of TensorRT's calibrator class named by the plan, fed from ``batches``."""
    import torch

    trt = _trt()
    base = getattr(trt, cal.calibrator_class)

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._it = iter(batches)
            self._left = cal.batches
            self._buf = None

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is in the tensor shape

        def get_batch(self, names, *args):
            if self._left <= 0:
                return None
            try:
                x = next(self._it)
            except StopIteration:
                return None
            self._left -= 1
            if tuple(x.shape) != tuple(cal.batch_shape):
                raise ArtifactError(f"calibration batch of shape {tuple(x.shape)} differs from the input "
                                    f"shape {cal.batch_shape} the engine is calibrated at")
            self._buf = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
            return [int(self._buf.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.exists() else None

        def write_calibration_cache(self, cache) -> None:
            _atomic_write(cache_path, bytes(cache))

        if cal.quantile is not None:  # IInt8LegacyCalibrator (percentile)
            def get_quantile(self) -> float:
                return float(cal.quantile)

            def get_regression_cutoff(self) -> float:
                return float(cal.regression_cutoff or 1.0)

            def read_histogram_cache(self, length):
                return None

            def write_histogram_cache(self, ptr, length) -> None:
                return None

    return Calibrator()


def build_engine(plan: trt_plan.BuildPlan, onnx_path: Path,
                 calib_batches: Iterable[np.ndarray] | None, calib_cache: Path | None) -> bytes:
    """Serialized engine for ``plan`` from ``onnx_path``."""
    trt = _trt()
    builder = trt.Builder(_logger())
    flags = 0
    NF = trt.NetworkDefinitionCreationFlag
    if plan.trt_version[0] < 10 and hasattr(NF, "EXPLICIT_BATCH"):
        flags |= 1 << int(NF.EXPLICIT_BATCH)
    if plan.strongly_typed and hasattr(NF, "STRONGLY_TYPED"):  # on 11 it is the only behaviour
        flags |= 1 << int(NF.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the precision audit needs it
    if plan.builder_optimization_level is not None:
        config.builder_optimization_level = plan.builder_optimization_level
    for flag in plan.builder_flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise ConfigError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (plan: {trt_plan.describe(plan)})")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for prof in plan.profiles:
        p = builder.create_optimization_profile()
        p.set_shape(prof.input, prof.min, prof.opt, prof.max)
        config.add_optimization_profile(p)
    if plan.pins:
        names = [network.get_layer(i).name for i in range(network.num_layers)]
        missing = trt_plan.unmatched_pins(plan, names)
        if missing:
            raise ConfigError(f"keep_precision name(s) {', '.join(map(repr, missing))} match no TensorRT layer "
                              f"of {onnx_path.name}; layers look like {', '.join(names[:6])}")
        floating = {trt.DataType.FLOAT, trt.DataType.HALF}
        dtype = {"fp32": trt.DataType.FLOAT, "fp16": trt.DataType.HALF}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            pin = plan.pin_for(layer.name)
            outs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if pin is None or not outs or any(o.dtype not in floating for o in outs):
                continue  # shape/index layers keep their integer types
            layer.precision = dtype[pin.precision]
            for j in range(layer.num_outputs):
                layer.set_output_type(j, dtype[pin.precision])
    if plan.calibration is not None:
        if calib_batches is None:
            raise ConfigError(f"mode {plan.mode!r} calibrates in TensorRT but no calibration batches were given")
        config.int8_calibrator = make_calibrator(plan.calibration, calib_batches, calib_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT could not build an engine for {onnx_path.name} "
                            f"({trt_plan.describe(plan)}); see the TensorRT log above")
    return bytes(serialized)


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_bytes: bytes, plan: trt_plan.BuildPlan, cuda_graph: str = "auto") -> None:
        import torch

        trt = _trt()
        self._torch = torch
        self.plan = plan
        self.cuda_graph = cuda_graph
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialize the cached engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT]
        if len(self.inputs) != 1:
            raise ArtifactError(f"the engine has {len(self.inputs)} inputs ({self.inputs}); qatcheck feeds one")
        self._dtypes = {n: torch.from_numpy(np.zeros(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                        for n in names}
        self._buffers: dict[str, Any] = {}
        self._shape: tuple[int, ...] | None = None
        self.stream = torch.cuda.Stream()
        self._audit: PrecisionAudit | None = None

    @property
    def device(self) -> str:
        return "cuda:0"

    # ---- execution ------------------------------------------------------------------------
    def _prepare(self, x: np.ndarray):
        torch = self._torch
        name = self.inputs[0]
        shape = tuple(int(d) for d in x.shape)
        if shape != self._shape:
            if not self.context.set_input_shape(name, shape):
                raise ArtifactError(f"input shape {shape} is outside the engine's profile "
                                    f"({trt_plan.describe(self.plan)})")
            self._buffers = {name: torch.empty(shape, dtype=self._dtypes[name], device="cuda")}
            for out in self.outputs:
                oshape = tuple(self.context.get_tensor_shape(out))
                self._buffers[out] = torch.empty(oshape, dtype=self._dtypes[out], device="cuda")
            for n, t in self._buffers.items():
                self.context.set_tensor_address(n, int(t.data_ptr()))
            self._shape = shape
        self._buffers[name].copy_(torch.from_numpy(np.ascontiguousarray(x)))

    def _execute(self) -> None:
        stream = self._torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execute_async_v3 failed")

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            self._prepare(x)
            self._execute()
            outs = [self._buffers[o].float().cpu() for o in self.outputs]
        self.stream.synchronize()
        return [o.numpy() for o in outs]

    def timed_call(self, x: np.ndarray) -> TimedCall:
        from qatcheck.backends import cuda_timing

        torch = self._torch
        with torch.cuda.stream(self.stream):
            self._prepare(x)
            self._execute()  # TensorRT must run once after a shape change before graph capture
        self.stream.synchronize()
        return cuda_timing.timed_call(self._execute, self.cuda_graph)

    # ---- introspection --------------------------------------------------------------------
    def engine_information(self) -> str:
        trt = _trt()
        inspector = self.engine.create_engine_inspector()
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)

    @property
    def audit(self) -> PrecisionAudit:
        if self._audit is None:
            self._audit = parse_engine_info(self.engine_information(),
                                            source=f"engine inspector JSON of {self.plan.cache_key}")
        return self._audit

    def versions(self) -> dict[str, str]:
        trt = _trt()
        return {"tensorrt": trt.__version__, "trt_build": self.plan.cache_key,
                "timing": "cuda-graph" if self.cuda_graph != "off" else "cuda-events"}


class TensorRTBackend(Backend):
    name = "tensorrt"
    #: its runners carry an engine precision audit (qcase.check_precision)
    audits_precision = True

    def __init__(self, options=None) -> None:
        self.ptq_form = getattr(options, "trt_ptq", "auto")
        self.cuda_graph = getattr(options, "cuda_graph", "auto")
        self.built: list[str] = []
        self.reused: list[str] = []

    def unavailable_reason(self) -> str | None:
        try:
            import tensorrt as trt
        except Exception as exc:  # the PyPI stub raises on import without its index
            return f"TensorRT is not installed here ({type(exc).__name__}: {exc})"
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch is a dependency
            return f"torch is not importable ({exc}); the TensorRT runner keeps its buffers in torch"
        if not torch.cuda.is_available():
            return f"TensorRT {trt.__version__} is installed but torch sees no CUDA device"
        v = trt_plan.parse_version(trt.__version__)
        if v[:2] < trt_plan.MIN_TRT:
            return (f"TensorRT {trt.__version__} is older than {trt_plan.version_str(trt_plan.MIN_TRT)}, "
                    "the oldest qatcheck drives")
        return None

    def plan(self, context: BuildContext) -> trt_plan.BuildPlan:
        trt = _trt()
        r = context.recipe
        source = trt_plan.onnx_source(context.mode, trt.__version__, self.ptq_form)
        art = context.onnx_artifact(source)
        return trt_plan.plan_build(
            context.mode, trt.__version__, r.quant, r.input, {source: art.digest}, gpu_capability(),
            ptq_form=self.ptq_form, calib_id=context.calib_id, dynamic=context.dynamic,
            builder_optimization_level=context.builder_optimization_level)

    def runner(self, context: BuildContext) -> Runner:
        if context is None:
            raise ConfigError("the TensorRT backend needs a BuildContext (mode, recipe, cache) to plan a build")
        plan = self.plan(context)
        onnx_path = Path(context.onnx_artifact(plan.onnx_mode).path)
        root = Path(context.cache_dir) / "tensorrt"
        engine_path = root / plan.engine_filename(context.recipe.name)
        if context.use_cache and engine_path.exists():
            data = engine_path.read_bytes()
            self.reused.append(engine_path.name)
        else:
            calib_cache = root / plan.calibration.cache_file if plan.calibration else None
            if calib_cache is not None and not context.use_cache and calib_cache.exists():
                calib_cache.unlink()
            batches = context.calib_batches() if (plan.calibration and context.calib_batches) else None
            data = build_engine(plan, onnx_path, batches, calib_cache)
            _atomic_write(engine_path, data)
            self.built.append(engine_path.name)
        runner = TrtRunner(data, plan, self.cuda_graph)
        sidecar = engine_path.with_suffix(".json")
        if not sidecar.exists():
            info = {"plan": plan.to_dict(), "describe": trt_plan.describe(plan), "onnx": str(onnx_path)}
            try:
                info["audit"] = runner.audit.summary()
            except Exception as exc:  # the audit is a report aid; never fail the build on it
                info["audit_error"] = f"{type(exc).__name__}: {exc}"
            _atomic_write(sidecar, json.dumps(info, indent=1, default=list).encode())
        return runner
