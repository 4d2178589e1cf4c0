"""What to build with TensorRT, decided without TensorRT.

Every decision the TensorRT backend makes lives here as pure functions over plain data, so it is
tested on machines that have no GPU and no TensorRT (tests/test_trt_plan.py): which ONNX file a
mode builds from, network creation flags (strong typing), builder flags, the calibrator class and
its settings, which layers are pinned to which precision, optimization profiles, and the engine
and calibration cache keys. The adapter (``tensorrt_backend.py``) only applies a :class:`BuildPlan`
through the TensorRT API.

TensorRT versions (from the TensorRT 10.x -> 11.x migration guide):

* <= 10: weakly typed networks with ``BuilderFlag.FP16`` / ``INT8``; implicit INT8 calibration
  through ``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator`` / ``IInt8LegacyCalibrator``
  (percentile) with a calibration cache; per-layer precision (``ILayer.precision``,
  ``set_output_type``) enforced by ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``; explicit Q/DQ
  networks build with ``BuilderFlag.INT8``.
* >= 11: every network is strongly typed. ``BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS``,
  ``IBuilderConfig.int8_calibrator`` and the calibration profile are removed: precision comes
  from the graph (fp16 ONNX, explicit Q/DQ). qatcheck already writes both (the ``fp16`` ONNX with
  fp32 I/O, and the ONNX-level PTQ Q/DQ ONNX of ``trt_ptq`` / ``partial``), so 11 builds those.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

from qatcheck.errors import ConfigError
from qatcheck.modes import FP8_MIN_CAPABILITY, MODE_SPECS, spec as mode_spec
from qatcheck.registry import DEFAULT_ONNX_QUANTIZER, ONNX_QUANTIZERS

#: how ``trt_ptq`` / ``partial`` are built: ``auto`` = TensorRT's own calibrator where the version
#: has one (<= 10), else the Q/DQ ONNX; ``native`` = TensorRT's calibrator (legacy, <= 10 only);
#: ``qdq`` = always the Q/DQ ONNX from qatcheck's ONNX-level PTQ. Any other form names a registered
#: ONNX quantizer (qatcheck.registry.ONNX_QUANTIZERS: ``modelopt``, a user's) that writes the Q/DQ
#: ONNX instead: built like qdq (which tool wrote the graph is the artifact's business: its digest
#: keys the engine).
TRT_PTQ_FORMS: tuple[str, ...] = ("auto", "native", "qdq")


def check_ptq_form(form: str) -> str:
    """``form`` if it is a TensorRT form or a registered ONNX quantizer's name, else one error."""
    if form in TRT_PTQ_FORMS or form in ONNX_QUANTIZERS:
        return form
    raise ConfigError(f"--qatcheck-trt-ptq {form!r} is unknown; choose one of {', '.join(TRT_PTQ_FORMS)} "
                      f"or a registered ONNX quantizer ({', '.join(ONNX_QUANTIZERS.names())}; "
                      "qatcheck.registry.register_onnx_quantizer adds one)")


def _writer(form: str) -> str | None:
    """The ONNX quantizer other than qatcheck's that a form has write the Q/DQ graph, if any."""
    return form if form in ONNX_QUANTIZERS and form != DEFAULT_ONNX_QUANTIZER else None


#: QuantSettings.calibrator -> TensorRT's implicit INT8 calibrator class (TensorRT <= 10).
NATIVE_CALIBRATORS: Mapping[str, str] = {
    "entropy": "IInt8EntropyCalibrator2",
    "minmax": "IInt8MinMaxCalibrator",
    "percentile": "IInt8LegacyCalibrator",
}

#: the oldest TensorRT the adapter drives: named-tensor I/O (set_input_shape, set_tensor_address,
#: execute_async_v3) arrived in 8.5.
MIN_TRT = (8, 5)
#: first major version without precision flags, calibrators or per-layer precision
TRT_STRONGLY_TYPED_ONLY = 11
#: first version with NetworkDefinitionCreationFlag.STRONGLY_TYPED
TRT_HAS_STRONG_TYPING = (9, 0)



def parse_version(version: str | Sequence[int]) -> tuple[int, int, int]:
    """``"10.3.0.26"`` -> (10, 3, 0); tuples pass through (padded to three numbers)."""
    if isinstance(version, str):
        nums = re.findall(r"\d+", version)
        if not nums:
            raise ConfigError(f"cannot read a TensorRT version from {version!r}")
        parts = [int(n) for n in nums[:3]]
    else:
        parts = [int(v) for v in tuple(version)[:3]]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def version_str(v: Sequence[int]) -> str:
    return ".".join(str(int(x)) for x in v)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min / opt / max shapes of one input."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class CalibrationPlan:
    """TensorRT's implicit INT8 calibration (TensorRT <= 10 only)."""

    calibrator: str  # QuantSettings.calibrator: entropy | minmax | percentile
    calibrator_class: str  # tensorrt class name, e.g. IInt8EntropyCalibrator2
    batches: int
    batch_shape: tuple[int, ...]
    input: str
    #: IInt8LegacyCalibrator: histogram quantile (percentile / 100) and regression cutoff
    quantile: float | None = None
    regression_cutoff: float | None = None
    #: file name of the calibration cache (inside the engine cache directory)
    cache_file: str = ""


@dataclass(frozen=True)
class LayerPin:
    """Keep the layers ``match`` names in ``precision`` (ILayer.precision + output types).

    ``match`` is a recipe name: a PyTorch module name (``"stem.conv"``, matching every layer
    exported from that module and its children) or an ONNX node name (``"/stem/conv/Conv"``).
    TensorRT's ONNX parser names layers after their ONNX nodes, so both work on layer names.
    """

    match: str
    precision: str = "fp32"


@dataclass(frozen=True)
class BuildPlan:
    mode: str
    trt_version: tuple[int, int, int]
    gpu_capability: tuple[int, int]
    #: which of qatcheck's ONNX artifacts to parse: ArtifactBuilder.onnx_artifact(onnx_mode)
    onnx_mode: str
    onnx_digest: str
    #: what the engine is expected to compute in: fp32 | fp16 | int8
    precision: str
    #: none | implicit (TensorRT calibrator) | explicit (Q/DQ in the graph)
    quantization: str
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    calibration: CalibrationPlan | None = None
    pins: tuple[LayerPin, ...] = ()
    profiles: tuple[Profile, ...] = ()
    builder_optimization_level: int | None = None
    #: identity of the calibration data (its fingerprint): part of the key of implicit builds
    calib_id: str = ""
    notes: tuple[str, ...] = ()
    #: what applies the plan (the adapter's loader library and version, "polygraphy 0.53.6"): its
    #: defaults shape the builder config, so an upgrade rebuilds the engines
    builder: str = ""

    # ---- keys -----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes the engine, apart from the ONNX, TensorRT version and GPU."""
        return {"mode": self.mode, "onnx_mode": self.onnx_mode, "precision": self.precision,
                "quantization": self.quantization, "strongly_typed": self.strongly_typed,
                "builder_flags": sorted(self.builder_flags),
                "calibration": asdict(self.calibration) if self.calibration else None,
                "calib_id": self.calib_id if self.calibration else "",
                "pins": [asdict(p) for p in self.pins],
                "profiles": [asdict(p) for p in self.profiles],
                "builder_optimization_level": self.builder_optimization_level,
                **({"builder": self.builder} if self.builder else {})}

    def key_parts(self) -> dict[str, Any]:
        return {"onnx": self.onnx_digest, "settings": self.settings(),
                "tensorrt": version_str(self.trt_version),
                "gpu_capability": f"{self.gpu_capability[0]}.{self.gpu_capability[1]}"}

    @property
    def cache_key(self) -> str:
        blob = json.dumps(self.key_parts(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def engine_filename(self, recipe: str) -> str:
        major, minor = self.gpu_capability
        return (f"{recipe}-{self.mode}-trt{version_str(self.trt_version)}-sm{major}{minor}-"
                f"{self.cache_key}.engine")

    def to_dict(self) -> dict[str, Any]:
        return {**self.key_parts(), "cache_key": self.cache_key, "notes": list(self.notes)}

    # ---- pins -----------------------------------------------------------------------------
    def pin_for(self, layer_name: str) -> LayerPin | None:
        for pin in self.pins:
            if layer_matches(pin.match, layer_name):
                return pin
        return None


def layer_matches(entry: str, layer_name: str) -> bool:
    """Does recipe name ``entry`` (module or ONNX node name) cover TensorRT layer ``layer_name``?

    Same rule as the ONNX-level PTQ's ``exclude`` (qatcheck.quantize.onnx_ptq), so ``partial`` keeps
    the same layers whichever way it is built.
    """
    from qatcheck.quantize.onnx_ptq import module_name_of

    if entry == layer_name:
        return True
    if "/" in entry:
        return layer_name.startswith(entry.rstrip("/") + "/")
    module = module_name_of(layer_name)
    return bool(module) and (module == entry or module.startswith(entry + "."))


def unmatched_pins(plan: BuildPlan, layer_names: Iterable[str]) -> list[str]:
    """Pins that match no layer of the parsed network: a typo or a renamed layer, which the
    adapter reports as an error naming the entry (a silent no-op would build plain int8)."""
    names = list(layer_names)
    return [p.match for p in plan.pins if not any(layer_matches(p.match, n) for n in names)]


# ---- the decisions ------------------------------------------------------------------------------
def legacy_on_11_error(mode: str, version: Sequence[int], what: str) -> ConfigError:
    return ConfigError(
        f"mode {mode!r}: {what} needs TensorRT's implicit INT8 path, which TensorRT "
        f"{version_str(version)} no longer has - TensorRT 11 removed the INT8 calibrators "
        "(IBuilderConfig.int8_calibrator, IInt8EntropyCalibrator2/MinMax/Legacy), the INT8/FP16 "
        "builder flags and per-layer precision constraints (OBEY_PRECISION_CONSTRAINTS): every network "
        "is strongly typed and takes its int8 from explicit Q/DQ. Use --qatcheck-trt-ptq qdq (or "
        "auto), which builds the Q/DQ ONNX written by qatcheck's ONNX-level PTQ with the recipe's "
        "calibrator, or run TensorRT <= 10 for the native calibrators.")


def resolve_ptq_form(form: str, version: Sequence[int], mode: str) -> str:
    """``native`` or ``qdq`` for trt_ptq / partial on this TensorRT version."""
    check_ptq_form(form)
    major = parse_version(version)[0]
    if form == "auto":
        return "native" if major < TRT_STRONGLY_TYPED_ONLY else "qdq"
    if form in ONNX_QUANTIZERS:
        return "qdq"
    if form == "native" and major >= TRT_STRONGLY_TYPED_ONLY:
        what = ("per-layer precision constraints (the native 'partial')" if mode_spec(mode).keeps_layers
                else "TensorRT's own calibrator (--qatcheck-trt-ptq native)")
        raise legacy_on_11_error(mode, version, what)
    return form


def profiles_for(mode: str, input_spec, dynamic: bool = False) -> tuple[Profile, ...]:
    """One profile from ``InputSpec.profile()`` for a dynamic-axes build (the ``dynamic`` mode, or
    any mode's dynamic variant); static builds need none."""
    if not (dynamic or mode_spec(mode).profile_only) or not input_spec.dynamic:
        return ()
    p = input_spec.profile()
    return (Profile(input_spec.name, tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])),)


def calibration_for(quant, input_spec, version: Sequence[int], calib_id: str,
                    fp32_digest: str) -> CalibrationPlan:
    cls = NATIVE_CALIBRATORS.get(quant.calibrator)
    if cls is None:
        raise ConfigError(f"QuantSettings.calibrator {quant.calibrator!r} has no TensorRT calibrator; "
                          f"choose one of {', '.join(NATIVE_CALIBRATORS)}")
    legacy = quant.calibrator == "percentile"
    # the calibration cache holds per-tensor scales: portable across GPUs, not across TensorRT
    # versions, models or calibration data
    key = hashlib.sha256(json.dumps(
        [fp32_digest, cls, quant.percentile if legacy else None, quant.calib_batches,
         list(input_spec.shape), calib_id, version_str(parse_version(version))]).encode()).hexdigest()[:16]
    return CalibrationPlan(
        calibrator=quant.calibrator, calibrator_class=cls, batches=int(quant.calib_batches),
        batch_shape=tuple(input_spec.shape), input=input_spec.name,
        quantile=quant.percentile / 100.0 if legacy else None,
        regression_cutoff=1.0 if legacy else None,
        cache_file=f"calib-{cls}-{key}.cache")


def plan_build(mode: str, trt_version: str | Sequence[int], quant, input_spec,
               onnx_digests: Mapping[str, str], gpu_capability: Sequence[int], *,
               ptq_form: str = "auto", calib_id: str = "", dynamic: bool = False,
               builder_optimization_level: int | None = None, builder: str = "") -> BuildPlan:
    """The build for ``mode`` on TensorRT ``trt_version`` and a GPU of ``gpu_capability``.

    ``quant`` is the recipe's :class:`~qatcheck.recipe.QuantSettings`, ``input_spec`` its
    :class:`~qatcheck.recipe.InputSpec`. ``onnx_digests`` maps an ONNX mode to the digest of that
    artifact; it must hold the digest of the mode the plan builds from (:func:`onnx_source`), so
    the caller asks ``onnx_source`` first and builds only that artifact. ``dynamic``: the ONNX has
    the recipe's dynamic axes (one optimization profile from its min / opt / max).
    """
    spec = mode_spec(mode)
    v = parse_version(trt_version)
    if v[:2] < MIN_TRT:
        raise ConfigError(f"TensorRT {version_str(v)} is older than {version_str(MIN_TRT)}, the oldest "
                          "qatcheck drives (named-tensor I/O: set_input_shape / execute_async_v3)")
    cap = tuple(int(c) for c in gpu_capability)[:2]
    if len(cap) != 2:
        raise ConfigError(f"gpu_capability must be (major, minor); got {gpu_capability!r}")
    source = onnx_source(mode, v, ptq_form)
    digest = onnx_digests.get(source)
    if not digest:
        raise ConfigError(f"plan_build({mode!r}) builds from the {source!r} ONNX but got no digest for it "
                          f"(have: {', '.join(sorted(onnx_digests)) or 'none'})")
    major = v[0]
    st_only = major >= TRT_STRONGLY_TYPED_ONLY
    common = dict(mode=mode, trt_version=v, gpu_capability=cap, onnx_mode=source, onnx_digest=digest,
                  profiles=profiles_for(mode, input_spec, dynamic),
                  builder_optimization_level=builder_optimization_level, builder=builder)
    if spec.precision == "fp32":
        return BuildPlan(precision="fp32", quantization="none", strongly_typed=st_only,
                         builder_flags=(), **common)
    if spec.precision == "fp16":
        if st_only:
            return BuildPlan(precision="fp16", quantization="none", strongly_typed=True, builder_flags=(),
                             notes=("TensorRT 11 has no FP16 flag: the fp16 ONNX (fp16 weights and "
                                    "compute, fp32 I/O) is built strongly typed",), **common)
        return BuildPlan(precision="fp16", quantization="none", strongly_typed=False,
                         builder_flags=("FP16",),
                         notes=("BuilderFlag.FP16 on the fp32 ONNX: TensorRT picks fp16 kernels where "
                                "faster (trtexec --fp16)",), **common)
    if spec.precision == "fp8":  # FP8 (E4M3) Q/DQ: ModelOpt's graph, built strongly typed
        if cap < FP8_MIN_CAPABILITY:
            raise ConfigError(f"mode {mode!r}: FP8 needs a GPU of compute capability >= "
                              f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada, Hopper); this one is "
                              f"{cap[0]}.{cap[1]}")
        if v[:2] < TRT_HAS_STRONG_TYPING:
            raise ConfigError(f"mode {mode!r}: FP8 Q/DQ needs a strongly typed network (TensorRT >= "
                              f"{version_str(TRT_HAS_STRONG_TYPING)}); this is TensorRT {version_str(v)}")
        return BuildPlan(precision="fp8", quantization="explicit", strongly_typed=True, builder_flags=(),
                         notes=("FP8 Q/DQ built strongly typed, every tensor's type from the graph "
                                "(trtexec --stronglyTyped, as NVIDIA ModelOpt documents for FP8)",), **common)
    if not spec.trt_native_ptq or source == mode:  # explicit Q/DQ in the graph
        writer = ((f"Q/DQ ONNX written by the ONNX quantizer {_writer(ptq_form)!r} "
                   f"(--qatcheck-trt-ptq {ptq_form}), built like qdq",)
                  if spec.trt_native_ptq and _writer(ptq_form) else ())
        if st_only:
            return BuildPlan(precision="int8", quantization="explicit", strongly_typed=True,
                             builder_flags=(), notes=writer, **common)
        return BuildPlan(precision="int8", quantization="explicit", strongly_typed=False,
                         builder_flags=("INT8",),
                         notes=("explicit Q/DQ, weakly typed with BuilderFlag.INT8: layers without Q/DQ "
                                "stay fp32 as in the graph", *writer), **common)
    # trt_ptq / partial through TensorRT's own calibrator (<= 10)
    cal = calibration_for(quant, input_spec, v, calib_id, digest)
    flags: tuple[str, ...] = ("INT8",)
    pins: tuple[LayerPin, ...] = ()
    notes = [f"implicit INT8: {cal.calibrator_class} over {cal.batches} batches of {cal.batch_shape}"]
    if spec.keeps_layers:
        if not quant.keep_precision:
            raise ConfigError("mode 'partial' needs QuantSettings.keep_precision (the layers to keep in "
                              "higher precision); it is empty")
        pins = tuple(LayerPin(name, "fp32") for name in quant.keep_precision)
        flags = ("INT8", "OBEY_PRECISION_CONSTRAINTS")
        notes.append(f"layers kept in fp32 (ILayer.precision, OBEY_PRECISION_CONSTRAINTS): "
                     f"{', '.join(quant.keep_precision)}")
    return BuildPlan(precision="int8", quantization="implicit", strongly_typed=False, builder_flags=flags,
                     calibration=cal, pins=pins, calib_id=calib_id, notes=tuple(notes), **common)


def onnx_source(mode: str, trt_version: str | Sequence[int], ptq_form: str = "auto") -> str:
    """Which ONNX artifact (by mode) the engine of ``mode`` is built from."""
    spec = mode_spec(mode)
    v = parse_version(trt_version)
    if spec.precision == "fp16":
        return mode if v[0] >= TRT_STRONGLY_TYPED_ONLY else "fp32"
    if spec.trt_native_ptq:
        return "fp32" if resolve_ptq_form(ptq_form, v, mode) == "native" else mode
    return mode


#: BuildPlan.builder_flags -> the Polygraphy ``CreateConfig`` keyword that sets it. The plan names
#: TensorRT's flags (what a trtexec user knows); the adapter hands them to Polygraphy, which sets
#: the BuilderFlag and checks the version has it.
POLYGRAPHY_FLAG_ARGS: Mapping[str, tuple[str, Any]] = {
    "FP16": ("fp16", True),
    "INT8": ("int8", True),
    "FP8": ("fp8", True),
    "OBEY_PRECISION_CONSTRAINTS": ("precision_constraints", "obey"),
}


def polygraphy_loader_args(plan: BuildPlan) -> dict[str, dict[str, Any]]:
    """The plan as keyword arguments of Polygraphy's loaders, in plain data (TensorRT enums are
    named, not imported): ``network`` for ``NetworkFromOnnxPath``, ``config`` for ``CreateConfig``
    (without the calibrator, the profiles and the profiling verbosity, which the adapter makes
    from ``plan.calibration``, ``plan.profiles`` and the audit's needs), ``calibrator`` for
    ``polygraphy.backend.trt.Calibrator`` (None: no implicit calibration)."""
    config: dict[str, Any] = {}
    for flag in plan.builder_flags:
        if flag not in POLYGRAPHY_FLAG_ARGS:
            raise ConfigError(f"builder flag {flag!r} has no Polygraphy CreateConfig argument "
                              f"(known: {', '.join(POLYGRAPHY_FLAG_ARGS)}; plan: {describe(plan)})")
        key, value = POLYGRAPHY_FLAG_ARGS[flag]
        config[key] = value
    if plan.builder_optimization_level is not None:
        config["builder_optimization_level"] = int(plan.builder_optimization_level)
    calibrator = None
    if plan.calibration is not None:
        cal = plan.calibration
        calibrator = {"BaseClass": cal.calibrator_class, "cache": cal.cache_file}
        if cal.quantile is not None:  # IInt8LegacyCalibrator (percentile)
            calibrator.update(quantile=float(cal.quantile), regression_cutoff=float(cal.regression_cutoff or 1.0))
    return {"network": {"strongly_typed": bool(plan.strongly_typed)}, "config": config,
            "calibrator": calibrator}


def polygraphy_cli_args(plan: BuildPlan, calibration_cache: Any = None,
                        pinned_layers: Mapping[str, str] | None = None) -> list[str]:
    """``polygraphy run`` flags that rebuild ``plan``'s engine from its ONNX (the reproduction
    bundle's command): ``--trt`` with the plan's precision flags and strong typing, the calibration
    cache TensorRT wrote (``--calibration-cache``: replaying it needs no calibration data), the
    pinned layers by their TensorRT names (``pinned_layers``: layer -> fp32|fp16, as the build
    matched them; a pin names a module, Polygraphy wants layers) and the optimization profile."""
    args = ["--trt"]
    if plan.strongly_typed:
        args.append("--strongly-typed")
    for flag in plan.builder_flags:
        if flag in ("FP16", "INT8", "FP8"):
            args.append("--" + flag.lower())
        elif flag == "OBEY_PRECISION_CONSTRAINTS":
            args += ["--precision-constraints", "obey"]
    if plan.calibration is not None and calibration_cache is not None:
        args += ["--calibration-cache", str(calibration_cache),
                 "--calibration-base-class", plan.calibration.calibrator_class]
        if plan.calibration.quantile is not None:
            args += ["--quantile", f"{plan.calibration.quantile:g}",
                     "--regression-cutoff", f"{plan.calibration.regression_cutoff or 1.0:g}"]
    if pinned_layers:
        dtype = {"fp32": "float32", "fp16": "float16"}
        args += ["--layer-precisions", *(f"{name}:{dtype[p]}" for name, p in pinned_layers.items())]
    for prof in plan.profiles:
        for flag, shape in (("--trt-min-shapes", prof.min), ("--trt-opt-shapes", prof.opt),
                            ("--trt-max-shapes", prof.max)):
            args += [flag, f"{prof.input}:[{','.join(str(int(d)) for d in shape)}]"]
    if plan.builder_optimization_level is not None:
        args += ["--builder-optimization-level", str(int(plan.builder_optimization_level))]
    return args


def plan_matrix(trt_versions: Iterable[str], quant, input_spec, gpu_capability=(9, 0),
                ptq_form: str = "auto") -> dict[tuple[str, str], BuildPlan | str]:
    """Every mode x version: the plan, or the error text. For docs and tests."""
    out: dict[tuple[str, str], BuildPlan | str] = {}
    for ver in trt_versions:
        for mode, spec in MODE_SPECS.items():
            if spec.backends is not None and "tensorrt" not in spec.backends:
                continue
            try:
                digests = {m: f"digest-{m}" for m in MODE_SPECS}
                out[(ver, mode)] = plan_build(mode, ver, quant, input_spec, digests, gpu_capability,
                                              ptq_form=ptq_form)
            except ConfigError as exc:
                out[(ver, mode)] = str(exc)
    return out


def describe(plan: BuildPlan) -> str:
    """A one-line human description of a plan, for reports and logs."""
    bits = [f"TensorRT {version_str(plan.trt_version)}", plan.precision, f"from the {plan.onnx_mode} ONNX",
            "strongly typed" if plan.strongly_typed else "weakly typed"]
    if plan.builder_flags:
        bits.append("flags " + "+".join(plan.builder_flags))
    if plan.calibration:
        bits.append(plan.calibration.calibrator_class)
    if plan.pins:
        bits.append("fp32 pins " + ", ".join(p.match for p in plan.pins))
    if plan.profiles:
        p = plan.profiles[0]
        bits.append(f"profile {p.input} min {p.min} opt {p.opt} max {p.max}")
    return "; ".join(bits)
