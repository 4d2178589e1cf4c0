"""Mode -> artifacts: what each mode builds, keyed into the artifact cache.

This is backend-neutral: it decides *what* exists for a mode (a torch module, a plain / fp16 /
Q/DQ ONNX file, static or with the recipe's dynamic axes) and *how it was made* (calibrator,
excluded layers). Which builder a mode uses and what enters its cache key come from its row in the
mode table (:mod:`qatcheck.modes`); the builder functions below are the ones the built-in rows name.
Backends only run the result.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import inspect
import json
import os
import tempfile
import time
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from qatcheck.backends.base import Artifact
from qatcheck.backends.trt_plan import check_ptq_form
from qatcheck.cache import ArtifactCache, cache_key, library_versions
from qatcheck.data.base import Dataset, inputs_fingerprint, require_float, shuffled_batches
from qatcheck.data.batching import fixed_batches
from qatcheck.errors import ArtifactError, ConfigError, DataError
from qatcheck.fsutil import file_digest, outside_code_digest, source_digest
from qatcheck.modes import ModeSpec, resolve, spec as mode_spec
from qatcheck.quantize import export
from qatcheck.quantize.export import pin_shapes
from qatcheck.recipe import NO_TORCH, Recipe, is_onnx_only
from qatcheck.registry import (DEFAULT_ONNX_QUANTIZER, ONNX_QUANTIZERS, TORCH_QUANTIZERS, torch_quantizer)
from qatcheck.registry import onnx_quantizer as onnx_quantizer_named

def state_digest(model: torch.nn.Module) -> str:
    """Digest of the weights, so a retrained checkpoint invalidates every cached artifact."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def code_digest(fn: Any) -> str:
    """Digest of a callable's source (the QAT loss): editing it rebuilds what it trained."""
    if fn is None:
        return "none"
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def module_digest(model: torch.nn.Module) -> str:
    """Digest of every submodule's name, class and settings (``extra_repr``: kernel sizes, dropout
    p, BatchNorm momentum). What the exported graph does not show: torch quantizers are placed by a
    module's exact class (a ``Conv2d`` subclass computes the same and is not quantized), and
    training reads settings the eval graph drops."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        cls = type(m)
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__}({m.extra_repr()})\n".encode())
    return h.hexdigest()[:16]


#: qatcheck's own code that shapes artifacts (with each mode's builder modules): editing it
#: rebuilds, where a version number would not change with a local edit
_BUILD_CODE = ("artifacts.py", "quantize", "data/batching.py")


def implementation_id(impl: Any) -> str | None:
    """What of a registered quantizer shapes its artifacts, for their cache keys: its ``cache_id()``
    and, for one defined outside qatcheck (a user's own), the digest of the file that defines it,
    so an edit of that file rebuilds what it wrote. qatcheck's own implementations are part of its
    build code, already in every key."""
    cid = impl.cache_id()
    outside = outside_code_digest(impl)
    return cid if outside is None else f"{cid or type(impl).__qualname__} {outside}"


def build_code_digest(spec: ModeSpec) -> str:
    """Digest of qatcheck's build code and of the modules that hold the mode's builders."""
    builders = [resolve(b) for b in (spec.onnx_builder, spec.torch_builder) if b is not None]
    sources = [inspect.getsourcefile(fn) for fn in builders if callable(fn)]
    return source_digest([*_BUILD_CODE, *(Path(s).resolve() for s in sources if s)])


def output_count_error(recipe: Recipe, count: int) -> str | None:
    """Why a model returning ``count`` outputs does not fit ``Recipe.output_names`` (None when it
    does). More outputs than names: the task would score whichever comes first (a face model's box
    regressions read as class scores, passing and recorded). Fewer: a name the recipe scores or
    judges has no tensor (the exporter's "number of output names provided exceeded ...")."""
    names = recipe.output_names
    if count == len(names):
        return None
    head = (f"Recipe({recipe.name}).model returns {count} output{'s' if count != 1 else ''}, but "
            f"Recipe.output_names names {len(names)} ({', '.join(map(repr, names))})")
    if count > len(names):
        hint = f"set output_names to all {count}, in the order forward() returns them"
        if recipe.task == "classification" and recipe.task_output is None:
            hint += ", and task_output to the one the classification task scores"
        return f"{head}: {hint}"
    missing = []
    for name in names[count:]:  # by position: names past the model's last output have no tensor
        who = ("Recipe.heads" if name in recipe.heads else "task_output" if name == recipe.task_output else "")
        missing.append(f"{name!r}" + (f" ({who} names it)" if who else ""))
    return (f"{head}: the model produces nothing for {', '.join(missing)}; output_names lists the "
            "outputs forward() returns, in its order")


class RecipeState:
    """The recipe's lazily loaded pieces (model, datasets), loaded at most once per session."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @cached_property
    def onnx_only(self) -> bool:
        return is_onnx_only(self.recipe)

    @cached_property
    def model(self) -> torch.nn.Module:
        if self.onnx_only:  # the cases that need it skip before they get here
            raise ArtifactError(f"Recipe({self.recipe.name}): {NO_TORCH}")
        try:
            model = self.recipe.model()
        except (ArtifactError, DataError):
            raise
        except Exception as exc:
            raise ArtifactError(f"Recipe({self.recipe.name}).model failed to build the model: "
                                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise ArtifactError(f"Recipe({self.recipe.name}).model returned {type(model).__name__}, "
                                "not a torch.nn.Module")
        model = model.eval().cpu()
        outputs = export.check_model_accepts(model, self.recipe.input, f"Recipe({self.recipe.name}).model")
        wrong = output_count_error(self.recipe, len(outputs))
        if wrong:  # before a task scores the wrong tensor, or the exporter refuses the names
            raise ArtifactError(wrong)
        return model

    @cached_property
    def weights(self) -> str:
        if self.onnx_only:  # the file is the weights and the code
            return self.recipe.weights_id + self.recipe.model.digest()
        return self.recipe.weights_id + state_digest(self.model)

    @cached_property
    def modules(self) -> str:
        return "" if self.onnx_only else module_digest(self.model)

    @cached_property
    def train_graph(self) -> str:
        """What QAT trains through: the model traced in training mode (qatcheck.quantize.export)."""
        return "" if self.onnx_only else export.training_graph_digest(self.model, self.recipe.input,
                                                                       self.recipe.output_names)

    def _dataset(self, field: str) -> Dataset:
        factory = getattr(self.recipe, field)
        try:
            ds = factory()
        except (ArtifactError, DataError):
            raise
        except Exception as exc:
            raise DataError(f"Recipe({self.recipe.name}).{field} failed to load its data: "
                            f"{type(exc).__name__}: {exc}") from exc
        if len(ds) == 0:
            raise DataError(f"Recipe({self.recipe.name}).{field} is empty")
        first = next(iter(ds.batches(1)), None)
        if first is None:
            raise DataError(f"Recipe({self.recipe.name}).{field} ({ds.name}) has len() {len(ds)} but "
                            "yields no batches")
        require_float(np.asarray(first[0]), f"Recipe({self.recipe.name}).{field} ({ds.name})")
        if tuple(first[0].shape[1:]) != tuple(self.recipe.input.shape[1:]):
            raise DataError(f"Recipe({self.recipe.name}).{field} ({ds.name}) yields inputs of shape "
                            f"{tuple(first[0].shape[1:])} per sample, but InputSpec.shape is "
                            f"{tuple(self.recipe.input.shape)}")
        return ds

    @cached_property
    def eval_data(self) -> Dataset:
        return self._dataset("eval_data")

    @cached_property
    def calib_data(self) -> Dataset:
        return self._dataset("calib_data")

    @cached_property
    def train_data(self) -> Dataset:
        return self._dataset("train_data")


#: key fields that digest the model itself (its graphs, its modules), not a setting of the recipe
_MODEL_FIELDS = ("fp32_onnx", "modules", "train_graph")


def onnx_quantizer_for(options: Any) -> str:
    """The session's choice (``--qatcheck-trt-ptq``): a registered ONNX quantizer's name has it
    write the graphs; every other form (auto / native / qdq) is about how TensorRT builds them,
    from qatcheck's. Checked here, not by the command line: a suite may register its quantizer
    after the options are parsed."""
    form = check_ptq_form(getattr(options, "trt_ptq", "auto"))
    return form if form in ONNX_QUANTIZERS else DEFAULT_ONNX_QUANTIZER


#: PyTorch CPU threads while an artifact is built (calibration, QAT fine-tuning, export)
BUILD_THREADS = 1


def fixed_threads(build):
    """``build`` run at ``BUILD_THREADS``, whatever this process's thread count is. Why: PyTorch's
    CPU reductions and conv backward sum in an order that depends on the thread count (4513 of 4608
    conv weight-grad values differ between 1 and 2 threads), so QAT fine-tuning in an xdist worker
    (``--qatcheck-threads auto`` gives it 1/N of the cores) made other weights than under ``-n 0``,
    and an artifact is cached and shared by every later run. Why one: a fixed count that depends on
    no machine and oversubscribes nothing - two workers building at once at 2 threads each took
    93-193 s instead of 18-26 s on the 2-core CI machine, and one build alone 22-75 s at 2 threads,
    6-13 s at 1 (the digits torch_ptq + qat build). Inference does not depend on it: every figure
    of digits and digitdet was bit-identical at 1 and 2 threads."""
    def run(path: Path) -> Any:
        with torch_threads(BUILD_THREADS):
            return build(path)  # what the builder says about its file (ArtifactCache.info)
    return run


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class ArtifactBuilder:
    """Builds (or finds in the cache) each mode's artifacts for one recipe, as its row says."""

    def __init__(self, state: RecipeState, cache: ArtifactCache, progress: bool = False,
                 device: str = "cpu", onnx_quantizer: str = "qatcheck") -> None:
        if onnx_quantizer not in ONNX_QUANTIZERS:
            raise ConfigError(f"onnx_quantizer {onnx_quantizer!r}: choose one of {', '.join(ONNX_QUANTIZERS)}")
        self.state = state
        self.recipe = state.recipe
        self.cache = cache
        self.progress = progress
        #: where calibration and QAT fine-tuning run (part of those artifacts' cache keys: CUDA
        #: and CPU kernels round differently, so their results are different artifacts)
        self.device = device
        #: who writes the trt_ptq / partial Q/DQ graph (--qatcheck-trt-ptq; part of those graphs'
        #: cache keys): the ONNX quantizer table's name, and the one looked up
        self.onnx_quantizer = onnx_quantizer
        self.onnx_ptq = onnx_quantizer_named(onnx_quantizer)
        self._torch: dict[str, Artifact] = {}
        self._onnx: dict[tuple[str, bool], Artifact] = {}

    # ---- cache keys ---------------------------------------------------------------------------
    def _special(self, dynamic: bool = False) -> dict[str, Any]:
        """The key fields that are not recipe fields (ModeSpec.key_fields names them)."""
        return {"calib_data": self.calib_id, "train_data": lambda: self.state.train_data.fingerprint(),
                "device": lambda: self.device.split(":")[0], "loss": self._loss_id,
                "fp32_onnx": lambda: self.onnx_artifact("fp32", dynamic).digest,
                "modules": lambda: self.state.modules, "train_graph": lambda: self.state.train_graph,
                "torch_quantizer": lambda: implementation_id(self.torch_quantizer())}

    def _field(self, name: str, dynamic: bool = False) -> Any:
        special = self._special(dynamic)
        if name in special:
            return special[name]()
        if name in TORCH_QUANTIZERS:  # a row that always uses one quantizer (fp8): its version
            return torch_quantizer(name).version()
        value: Any = self.recipe
        for part in name.split("."):
            value = getattr(value, part)
        return repr(value)

    def key_parts(self, spec: ModeSpec, dynamic: bool = False) -> dict:
        """What the mode's artifact depends on: the weights, the model's traced graph, the input
        spec, the outputs, the library versions, whether it has dynamic axes, and the row's
        ``key_fields``. A ``content_keyed`` row's artifact is keyed on its own digest instead."""
        if self._content_keyed(spec):
            return self._content_parts(spec, dynamic, self.onnx_artifact(spec.name, dynamic).digest)
        r = self.recipe
        parts = {"recipe": r.name, "mode": spec.name, "weights": self.state.weights,
                 "model": self.model_graph(), "build_code": build_code_digest(spec),
                 "input": [r.input.name, list(r.input.shape), r.input.dtype,
                           sorted((k, list(v)) for k, v in r.input.dynamic.items())],
                 "outputs": list(r.output_names), "versions": library_versions()}
        if dynamic:
            parts["dynamic"] = True
        parts.update({f: self._field(f, dynamic) for f in spec.key_fields})
        if spec.onnx_builder in (onnx_ptq, f"{__name__}:onnx_ptq") and (writer := implementation_id(self.onnx_ptq)):
            parts["quantizer"] = writer  # e.g. with its library's version, or a user's file
        return parts

    def model_graph(self) -> str:
        """What the model computes: the digest of its static fp32 export, made afresh each session
        (50-150 ms for the built-in models on a 2-core CPU). It holds forward() and everything it
        calls, in whatever module, so an edit that changes it rebuilds every artifact and one that
        changes nothing traced (a comment, a refactor) rebuilds none. "" for an ONNX-only recipe:
        its file's digest is already in the weights."""
        return "" if self.state.onnx_only else self.onnx_artifact("fp32").digest

    def _content_keyed(self, spec: ModeSpec) -> bool:
        # an ONNX-only recipe's fp32 graph is keyed on its file (weights), not re-pinned each session
        return spec.content_keyed and not self.state.onnx_only

    def _content_parts(self, spec: ModeSpec, dynamic: bool, digest: str) -> dict:
        return {"recipe": self.recipe.name, "mode": spec.name, "content": digest,
                **({"dynamic": True} if dynamic else {})}

    def _build_content_keyed(self, name: str, spec: ModeSpec, dynamic: bool, build) -> Path:
        """Build beside the cache, then file the result under its own digest: an intact entry with
        that content is reused (and counted so), a new one is moved into place."""
        self.cache.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.cache.root)
        fresh = Path(tmp)
        try:
            # held while building, so another process opening the cache never takes it for the
            # orphan of a killed writer (fsutil.remove_orphans)
            fcntl.flock(fd, fcntl.LOCK_EX)
            start = time.perf_counter()
            info = build(fresh)  # every session: its digest is the key (counted as building)
            self.cache.build_seconds += time.perf_counter() - start

            def adopt(path: Path) -> dict:
                os.replace(fresh, path)
                return info
            return self.cache.get_or_build(name, self._content_parts(spec, dynamic, file_digest(fresh)), ".onnx",
                                           adopt)
        finally:
            fresh.unlink(missing_ok=True)
            os.close(fd)

    def calib_batches(self) -> Iterator[np.ndarray]:
        """The recipe's calibration batches at the opt shape (also fed to TensorRT's calibrators)."""
        r = self.recipe
        return fixed_batches(self.state.calib_data, r.input.batch_size, r.quant.calib_batches)

    def calib_id(self) -> str:
        """Fingerprint of the calibration data's inputs (keys calibrated artifacts and TensorRT
        caches): calibration never reads the targets, so new labels rebuild nothing calibrated."""
        return inputs_fingerprint(self.state.calib_data)

    def settings(self, mode: str) -> dict[str, Any]:
        """What shaped the mode's artifact besides the model, as a human reads it: the row's
        ``key_fields`` (``quant.`` dropped from the names; the fp32 export they are built from is
        the model, not a setting), and who wrote an ONNX-level PTQ graph. A baseline keeps them per
        case, so a failure can name the one that changed (qatcheck.judges.settings_changed)."""
        spec, _ = self._variant(mode, False)
        out = {f.removeprefix("quant."): self._setting(f) for f in spec.key_fields if f not in _MODEL_FIELDS}
        if spec.onnx_builder in (onnx_ptq, f"{__name__}:onnx_ptq"):
            out["onnx_quantizer"] = self.onnx_ptq.setting()
        return out

    def _setting(self, name: str) -> Any:
        """One key field, readable: recipe values as plain JSON (a settings dataclass as an object
        of its fields), data as its fingerprint, code as its name and digest."""
        if name == "loss":
            fn = self.recipe.loss
            return "default" if fn is None else f"{getattr(fn, '__qualname__', repr(fn))} {code_digest(fn)}"
        if name == "torch_quantizer":
            tq = self.torch_quantizer()
            return f"{tq.name}=={tq.version()}"
        if name in self._special() or name in TORCH_QUANTIZERS:  # data fingerprints, graph digests, library versions
            return self._field(name)
        value: Any = self.recipe
        for part in name.split("."):
            value = getattr(value, part)
        return _plain(value, top=True)

    # ---- artifacts ----------------------------------------------------------------------------
    def _variant(self, mode: str, dynamic: bool) -> tuple[ModeSpec, bool]:
        """A profile-only mode (``dynamic``) is its base mode built with dynamic axes."""
        spec = mode_spec(mode)
        if spec.variant_of:
            return mode_spec(spec.variant_of), True
        return spec, dynamic

    def torch_artifact(self, mode: str) -> Artifact:
        """A fresh-per-runner torch module for the mode (fp16 conversion happens in the runner)."""
        spec, _ = self._variant(mode, False)
        if spec.name not in self._torch:
            if not spec.has_torch:
                raise ArtifactError(f"mode {mode!r} has no PyTorch form (it exists only as an ONNX graph)")
            module, path = resolve(spec.torch_builder)(self, spec)
            digest = file_digest(path) if path is not None else self.state.weights[-16:]
            self._torch[spec.name] = Artifact("torch", spec.precision, module=module.eval(), path=path,
                                              digest=digest)
        # every runner gets its own copy: the fp16 runner converts in place
        a = self._torch[spec.name]
        return Artifact(a.kind, a.precision, module=copy.deepcopy(a.module), path=a.path, digest=a.digest)

    def torch_identity(self, mode: str) -> str:
        """What the mode's torch module is, without loading it (qatcheck.results keys on it): what
        its artifact's key holds (weights, traced graph, settings, library versions), the model's
        modules and the source file of its class (code the trace may not show: a branch on the
        input shape), and the digest of its cached state, where the mode has one ("none" before
        it is built, so a result is stored only once it is)."""
        spec, _ = self._variant(mode, False)
        if not spec.has_torch:
            raise ArtifactError(f"mode {mode!r} has no PyTorch form (it exists only as an ONNX graph)")
        parts = self.key_parts(spec)
        loaded = self._torch.get(spec.name)
        if loaded is not None:  # this session's (built now, or rebuilt with --qatcheck-no-cache)
            state = loaded.digest if loaded.path is not None else None
        else:
            state = self.cache.recorded_digest(_state_name(self.recipe, spec), parts, ".pt")
        model_file = inspect.getsourcefile(type(self.state.model))
        return cache_key({"torch": parts, "modules": self.state.modules, "state": state and state[:16],
                          "code": source_digest([Path(model_file).resolve()]) if model_file else ""})

    def onnx_artifact(self, mode: str, dynamic: bool = False) -> Artifact:
        """The mode's ONNX file; with ``dynamic`` exported with the recipe's dynamic axes."""
        spec, dynamic = self._variant(mode, dynamic)
        if dynamic and not self.recipe.input.dynamic:
            raise ArtifactError(f"Recipe({self.recipe.name}): a dynamic {spec.name} ONNX needs "
                                "InputSpec.dynamic axes")
        if (spec.name, dynamic) not in self._onnx:
            def build(path: Path) -> dict:
                return resolve(spec.onnx_builder)(self, spec, path, dynamic) or {}
            name = f"{self.recipe.name}-{spec.name}" + ("-dyn" if dynamic else "")
            if self._content_keyed(spec):
                path = self._build_content_keyed(name, spec, dynamic, fixed_threads(build))
            else:
                path = self.cache.get_or_build(name, self.key_parts(spec, dynamic), ".onnx", fixed_threads(build))
            info = dict(self.cache.info(path))  # the builder's, kept with the file when reused
            if spec.calibrator_field:
                info.setdefault("calibrator", getattr(self.recipe.quant, spec.calibrator_field))
            if spec.keeps_layers:
                info.setdefault("kept", list(self.recipe.quant.keep_precision))
            self._onnx[(spec.name, dynamic)] = Artifact("onnx", spec.precision, path=path,
                                                         digest=file_digest(path), info=info)
        return self._onnx[(spec.name, dynamic)]

    def built_onnx(self, path: str | Path) -> Artifact | None:
        """The ONNX artifact this builder made (or reused) at ``path``, if any: what a runner that
        executes that file ran (a TensorRT 10 fp16 engine is built from the fp32 one)."""
        return next((a for a in self._onnx.values() if a.path == Path(path)), None)

    def _cached_state(self, spec: ModeSpec, build) -> Path:
        return self.cache.get_or_build(_state_name(self.recipe, spec), self.key_parts(spec),
                                       ".pt", fixed_threads(build))

    def _loss_id(self) -> str:
        """Recipe.loss's code; the default loss is keyed on the output it trains (task_output)."""
        r = self.recipe
        return code_digest(r.loss) if r.loss is not None or r.task_output is None else f"cross_entropy:{r.task_output}"

    def torch_quantizer(self, spec: ModeSpec | None = None):
        """The TorchQuantizer that makes ``spec``'s torch artifact: the row's own (``fp8``), else
        ``QuantSettings.torch_quantizer`` - looked up here, once, for every torch build."""
        return torch_quantizer(getattr(spec, "torch_quantizer", None) or self.recipe.quant.torch_quantizer)

    def _load_quantized(self, path: Path, spec: ModeSpec | None = None) -> torch.nn.Module:
        return self.torch_quantizer(spec).load(self.state.model, path, self.recipe.quant, fp8=_fp8(spec))

    def _save_quantized(self, qmodel: torch.nn.Module, path: Path, spec: ModeSpec | None = None) -> None:
        self.torch_quantizer(spec).save(qmodel, path, self.recipe.quant, fp8=_fp8(spec))


def _state_name(recipe: Recipe, spec: ModeSpec) -> str:
    """The cache name of a mode's calibrated / fine-tuned torch state."""
    return f"{recipe.name}-{spec.name}-state"


def _fp8(spec: ModeSpec | None) -> bool:
    return spec is not None and spec.precision == "fp8"


def _plain(value: Any, top: bool = False) -> Any:
    """A setting as JSON a human reads: scalars as they are, sequences as lists, a dataclass (at the
    top level) as an object of its compared fields; a mapping (a ModelOpt config) as its digest."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if top and dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, Mapping):
        blob = json.dumps(value, sort_keys=True, default=repr).encode()
        return f"config {hashlib.sha256(blob).hexdigest()[:16]}"
    return repr(value)


# ---- the builders the built-in mode rows name ---------------------------------------------------
def plain_module(b: ArtifactBuilder, spec: ModeSpec) -> tuple[torch.nn.Module, None]:
    """fp32 / fp16: the recipe's model (the torch runner converts to the mode's precision)."""
    return copy.deepcopy(b.state.model), None


def ptq_module(b: ArtifactBuilder, spec: ModeSpec) -> tuple[torch.nn.Module, Path]:
    """Q/DQ modules by the mode's TorchQuantizer (QuantSettings.torch_quantizer; the fp8 row's own),
    calibrated on the recipe's calibration batches; the case skips with the install hint when
    that quantizer's library is missing."""
    tq = b.torch_quantizer(spec)
    tq.require(_needs(tq, spec))

    def build(path: Path) -> None:
        qm = tq.quantize(b.state.model, b.recipe.quant, b.calib_batches(), fp8=_fp8(spec), device=b.device,
                         progress=b.progress)
        b._save_quantized(qm, path, spec)
    path = b._cached_state(spec, build)
    return b._load_quantized(path, spec), path


def _needs(tq, spec: ModeSpec) -> str:
    """What a missing quantizer library's skip names: the mode that always uses it, else the setting."""
    return f"mode {spec.name!r}" if spec.torch_quantizer else f"QuantSettings.torch_quantizer={tq.name!r}"


def qat_module(b: ArtifactBuilder, spec: ModeSpec) -> tuple[torch.nn.Module, Path]:
    """The calibrated torch_ptq model fine-tuned on the train data (QATSettings, Recipe.loss)."""
    from qatcheck.quantize.qat import QATConfig, cross_entropy, finetune

    tq = b.torch_quantizer(spec)
    tq.require(_needs(tq, spec))

    def build(path: Path) -> None:
        qm = b.torch_artifact("torch_ptq").module
        q, r = b.recipe.qat, b.recipe
        # Recipe.loss, else cross-entropy on the output the task scores (the only one, or task_output)
        scored = r.task_output or r.output_names[0]
        loss = r.loss or cross_entropy(r.output_names.index(scored), scored)
        epochs = iter(range(1 << 30))
        finetune(qm, lambda: shuffled_batches(b.state.train_data, q.batch_size, next(epochs)),
                 QATConfig(epochs=q.epochs, lr=q.lr, batch_size=q.batch_size,
                           max_batches_per_epoch=q.max_batches_per_epoch),
                 loss_fn=loss, device=b.device, progress=b.progress)
        b._save_quantized(qm, path, spec)
    path = b._cached_state(spec, build)
    return b._load_quantized(path, spec), path


def export_fp32(b: ArtifactBuilder, spec: ModeSpec, path: Path, dynamic: bool) -> dict:
    r = b.recipe
    if b.state.onnx_only:  # the given graph, its input pinned (dynamic axes left symbolic)
        pin_shapes(r.model(), path, r.input.name, r.input.shape, r.output_names,
                   dynamic_axes=tuple(r.input.dynamic) if dynamic else ())
        return {}
    export.export_onnx(b.state.model, r.input, path, r.output_names, dynamic=dynamic)
    return {}


def convert_fp16(b: ArtifactBuilder, spec: ModeSpec, path: Path, dynamic: bool) -> dict:
    """The fp32 graph in fp16, BatchNorm and constants folded in fp32 first and nodes whose
    constants fp16 cannot hold kept in fp32 (qatcheck.quantize.fp16); the info lists both."""
    return export.convert_fp16(b.onnx_artifact("fp32", dynamic).path, path)


def onnx_ptq(b: ArtifactBuilder, spec: ModeSpec, path: Path, dynamic: bool) -> dict:
    """ONNX-level PTQ of the fp32 graph (TensorRT-style explicit Q/DQ); a ``keeps_layers`` row
    leaves QuantSettings.keep_precision unquantized."""
    from qatcheck.quantize.onnx_ptq import OnnxPTQConfig

    q = b.recipe.quant
    cfg = OnnxPTQConfig(calibrator=q.calibrator, percentile=q.percentile, per_channel=q.per_channel,
                        exclude=tuple(q.keep_precision) if spec.keeps_layers else ())
    # --qatcheck-trt-ptq <name>: that ONNX quantizer writes the graph
    b.onnx_ptq.quantize(b.onnx_artifact("fp32", dynamic).path, path, b.calib_batches(), cfg,
             input_name=b.recipe.input.name, progress=b.progress)
    return {}


def torch_qdq_onnx(b: ArtifactBuilder, spec: ModeSpec, path: Path, dynamic: bool) -> dict:
    """The mode's calibrated (or fine-tuned) torch model exported as a Q/DQ ONNX by its TorchQuantizer."""
    r = b.recipe
    module = b.torch_artifact(spec.name).module
    b.torch_quantizer(spec).export_onnx(module, export.example_input(r.input), path, r.input.name, r.output_names,
                                        dynamic_axes=export.dynamic_axes_for(r.input, r.output_names) if dynamic else None)
    return {}
