"""TensorRT backend on Polygraphy: applies a :class:`~qatcheck.backends.trt_plan.BuildPlan` with
Polygraphy's loaders, caches the engine, runs it with Polygraphy's ``TrtRunner`` and times it.

Nothing is decided here: which ONNX, network flags, builder flags, calibrator, pinned layers,
profiles and cache keys all come from ``trt_plan.plan_build`` and ``trt_plan.polygraphy_loader_args``
(tested without TensorRT). Polygraphy is NVIDIA's maintained layer over TensorRT's changing API
(``NetworkFromOnnxPath`` with strong typing, ``CreateConfig`` with flags and a calibrator with a
cache on <= 10, ``EngineBytesFromNetwork``, ``TrtRunner``), so this module is loader calls plus the
two things Polygraphy leaves to its caller:

* per-layer precision pins (``partial`` on <= 10) - a ``PostprocessNetwork`` step, because a pin
  names a PyTorch module or an ONNX node prefix (``trt_plan.layer_matches``), not a layer;
* the timed call - CUDA events or a CUDA-graph replay of ``execute_async_v3`` on torch's stream,
  with buffers qatcheck owns (Polygraphy's ``inference_time`` is host wall-clock around ``infer``).

Inference goes through the runner path ONNX Runtime shares (:mod:`.polygraphy_runner`), fed with
torch CUDA tensors (torch is a qatcheck dependency; Polygraphy hands torch outputs back for them).
Written from the Polygraphy 0.53 and TensorRT 10.x / 11.x API documentation; its tests
(tests/test_tensorrt_backend.py) run where TensorRT and a GPU exist - nowhere in this project's CI.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from qatcheck.backends import trt_plan
from qatcheck.backends.base import Backend, BuildContext, Runner, TimedCall
from qatcheck.backends.polygraphy_runner import PolygraphyRunner, quiet_polygraphy
from qatcheck.backends.trt_audit import PrecisionAudit, parse_engine_info
from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.fsutil import atomic_path


def _trt():
    import tensorrt as trt

    return trt


def gpu_capability() -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:  # a killed writer's temp file is one cache prune removes
        tmp.write_bytes(data)


def calibration_feed(cal: trt_plan.CalibrationPlan, batches: Iterable[np.ndarray]) -> Iterator[dict]:
    """The calibration batches as Polygraphy's calibrator wants them (``{input: array}``), at most
    ``cal.batches`` of them, each of the shape the engine is calibrated at."""
    for i, x in enumerate(batches):
        if i >= cal.batches:
            return
        if tuple(x.shape) != tuple(cal.batch_shape):
            raise ArtifactError(f"calibration batch of shape {tuple(x.shape)} differs from the input "
                                f"shape {cal.batch_shape} the engine is calibrated at")
        yield {cal.input: np.ascontiguousarray(x, dtype=np.float32)}


def apply_pins(plan: trt_plan.BuildPlan, network, source: str = "the ONNX",
               pinned: dict[str, str] | None = None) -> None:
    """Keep the plan's pinned layers in their precision (``ILayer.precision`` and output types;
    ``OBEY_PRECISION_CONSTRAINTS`` in the plan's flags makes TensorRT honour them). A pin that
    matches no layer is an error naming it: a silent no-op would build plain int8. ``pinned``
    collects the layers pinned (name -> precision)."""
    trt = _trt()
    names = [network.get_layer(i).name for i in range(network.num_layers)]
    missing = trt_plan.unmatched_pins(plan, names)
    if missing:
        raise ConfigError(f"keep_precision name(s) {', '.join(map(repr, missing))} match no TensorRT layer "
                          f"of {source}; layers look like {', '.join(names[:6])}")
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
        if pinned is not None:
            pinned[layer.name] = pin.precision


def network_loader(plan: trt_plan.BuildPlan, onnx_path: Path, debug_tensors: Sequence[str] = (),
                   pinned: dict[str, str] | None = None):
    """Polygraphy's network loader for ``plan``: the ONNX parsed (strongly typed where the plan says),
    the pins applied (collected into ``pinned``), and ``debug_tensors`` marked as TensorRT debug
    tensors (localization)."""
    from polygraphy.backend.trt import MarkDebug, NetworkFromOnnxPath, PostprocessNetwork

    args = trt_plan.polygraphy_loader_args(plan)
    network = NetworkFromOnnxPath(str(onnx_path), **args["network"])
    if plan.pins:
        network = PostprocessNetwork(network, lambda network: apply_pins(plan, network, onnx_path.name, pinned),
                                     name="qatcheck keep_precision pins")
    if debug_tensors:
        network = MarkDebug(network, list(debug_tensors))
    return network


def build_engine(plan: trt_plan.BuildPlan, onnx_path: Path, calib_batches: Iterable[np.ndarray] | None,
                 calib_cache: Path | None, debug_tensors: Sequence[str] = (),
                 pinned: dict[str, str] | None = None) -> bytes:
    """Serialized engine for ``plan`` from ``onnx_path``, built by Polygraphy's loaders (the layers
    the pins matched are collected into ``pinned``)."""
    from polygraphy.backend.trt import Calibrator, CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    trt = _trt()
    quiet_polygraphy()
    args = trt_plan.polygraphy_loader_args(plan)
    calibrator = None
    if args["calibrator"] is not None:
        if calib_batches is None:
            raise ConfigError(f"mode {plan.mode!r} calibrates in TensorRT but no calibration batches were given")
        cal_args = dict(args["calibrator"])
        base = getattr(trt, cal_args.pop("BaseClass"), None)
        if base is None:
            raise ConfigError(f"TensorRT {trt.__version__} has no {plan.calibration.calibrator_class} "
                              f"(plan: {trt_plan.describe(plan)})")
        cal_args["cache"] = str(calib_cache) if calib_cache is not None else None
        calibrator = Calibrator(calibration_feed(plan.calibration, calib_batches), BaseClass=base, **cal_args)
    profiles = [Profile().add(p.input, min=p.min, opt=p.opt, max=p.max) for p in plan.profiles] or None
    config = CreateConfig(**args["config"], calibrator=calibrator, profiles=profiles,
                          # the precision audit reads per-layer precisions from the inspector
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    try:
        return bytes(EngineBytesFromNetwork(network_loader(plan, onnx_path, debug_tensors, pinned), config)())
    except PolygraphyException as exc:
        raise ArtifactError(f"TensorRT could not build an engine for {onnx_path.name} "
                            f"({trt_plan.describe(plan)}): {exc}") from exc


class TrtRunner(PolygraphyRunner):
    """An engine through Polygraphy's ``TrtRunner`` (inference, debug tensors) plus a timed call
    over the same execution context."""

    backend = "tensorrt"

    def __init__(self, engine_bytes: bytes, plan: trt_plan.BuildPlan, cuda_graph: str = "auto",
                 output_names: Sequence[str] | None = None, label: str = "") -> None:
        import torch
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self._torch = torch
        self.plan = plan
        self.cuda_graph = cuda_graph
        self._audit: PrecisionAudit | None = None
        self._timing_buffers: dict[str, Any] = {}
        #: set by the backend: the ONNX built from, TensorRT's calibration cache, the pinned layers
        self.artifact_path: Path | None = None
        self.calibration_cache: Path | None = None
        self.pinned_layers: dict[str, str] = {}
        super().__init__(PolygraphyTrtRunner(EngineFromBytes(engine_bytes)), None, output_names,
                         label or f"the TensorRT engine {plan.cache_key}")
        if self.input_name is None:
            raise ArtifactError(f"{self.label} has {len(self.input_names)} inputs ({self.input_names}); "
                                "qatcheck feeds one")

    @property
    def engine(self):
        return self.polygraphy_runner.engine

    @property
    def context(self):
        return self.polygraphy_runner.context

    @property
    def device(self) -> str:
        return "cuda:0"

    def feed(self, x: np.ndarray):
        # a CUDA tensor: Polygraphy binds it in place and hands torch tensors back
        return self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()

    # ---- timing -----------------------------------------------------------------------------
    def timed_call(self, x: np.ndarray) -> TimedCall:
        """``execute_async_v3`` on torch's current stream over buffers bound once (CUDA-graph
        replay or eager events, see :mod:`qatcheck.backends.cuda_timing`). Fixed output addresses
        rather than Polygraphy's output allocator: a graph replays from fixed addresses."""
        from qatcheck.backends import cuda_timing

        torch, trt, ctx = self._torch, _trt(), self.context
        shape = tuple(int(d) for d in x.shape)
        if not ctx.set_input_shape(self.input_name, shape):
            raise ArtifactError(f"input shape {shape} is outside the engine's profile "
                                f"({trt_plan.describe(self.plan)})")
        buffers = {self.input_name: self.feed(x)}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = torch.from_numpy(np.zeros(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                buffers[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
        for name, t in buffers.items():
            ctx.set_tensor_address(name, int(t.data_ptr()))
        self._timing_buffers = buffers  # alive as long as the call may replay from them

        def execute() -> None:
            if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise ArtifactError("TensorRT execute_async_v3 failed")
        execute()  # TensorRT must run once after a shape change before graph capture
        torch.cuda.synchronize()
        return cuda_timing.timed_call(execute, self.cuda_graph)

    # ---- introspection ----------------------------------------------------------------------
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

    def polygraphy_run_args(self, bundle: Path) -> list[str]:
        """``polygraphy run`` flags that build this engine the way the plan did; TensorRT's
        calibration cache is copied into the reproduction ``bundle`` (replaying it needs no data)."""
        cache = None
        if self.calibration_cache is not None and self.calibration_cache.exists():
            cache = Path(bundle) / "calibration.cache"
            shutil.copyfile(self.calibration_cache, cache)
        return trt_plan.polygraphy_cli_args(self.plan, cache, self.pinned_layers)

    def versions(self) -> dict[str, str]:
        import polygraphy

        trt = _trt()
        return {"tensorrt": trt.__version__, "polygraphy": polygraphy.__version__,
                "trt_build": self.plan.cache_key,
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
        import polygraphy

        trt = _trt()
        r = context.recipe
        source = trt_plan.onnx_source(context.mode, trt.__version__, self.ptq_form)
        art = context.onnx_artifact(source)
        return trt_plan.plan_build(
            context.mode, trt.__version__, r.quant, r.input, {source: art.digest}, gpu_capability(),
            ptq_form=self.ptq_form, calib_id=context.calib_id, dynamic=context.dynamic,
            builder_optimization_level=context.builder_optimization_level,
            builder=f"polygraphy {polygraphy.__version__}")

    def debug_tensors(self, context: BuildContext):
        """Localization's source of the engine's intermediate values (TensorRT >= 10 debug
        tensors): ``factory(names)`` builds the case's plan again with ``names`` marked as debug
        tensors (Polygraphy's ``MarkDebug``) and returns ``batch -> {name: array}`` through
        Polygraphy's ``TrtRunner``, whose debug listener merges them into its outputs. Marking a
        tensor keeps it from being fused away, so this engine may pick other kernels than the
        deployed one; the values are still TensorRT's arithmetic on the same plan."""
        def factory(names: Sequence[str]):
            plan = self.plan(context)
            onnx_path = Path(context.onnx_artifact(plan.onnx_mode).path)
            root = Path(context.cache_dir) / "tensorrt"
            calib_cache = root / plan.calibration.cache_file if plan.calibration else None
            batches = context.calib_batches() if (plan.calibration and context.calib_batches) else None
            data = build_engine(plan, onnx_path, batches, calib_cache, debug_tensors=names)
            runner = TrtRunner(data, plan, "off", None, label=f"{plan.mode} engine with {len(names)} debug tensors")
            return runner.named_outputs
        return factory

    def runner(self, context: BuildContext) -> Runner:
        if context is None:
            raise ConfigError("the TensorRT backend needs a BuildContext (mode, recipe, cache) to plan a build")
        plan = self.plan(context)
        onnx_path = Path(context.onnx_artifact(plan.onnx_mode).path)
        root = Path(context.cache_dir) / "tensorrt"
        engine_path = root / plan.engine_filename(context.recipe.name)
        sidecar = engine_path.with_suffix(".json")
        calib_cache = root / plan.calibration.cache_file if plan.calibration else None
        pinned: dict[str, str] = {}
        if context.use_cache and engine_path.exists():
            data = engine_path.read_bytes()
            self.reused.append(engine_path.name)
            if sidecar.exists():
                pinned = json.loads(sidecar.read_text()).get("pinned_layers", {})
        else:
            if calib_cache is not None and not context.use_cache and calib_cache.exists():
                calib_cache.unlink()
            batches = context.calib_batches() if (plan.calibration and context.calib_batches) else None
            data = build_engine(plan, onnx_path, batches, calib_cache, pinned=pinned)
            _atomic_write(engine_path, data)
            sidecar.unlink(missing_ok=True)
            self.built.append(engine_path.name)
        runner = TrtRunner(data, plan, self.cuda_graph, context.recipe.output_names,
                           label=f"the TensorRT engine {engine_path.name}")
        #: what the reproduction bundle hands to ``polygraphy run --trt``: the ONNX the engine was
        #: built from, the cache TensorRT calibrated with, the layers the pins matched
        runner.artifact_path, runner.calibration_cache, runner.pinned_layers = onnx_path, calib_cache, pinned
        if not sidecar.exists():
            info = {"plan": plan.to_dict(), "describe": trt_plan.describe(plan), "onnx": str(onnx_path),
                    "pinned_layers": pinned}
            try:
                info["audit"] = runner.audit.summary()
            except Exception as exc:  # the audit is a report aid; never fail the build on it
                info["audit_error"] = f"{type(exc).__name__}: {exc}"
            _atomic_write(sidecar, json.dumps(info, indent=1, default=list).encode())
        return runner
