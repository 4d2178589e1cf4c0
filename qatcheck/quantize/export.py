"""Plain ONNX export (fp32, fp16, dynamic) and ONNX loading with errors a user can act on.

The legacy TorchScript exporter (``dynamo=False``) is used on purpose: it names nodes after module
paths (``/layer1/conv1/Conv``), which is how layer lists map between PyTorch and ONNX, and it is the
exporter pytorch-quantization's quantizers support.
"""
from __future__ import annotations

import copy
import hashlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch

from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.fsutil import atomic_path
from qatcheck.recipe import InputSpec

OPSET = 17


def example_input(spec: InputSpec, shape: Sequence[int] | None = None, device: str = "cpu") -> torch.Tensor:
    dtype = torch.float16 if spec.dtype == "float16" else torch.float32
    return torch.zeros(tuple(shape or spec.shape), dtype=dtype, device=device)


def check_model_accepts(model: torch.nn.Module, spec: InputSpec, where: str = "model") -> tuple:
    """Run one forward pass at the spec's shape so a wrong input spec fails here, by name; return
    the outputs as the runners see them (a tuple or list is several outputs, anything else one)."""
    x = example_input(spec, device=next(iter(model.parameters()), torch.zeros(())).device.type)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the model decides what it rejects; we only name the spec
        raise ArtifactError(f"{where} does not accept the recipe's input spec "
                            f"{spec.name}{tuple(spec.shape)} ({spec.dtype}): {exc}") from exc
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def dynamic_axes_for(spec: InputSpec, output_names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Dynamic axes for the export: the spec's dynamic input axes; batch (axis 0) of every output
    when the batch is dynamic."""
    axes = {spec.name: {a: f"{spec.name}_d{a}" for a in sorted(spec.dynamic)}}
    if 0 in spec.dynamic:
        for out in output_names:
            axes[out] = {0: f"{spec.name}_d0"}
    return axes


def export_onnx(model: torch.nn.Module, spec: InputSpec, path: str | Path,
                output_names: Sequence[str], dynamic: bool = False, opset: int = OPSET) -> Path:
    """Export ``model`` at the spec's (opt) shape; with ``dynamic`` the spec's dynamic axes stay
    symbolic. Written atomically."""
    check_model_accepts(model, spec)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example_input(spec),), str(tmp), input_names=[spec.name],
                          output_names=list(output_names), opset_version=opset,
                          dynamic_axes=dynamic_axes_for(spec, output_names) if dynamic else None,
                          do_constant_folding=True, dynamo=False)
    load_onnx(path)
    return path


def training_graph_digest(model: torch.nn.Module, spec: InputSpec, output_names: Sequence[str],
                          opset: int = OPSET) -> str:
    """Digest of ``model`` traced in training mode: what QAT fine-tunes through, which the eval
    export does not show (``if self.training:`` branches, dropout, BatchNorm in batch statistics).
    Traced on a copy (a training-mode forward moves BatchNorm's running statistics). A model the
    exporter cannot trace in training mode gives a fixed marker: its QAT key then rests on the eval
    graph, the modules and the weights."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(copy.deepcopy(model), (example_input(spec),), buf, input_names=[spec.name],
                              output_names=list(output_names), opset_version=opset,
                              training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                              dynamo=False)
    except Exception as exc:  # noqa: BLE001 - QAT itself may still train it; only the key is weaker
        return f"untraced ({type(exc).__name__})"
    return hashlib.sha256(buf.getvalue()).hexdigest()[:16]


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file; a missing or corrupt file is one ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ArtifactError(f"ONNX file {path} is not a valid model: {exc}") from exc
    return model


def convert_fp16(src: str | Path, dst: str | Path) -> dict:
    """fp16 weights and compute with fp32 inputs/outputs (``keep_io_types``), so every backend is
    fed the same fp32 tensors and only the precision inside the graph changes. BatchNorm and
    constant arithmetic are folded in fp32 first, and nodes whose constants fp16 cannot hold stay
    fp32, as TensorRT deploys them (:mod:`qatcheck.quantize.fp16`). Returns what was folded / kept
    (the artifact's info)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from qatcheck.quantize import fp16

    model = load_onnx(src)
    plan, block = fp16.prepare(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=block or None)
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))
    return plan.info()


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
