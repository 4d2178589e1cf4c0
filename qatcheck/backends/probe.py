"""The machine-speed probe: a fixed reference workload timed next to every latency case.

Why: a latency baseline is compared across runs, and between runs the machine itself changes -
another process takes a core (PyTorch's OpenMP threads slow down ~14x when one is busy), GPU clocks
drift, a VM gets a noisy neighbour. None of that is a regression of the model. Each runner times a
fixed, model-independent workload the same way it times the model (same runtime, device, threads,
clock); the baseline keeps the probe's median next to the model's, and the latency judge compares
the model's slowdown *relative to the probe's*: a machine that got 2x slower makes both 2x slower
(no alarm), a model that got 2x slower does not move the probe (caught). See qatcheck.judges.
"""
from __future__ import annotations

import numpy as np

#: the probe's input (batch, channels, height, width) per device kind; fixed forever, since a
#: baseline's probe figure is only comparable with the same workload
CPU_SHAPE = (1, 16, 32, 32)
CUDA_SHAPE = (8, 64, 64, 64)
LAYERS = 4
#: time spent timing the probe, per case (it runs before and after the case's loop)
SECONDS = 0.25


def _weights(channels: int, layer: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + layer)
    return (rng.standard_normal((channels, channels, 3, 3)) / (3 * np.sqrt(channels))).astype(np.float32)


def onnx_model_bytes(shape=CPU_SHAPE) -> bytes:
    """A conv + relu stack as an ONNX model (built in memory: nothing to ship or download)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = shape[1]
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = numpy_helper.from_array(_weights(c, i), f"w{i}")
        inits.append(w)
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "qatcheck_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def torch_module(channels: int):
    import torch

    layers = []
    for i in range(LAYERS):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        conv.weight.data = torch.from_numpy(_weights(channels, i))
        layers += [conv, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def probe_input(shape) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(shape).astype(np.float32)
