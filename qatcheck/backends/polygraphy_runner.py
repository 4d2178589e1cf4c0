"""The runner path qatcheck shares with Polygraphy.

Both graph backends execute through Polygraphy's runners - ``OnnxrtRunner`` for ONNX Runtime,
``TrtRunner`` for TensorRT - behind :class:`PolygraphyRunner`, which adapts Polygraphy's interface
(activate once, ``infer(feed_dict) -> {output name: array}``) to qatcheck's
(:class:`~qatcheck.backends.base.Runner`: a batch in, the outputs in the graph's order out). So
the code that feeds a graph and collects its outputs is the same for both, and since ONNX Runtime
runs on every machine, that path runs in CI - TensorRT only adds its loaders and its runner.

What stays qatcheck's: the timed call (Polygraphy's ``inference_time`` is host wall-clock around
one ``infer``; a latency gate needs warm-up, a fixed loop and CUDA events or a CUDA-graph replay)
and the comparison over a whole eval set (:mod:`qatcheck.parity` accumulates cosine over every
batch; Polygraphy's comparators judge one iteration at a time). The reproduction bundle
(:mod:`qatcheck.repro`) hands a failure to Polygraphy's own comparator, on this same runner.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from qatcheck.backends.base import Runner
from qatcheck.errors import ArtifactError


def quiet_polygraphy() -> None:
    """Polygraphy logs at INFO by default (a line per runner activation, a hint per config);
    qatcheck reports through pytest, so only Polygraphy's warnings and errors get through - unless
    the user asked Polygraphy for more (its severity is already below INFO)."""
    from polygraphy.logger import G_LOGGER

    if G_LOGGER.module_severity.get() >= G_LOGGER.INFO:
        G_LOGGER.module_severity = G_LOGGER.WARNING


class PolygraphyRunner(Runner):
    """A qatcheck runner over an activated Polygraphy runner.

    ``output_names``: the graph's outputs in the recipe's order. Polygraphy returns a dict keyed by
    name, in whatever order the runtime lists its outputs (a TensorRT engine's I/O order need not
    be the ONNX graph's); the outputs are handed back in this order, and an output the runtime
    does not produce is an error naming it. None: the runtime's order.
    """

    def __init__(self, runner: Any, input_name: str | None, output_names: Sequence[str] | None,
                 label: str) -> None:
        quiet_polygraphy()
        self.polygraphy_runner = runner
        self.label = label
        try:
            runner.activate()
        except Exception as exc:
            raise ArtifactError(f"{runner.__class__.__name__} cannot load {label}: {exc}") from exc
        #: every input of the graph; qatcheck feeds one (a multi-input graph, such as a node
        #: localization extracts, is run through the runtime's session directly)
        self.input_names = list(runner.get_input_metadata(use_numpy_dtypes=False).keys())
        if input_name is None and len(self.input_names) == 1:
            input_name = self.input_names[0]
        self.input_name = input_name
        self.output_names = list(output_names) if output_names is not None else None

    def feed(self, x: np.ndarray) -> Any:
        """The array Polygraphy is handed for batch ``x`` (a subclass may place it on a device)."""
        return np.ascontiguousarray(x, dtype=np.float32)

    def named_outputs(self, x: np.ndarray) -> "OrderedDict[str, np.ndarray]":
        """Every output the runtime returns for batch ``x``, by name, as float32 numpy arrays
        (TensorRT debug tensors included when the engine marks them)."""
        from polygraphy.exception import PolygraphyException

        if self.input_name is None:
            raise ArtifactError(f"{self.label} has {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}); qatcheck feeds one")
        try:
            outs = self.polygraphy_runner.infer({self.input_name: self.feed(x)})
        except PolygraphyException as exc:
            raise ArtifactError(f"{self.label}: {exc}") from exc
        return OrderedDict((name, to_numpy(value)) for name, value in outs.items())

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        outs = self.named_outputs(x)
        if self.output_names is None:
            return list(outs.values())
        missing = [n for n in self.output_names if n not in outs]
        if missing:
            raise ArtifactError(f"{self.label} produced no output named {', '.join(map(repr, missing))} "
                                f"(it produced {', '.join(outs)})")
        return [outs[n] for n in self.output_names]

    def close(self) -> None:
        runner = getattr(self, "polygraphy_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()

    def __del__(self) -> None:
        # qatcheck's runners live as long as the session's runner cache: release the runtime with
        # them (Polygraphy warns about a runner collected while still active)
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


def to_numpy(value: Any) -> np.ndarray:
    """A runtime's output (numpy, or a torch tensor on any device) as a float32 host array."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)
