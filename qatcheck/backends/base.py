"""The common runner interface (after Polygraphy's runners): every backend turns an artifact into
something that maps a numpy batch to a list of numpy outputs, and can hand out a zero-argument
callable for timing with inputs already resident on the device.

Backends decide nothing about *what* to build; they only run and time what they are given.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from qatcheck.timing import TimedCall  # noqa: F401 (a runner returns it)


@dataclass
class Artifact:
    """What a mode produced for one backend family: a torch module or an ONNX file."""

    kind: str  # "torch" | "onnx"
    precision: str  # "fp32" | "fp16" | "int8"
    module: Any = None
    path: Path | None = None
    digest: str = ""
    info: dict = field(default_factory=dict)


class Runner(abc.ABC):
    backend: str = ""

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where it executes, e.g. ``cpu``, ``cuda:0``, ``CPUExecutionProvider``."""

    @abc.abstractmethod
    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one batch; outputs in the recipe's output order, as float32 numpy arrays."""

    @abc.abstractmethod
    def timed_call(self, x: np.ndarray) -> TimedCall: ...

    def versions(self) -> dict[str, str]:
        """Backend versions that belong in a latency fingerprint."""
        return {}

    def probe(self) -> TimedCall | None:
        """The machine-speed probe (:mod:`qatcheck.backends.probe`) timed the way this runner times
        its model, or None when the runner has none (its latency is then judged unnormalised)."""
        return None


@dataclass
class BuildContext:
    """What every backend gets to make a runner for one (recipe, mode, static or dynamic) case.

    The backend picks the artifact it executes: ``torch_artifact(mode)`` (a torch module) or
    ``onnx_artifact(mode)`` (an ONNX file - the dynamic-axes build when ``dynamic``). A backend
    that builds its own engines (TensorRT) may build from another mode's ONNX (the fp32 one for
    TensorRT's own calibrator on <= 10) and calibrate with ``calib_batches``; ``calib_id`` is the
    calibration data's fingerprint. ``options`` are the session's :class:`qatcheck.options.Options`.
    """

    recipe: Any  # qatcheck.recipe.Recipe
    mode: str
    dynamic: bool
    torch_artifact: Callable[[str], Artifact]
    onnx_artifact: Callable[[str], Artifact]
    #: mode -> what its torch module is, without loading it (ArtifactBuilder.torch_identity)
    torch_identity: Callable[[str], str] | None = None
    calib_batches: Callable[[], Iterable[np.ndarray]] | None = None
    calib_id: str = ""
    options: Any = None
    cache_dir: Path = Path(".qatcheck_cache")
    use_cache: bool = True
    builder_optimization_level: int | None = None


class Backend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when this backend can run here, else a sentence saying why not."""

    @abc.abstractmethod
    def runner(self, context: BuildContext) -> Runner:
        """A runner for the context's mode: the backend takes the artifact it executes from it."""

    def identity(self, context: BuildContext) -> dict[str, Any] | None:
        """What a result measured on this backend depends on besides the data, the task and
        qatcheck's code (qatcheck.results): ``{"artifact": <what it executes, by content>,
        "runtime": {<versions, provider, device>}}``, known without building a runner. None (the
        default): not known before the build, so its results are always measured again."""
        return None

    def reference_runner(self, context: BuildContext, onnx_path: Path) -> Runner | None:
        """A runner for a recorded ONNX artifact (:mod:`qatcheck.reference_store`), set up exactly
        like ``runner(context)``: the latency judge times it beside the case's own artifact when
        the artifact changed since the baseline. None when this backend cannot (the case is then
        judged against the recorded number alone)."""
        return None
