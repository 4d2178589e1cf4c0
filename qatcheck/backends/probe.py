"""The machine-speed probe: a fixed reference workload timed next to every CUDA latency case.

Why: a latency baseline is compared across runs, and between runs the GPU itself changes - clocks,
power state, another tenant. None of that is a regression of the model. The torch runner on CUDA
times a fixed, model-independent network the same way it times the model (CUDA-graph replay,
events); the baseline keeps the probe's median beside the model's, and the latency judge lets a
probe that got slower explain a slowdown away (qatcheck.judges.slowdown).

Not on the CPU: measured on the 2-core CI machine and the GPU machine's 16 vCPUs, a fixed CPU
workload did not slow down with a busy core the way the models did (ONNX Runtime's probe x1.7 with
models unchanged; PyTorch's probe unchanged with models x2-x3), in either direction. There the
contention itself is measured (qatcheck.timing.CpuLoad) and a slowdown measured under it is
inconclusive, not red.
"""
from __future__ import annotations

import numpy as np

#: the probe's input (batch, channels, height, width); fixed forever, since a baseline's probe
#: figure is only comparable with the same workload
CUDA_SHAPE = (8, 64, 64, 64)
LAYERS = 4
#: time spent timing the probe, per case (it runs before and after the case's loop)
SECONDS = 0.15


def _weights(channels: int, layer: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + layer)
    return (rng.standard_normal((channels, channels, 3, 3)) / (3 * np.sqrt(channels))).astype(np.float32)


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
