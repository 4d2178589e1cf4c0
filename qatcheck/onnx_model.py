"""ONNX-only recipes: the model is an ONNX file (the usual TensorRT starting point), not a PyTorch
module.

``Recipe(model=onnx_file("model.onnx"), ...)``: the graph modes run from it - ``fp32`` (the file,
its input pinned to the recipe's shape), ``fp16``, ``trt_ptq``, ``partial`` and ``dynamic`` (the
recipe's dynamic axes made symbolic) - on onnxruntime (and TensorRT). The PyTorch backend and the
PyTorch quantization modes (``torch_ptq``, ``qat``) have nothing to run and skip, saying so. Parity
is then judged against the fp32 graph on ONNX Runtime, the only fp32 there is.

``keep_precision`` names what ``partial`` keeps: ONNX node names, or the module-style names qatcheck
derives from them (``/layer1/conv1/Conv`` -> ``layer1.conv1``), as for exported models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.fsutil import atomic_path, file_digest

#: why the PyTorch side of an ONNX-only recipe is skipped
NO_TORCH = "ONNX-only recipe (Recipe.model is an onnx_file): there is no PyTorch model to run or quantize"


class OnnxFile:
    """A recipe's model given as an ONNX file (see the module docstring). Calling it returns the
    path, so ``Recipe.model`` keeps its type: a zero-argument factory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self) -> Path:
        if not self.path.is_file():
            raise ArtifactError(f"ONNX model {self.path} does not exist")
        return self.path

    def __repr__(self) -> str:
        return f"onnx_file({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, OnnxFile) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def digest(self) -> str:
        return file_digest(self())


def onnx_file(path: str | Path) -> OnnxFile:
    """``Recipe.model`` for a model that exists only as an ONNX file: fp32 (the file, its input
    pinned to ``InputSpec.shape``), fp16, trt_ptq, partial and dynamic run from it on ONNX Runtime
    (and TensorRT), judged against the fp32 graph on ONNX Runtime; the PyTorch backend, torch_ptq
    and qat skip with the reason. The graph's input and output names must be ``InputSpec.name`` and
    ``Recipe.output_names``."""
    return OnnxFile(path)


def is_onnx_only(recipe) -> bool:
    return isinstance(recipe.model, OnnxFile)


def skip_reason(recipe, mode: str, backend: str) -> str | None:
    """Why a case of an ONNX-only recipe cannot run (None when it can, or the recipe has a
    PyTorch model)."""
    if not is_onnx_only(recipe):
        return None
    from qatcheck.backends import executes
    from qatcheck.modes import spec

    if executes(backend) == "torch":
        return f"{NO_TORCH}; the {backend} backend runs PyTorch modules"
    if spec(mode).family == "int8_torch":
        return f"{NO_TORCH}; mode {mode!r} quantizes the PyTorch model"
    return None


def reference_case(case):
    """An ONNX-only recipe's parity reference: the fp32 graph on ONNX Runtime at the same shape
    (the dynamic build at a profile point); None for that case itself."""
    from qatcheck.measurement import Case

    ref = Case(case.recipe, "dynamic" if case.shape else "fp32", "onnxruntime", case.shape)
    same = ref == case or (case.backend == "onnxruntime" and case.mode in ("fp32", "dynamic"))
    return None if same else ref


def pin_shapes(src: Path, dst: Path, input_name: str, shape: Sequence[int], output_names: Sequence[str],
               dynamic_axes: Sequence[int] = ()) -> None:
    """Write ``src`` with its input at ``shape`` (``dynamic_axes`` left symbolic), its outputs'
    dimensions re-inferred. The recipe's input and output names must be the graph's: a mismatch is
    one error naming both lists."""
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # protobuf's DecodeError, a truncated file: the path is what to fix
        raise ArtifactError(f"ONNX model {src} cannot be read as ONNX ({type(exc).__name__}: {exc}): "
                            "Recipe.model=onnx_file(...) must name an ONNX model file") from exc
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if [i.name for i in inputs] != [input_name]:
        raise ConfigError(f"ONNX model {src}: its inputs are {[i.name for i in inputs]}; the recipe's "
                          f"InputSpec.name is {input_name!r} (one input, named as in the graph)")
    outputs = [o.name for o in graph.output]
    if outputs != list(output_names):
        raise ConfigError(f"ONNX model {src}: its outputs are {outputs}; Recipe.output_names is "
                          f"{list(output_names)} (the same names, in the graph's order)")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ConfigError(f"ONNX model {src}: input {input_name!r} has rank {len(dims)}; InputSpec.shape "
                          f"{tuple(shape)} has rank {len(shape)}")
    for axis, (d, size) in enumerate(zip(dims, shape)):
        if d.HasField("dim_value") and d.dim_value != size and axis not in dynamic_axes:
            raise ConfigError(f"ONNX model {src}: input {input_name!r} axis {axis} is fixed at {d.dim_value}; "
                              f"InputSpec.shape asks {size} (make the axis symbolic, or match it)")
        if axis in dynamic_axes:
            d.Clear()
            d.dim_param = f"{input_name}_d{axis}"
        else:
            d.Clear()
            d.dim_value = int(size)
    # outputs and intermediate shapes follow from the input: drop what was stored, infer again
    del graph.value_info[:]
    for o in graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # inference is a nicety for the runtimes; the graph itself is fine
        raise ArtifactError(f"ONNX model {src}: shape inference at {tuple(shape)} failed: {exc}") from exc
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
