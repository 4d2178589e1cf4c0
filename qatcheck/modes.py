"""The mode table: one :class:`ModeSpec` row per mode, and everything else dispatches on it.

Why a table and not if-statements scattered across builders: the suite parametrization, the
artifact builder and its cache keys, the parity references, the TensorRT plan, the sensitivity
paths, the report and the error messages all need the same answers ("can backend B run mode M",
"what does M's artifact depend on", "what is M compared with"). Adding a mode means adding a row
(:func:`register_mode`) and its builder functions - nothing else.

This module is imported by the pytest plugin in every pytest run, so it imports nothing heavy:
builders are named as ``"module:function"`` strings and resolved when an artifact is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qatcheck.errors import ConfigError
from qatcheck.registry import (BACKENDS, DEFAULT_ONNX_QUANTIZER, DEFAULT_TORCH_QUANTIZER, ONNX_QUANTIZERS,  # noqa: F401
                               check_backend, executes, resolve)

#: float: the model in a float precision; int8_graph: int8 Q/DQ inserted into the ONNX graph
#: (no PyTorch twin); int8_torch: Q/DQ inserted in PyTorch, exported as a Q/DQ ONNX (int8; the
#: ``fp8`` row is this family too, with precision fp8: E4M3 Q/DQ)
FAMILIES = ("float", "int8_graph", "int8_torch")
#: what an artifact computes in
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
#: the profile points a dynamic-shape case is measured at
PROFILE_POINTS = ("min", "opt", "max")

#: Which calibrators each quantizer family accepts (checked when the recipe is built).
ONNX_CALIBRATORS: tuple[str, ...] = ("minmax", "entropy", "percentile")
TORCH_CALIBRATORS: tuple[str, ...] = ("max", "entropy", "mse", "percentile")
#: The torch calibrators ModelOpt can do (qatcheck.quantize.modelopt_quant says how each maps).
MODELOPT_CALIBRATORS: tuple[str, ...] = ("max", "entropy", "percentile")
#: The fp8 mode's calibrators (QuantSettings.fp8_calibrator): the entropy / mse searches are
#: searches over the int8 grid, meaningless for E4M3.
FP8_CALIBRATORS: tuple[str, ...] = ("max", "percentile")

Builder = "str | Callable[..., Any]"


@dataclass(frozen=True)
class ModeSpec:
    """One mode: how its artifacts are made, where it runs, what it is compared with.

    ``onnx_builder(builder, spec, path, dynamic) -> dict`` writes the mode's ONNX file to ``path``
    (with the recipe's dynamic axes when ``dynamic``) and returns what the report should know
    (calibrator, kept layers). ``torch_builder(builder, spec) -> (module, path | None)`` returns the
    module PyTorch runs; None means the mode exists only as a graph (no PyTorch case). ``builder``
    is the recipe's :class:`qatcheck.artifacts.ArtifactBuilder`. Either may be a callable or a
    ``"module:function"`` string (resolved lazily, so the plugin stays cheap to import).

    ``key_fields`` name what, besides the weights, the input spec and the library versions, shapes
    the artifact: dotted recipe fields (``quant.calibrator``) or the special names ``calib_data``,
    ``train_data`` (data fingerprints), ``device`` (where calibration / training run), ``loss``
    (the QAT loss's code), ``fp32_onnx`` (the digest of the fp32 export the mode is built from),
    ``torch_quantizer`` (the quantizer's ``cache_id()``: its name, with its version where the
    library versions do not hold it), a torch quantizer's name (``modelopt``: its installed
    version), ``modules`` (each
    submodule's name, class and settings: what places a torch quantizer, which the graph does not
    show) and ``train_graph`` (the model traced in training mode: what QAT runs).
    Only those enter the mode's cache key: changing the ONNX calibrator rebuilds trt_ptq, not
    torch_ptq. Every key also holds the weights, the model's traced graph (the digest of its static
    fp32 export, so an edit to any code ``forward()`` runs, in any module, rebuilds) and
    qatcheck's build code.
    """

    name: str
    family: str
    precision: str  # fp32 | fp16 | int8 | fp8 (what the artifact computes in)
    onnx_builder: Any
    torch_builder: Any = None
    #: which backends may execute the mode (None: every backend that can - a torch backend only
    #: when the mode has a torch form); an uninstalled backend is a runtime skip, not this
    backends: tuple[str, ...] | None = None
    #: the QuantSettings field naming this mode's calibrator (shown in the table)
    calibrator_field: str | None = None
    calibrated: bool = False
    trained: bool = False
    key_fields: tuple[str, ...] = ()
    #: the torch quantizer (qatcheck.registry.TORCH_QUANTIZERS) this mode always uses; None: the
    #: recipe's QuantSettings.torch_quantizer. A key field naming it is its installed version.
    torch_quantizer: str | None = None
    #: recipe fields the mode cannot work without (checked when the recipe is built)
    requires: tuple[str, ...] = ()
    #: the mode *is* a dynamic-shape variant of ``variant_of``: measured only at min / opt / max
    variant_of: str | None = None
    #: TensorRT <= 10 can build it from the fp32 ONNX with its own calibrator (implicit INT8)
    trt_native_ptq: bool = False
    #: the mode keeps QuantSettings.keep_precision layers in higher precision
    keeps_layers: bool = False
    #: the ONNX builder is cheap and deterministic: it runs every session and its file is keyed on
    #: its own digest (the fp32 export is the model's traced behaviour, whatever code computes it)
    content_keyed: bool = False
    description: str = ""
    #: a note the report shows once for the mode's cases (what its figures are)
    note: str = ""
    #: ``(device) -> reason | None`` (a callable or ``"module:function"``): why the mode's latency
    #: means nothing on the measured device (``runner.device``: ``cpu``, ``cuda``,
    #: ``CPUExecutionProvider``...); the latency check then skips with the reason
    latency_skip: Any = None
    #: a note the report shows once when the mode's latency was measured (what the figure is)
    latency_note: str = ""
    #: the sensitivity path (qatcheck.analysis.sensitivity) that profiles this mode, layer by
    #: layer: ``onnx`` (its graph on ONNX Runtime) or ``torch`` (its PyTorch module); one mode each
    sensitivity_path: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"ModeSpec({self.name}).family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"ModeSpec({self.name}).precision {self.precision!r}: choose one of "
                              f"{', '.join(PRECISIONS)}")

    @property
    def int8(self) -> bool:
        """A quantized mode (its artifact has Q/DQ: int8, or E4M3 for the fp8 row): it gets the
        structure check, and the TensorRT precision audit where it runs on TensorRT."""
        return self.family != "float"

    @property
    def has_torch(self) -> bool:
        return self.torch_builder is not None

    @property
    def is_reference(self) -> bool:
        """PyTorch fp32 is what every other case is ultimately compared with."""
        return self.family == "float" and self.precision == "fp32"

    @property
    def profile_only(self) -> bool:
        return self.variant_of is not None

    @property
    def from_fp32_onnx(self) -> bool:
        """Its ONNX is made from the fp32 export (``fp32_onnx`` in its key: the fp16 conversion,
        ONNX-level PTQ), so its compute tensors keep their fp32 names and can be compared with the
        fp32 graph's tensor by tensor (localization's ONNX path)."""
        return "fp32_onnx" in self.key_fields


#: FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards (the fp8 mode's latency needs them)
FP8_MIN_CAPABILITY = (8, 9)
_A = "qatcheck.artifacts"
_PTQ_KEYS = ("quant.percentile", "quant.per_channel", "quant.calib_batches", "calib_data")
#: which library quantizes torch_ptq / qat, the ModelOpt config it is given, the modules it quantizes
_TORCH_Q_KEYS = ("torch_quantizer", "quant.modelopt_config", "modules")
MODE_SPECS: dict[str, ModeSpec] = {}


def register_mode(spec: ModeSpec, *, replace: bool = False) -> ModeSpec:
    """Add a mode (a row of the table). Its name becomes a pytest marker, a ``--qatcheck-modes``
    choice and a ``Recipe.modes`` entry."""
    if spec.name in MODE_SPECS and not replace:
        raise ConfigError(f"mode {spec.name!r} is already registered")
    MODE_SPECS[spec.name] = spec
    return spec


def unregister_mode(name: str) -> None:
    MODE_SPECS.pop(name, None)


for _spec in (
    ModeSpec("fp32", "float", "fp32", f"{_A}:export_fp32", f"{_A}:plain_module", content_keyed=True,
             description="plain export, fp32 execution"),
    ModeSpec("fp16", "float", "fp16", f"{_A}:convert_fp16", f"{_A}:plain_module", key_fields=("fp32_onnx",),
             description="fp16 execution (torch .half(); fp16 ONNX with fp32 I/O)"),
    ModeSpec("trt_ptq", "int8_graph", "int8", f"{_A}:onnx_ptq", None,
             calibrator_field="calibrator", calibrated=True,
             key_fields=("fp32_onnx", "quant.calibrator", *_PTQ_KEYS), trt_native_ptq=True,
             sensitivity_path="onnx",
             description="PTQ on the plain ONNX: explicit TensorRT-style Q/DQ (or TensorRT's calibrator)"),
    ModeSpec("partial", "int8_graph", "int8", f"{_A}:onnx_ptq", None,
             calibrator_field="calibrator", calibrated=True,
             key_fields=("fp32_onnx", "quant.calibrator", *_PTQ_KEYS, "quant.keep_precision"),
             trt_native_ptq=True,
             keeps_layers=True,
             description="trt_ptq with sensitive layers kept in higher precision"),
    ModeSpec("torch_ptq", "int8_torch", "int8", f"{_A}:torch_qdq_onnx", f"{_A}:ptq_module",
             calibrator_field="torch_calibrator", calibrated=True,
             key_fields=("quant.torch_calibrator", *_PTQ_KEYS, "quant.qdq_rules", "device", *_TORCH_Q_KEYS),
             sensitivity_path="torch",
             description="Q/DQ inserted in PyTorch (pytorch-quantization, or ModelOpt: "
                         "QuantSettings.torch_quantizer), calibrated, exported"),
    ModeSpec("qat", "int8_torch", "int8", f"{_A}:torch_qdq_onnx", f"{_A}:qat_module",
             calibrator_field="torch_calibrator", calibrated=True, trained=True,
             key_fields=("quant.torch_calibrator", *_PTQ_KEYS, "quant.qdq_rules", "device", "qat",
                         "train_data", "loss", "train_graph", *_TORCH_Q_KEYS),
             requires=("train_data",),
             description="torch_ptq, then fine-tuned, exported as Q/DQ ONNX"),
    ModeSpec("dynamic", "float", "fp32", f"{_A}:export_fp32", f"{_A}:plain_module", variant_of="fp32",
             requires=("input.dynamic",),
             description="fp32 with the recipe's dynamic axes, measured at min / opt / max"),
):
    register_mode(_spec)


def modes() -> tuple[str, ...]:
    """Every registered mode, in table order."""
    return tuple(MODE_SPECS)


#: the built-in modes (a recipe's default ``modes``)
MODES: tuple[str, ...] = modes()

# Opt-in rows, registered after MODES: a recipe measures them only when it lists them.
register_mode(ModeSpec(
    "fp8", "int8_torch", "fp8", f"{_A}:torch_qdq_onnx", f"{_A}:ptq_module", torch_quantizer="modelopt",
    # TensorRT: strongly typed from the FP8 Q/DQ graph on an FP8 GPU (trt_plan.plan_build)
    backends=("torch", "onnxruntime", "tensorrt"),
    calibrator_field="fp8_calibrator", calibrated=True,
    key_fields=("quant.fp8_calibrator", "quant.percentile", "quant.calib_batches", "calib_data", "device",
                "modelopt", "modules"),
    note=("fp8 is simulated here: E4M3 fake-quant in PyTorch and FP8 Q/DQ in ONNX Runtime compute in "
          "fp32 with E4M3 rounding; the accuracy and parity are FP8's, the speed is not"),
    latency_skip="qatcheck.quantize.modelopt_quant:fp8_latency_skip",
    latency_note=("fp8 latency is fake-quant latency (E4M3 rounding around fp32 kernels), not the "
                  "latency of an FP8 engine"),
    description="ModelOpt FP8 (E4M3, FP8_DEFAULT_CFG) in PyTorch, calibrated, exported as FP8 Q/DQ ONNX "
                "(opset 19); needs nvidia-modelopt"))


def spec(name: str) -> ModeSpec:
    try:
        return MODE_SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown mode {name!r}; known modes: {', '.join(MODE_SPECS)}") from None


def check_mode(name: str) -> str:
    return spec(name).name


def unsupported_reason(mode: str, backend: str) -> str | None:
    """Why ``backend`` cannot execute ``mode`` by design (None when it can).

    This is about the pairing, not about what is installed: an uninstalled backend is a runtime skip
    decided by the backend itself.
    """
    s = spec(mode)
    if s.backends is not None and backend not in s.backends:
        return f"mode {mode!r} does not run on {backend} (it runs on {', '.join(s.backends)})"
    if executes(backend) == "torch" and not s.has_torch:
        return (f"mode {mode!r} quantizes the ONNX graph (ONNX-level PTQ); {backend} runs PyTorch "
                "modules and has no executor for it - run it on a graph backend (onnxruntime, tensorrt)")
    return None


def parity_reference(mode: str, backend: str) -> tuple[str, str] | None:
    """The PyTorch case a (mode, backend) case is compared with, and the relation's name.

    - ``export``: the same mode in PyTorch vs its exported graph on another backend (is the
      export faithful?);
    - ``quantization``: a low-precision mode vs fp32 (how far did precision move the outputs?).
      Graph-only modes have no PyTorch twin, so they are compared with fp32.
    PyTorch fp32 (and its dynamic variant) is the reference itself: None.
    """
    s = spec(mode)
    if backend == "torch":
        return None if s.is_reference else ("fp32", "quantization")
    if not s.has_torch:
        return ("fp32", "quantization")
    return (mode, "export")


def of_family(family: str) -> tuple[str, ...]:
    """The modes of ``family`` (table order), e.g. ``int8_graph``: the graphs an ONNX-level
    quantizer writes from the fp32 export."""
    return tuple(n for n, s in MODE_SPECS.items() if s.family == family)


def sensitivity_modes() -> dict[str, str]:
    """sensitivity path -> the mode it profiles (the rows' ``sensitivity_path``)."""
    return {s.sensitivity_path: n for n, s in MODE_SPECS.items() if s.sensitivity_path}


def localization_paths(mode: str) -> tuple[str, ...]:
    """Where a low-precision mode can be localized against fp32 (qatcheck.analysis.localize):
    ``onnx`` when its graph is made from the fp32 export (tensor names kept), ``torch`` when it
    has a PyTorch form; the preferred one first. fp32 and profile-only modes: none."""
    s = spec(mode)
    if s.precision == "fp32" or s.profile_only:
        return ()
    return tuple(p for p, ok in (("onnx", s.from_fp32_onnx), ("torch", s.has_torch)) if ok)


def calibrator_of(mode: str, quant: Any, options: Any = None) -> str:
    """The calibrator a mode used, for the table ("-" for uncalibrated modes), with "(name)" where a
    quantizer other than the default one made it: ``QuantSettings.torch_quantizer`` for the int8
    torch modes, ``--qatcheck-trt-ptq <name>`` for the graph modes (a row with its own quantizer,
    fp8, is always that one's: no suffix)."""
    s = spec(mode)
    if not s.calibrator_field:
        return "-"
    name = getattr(quant, s.calibrator_field)
    by = None
    if s.family == "int8_torch" and s.torch_quantizer is None:
        by = getattr(quant, "torch_quantizer", DEFAULT_TORCH_QUANTIZER)
        by = None if by == DEFAULT_TORCH_QUANTIZER else by
    elif s.family == "int8_graph":
        by = getattr(options, "trt_ptq", None)
        by = by if by in ONNX_QUANTIZERS and by != DEFAULT_ONNX_QUANTIZER else None
    return f"{name} ({by})" if by else name
