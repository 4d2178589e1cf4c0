"""Mode -> artifacts: what each mode builds, keyed into the artifact cache.

This is backend-neutral: it decides *what* exists for a mode (a torch module, a plain / fp16 /
Q/DQ / dynamic ONNX file) and *how it was made* (calibrator, excluded layers). Backends only run
the result.
"""
from __future__ import annotations

import copy
import hashlib
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qatcheck.backends.base import Artifact
from qatcheck.build import export
from qatcheck.cache import ArtifactCache, library_versions
from qatcheck.data.base import Dataset, shuffled_batches
from qatcheck.errors import ArtifactError, DataError
from qatcheck.fsutil import file_digest
from qatcheck.recipe import Recipe

PRECISION = {"fp32": "fp32", "dynamic": "fp32", "fp16": "fp16"}


def fixed_batches(ds: Dataset, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Batches of exactly ``batch_size`` inputs (static-shape graphs need them): a short final
    batch is filled by wrapping around to the first samples, which is harmless for calibration."""
    head = None
    for x, _ in ds.batches(batch_size, limit):
        if head is None:
            head = x
        if len(x) < batch_size:
            reps = int(np.ceil(batch_size / len(head))) + 1
            x = np.concatenate([x, *([head] * reps)])[:batch_size]
        yield x


def state_digest(model: torch.nn.Module) -> str:
    """Digest of the weights, so a retrained checkpoint invalidates every cached artifact."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RecipeState:
    """The recipe's lazily loaded pieces (model, datasets), loaded at most once per session."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @cached_property
    def model(self) -> torch.nn.Module:
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
        export.check_model_accepts(model, self.recipe.input, f"Recipe({self.recipe.name}).model")
        return model

    @cached_property
    def weights(self) -> str:
        return self.recipe.weights_id + state_digest(self.model)

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
        first, _ = next(iter(ds.batches(1)))
        if tuple(first.shape[1:]) != tuple(self.recipe.input.shape[1:]):
            raise DataError(f"Recipe({self.recipe.name}).{field} ({ds.name}) yields inputs of shape "
                            f"{tuple(first.shape[1:])} per sample, but InputSpec.shape is "
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


class ArtifactBuilder:
    """Builds (or finds in the cache) each mode's artifacts for one recipe."""

    def __init__(self, state: RecipeState, cache: ArtifactCache, progress: bool = False,
                 device: str = "cpu") -> None:
        self.state = state
        self.recipe = state.recipe
        self.cache = cache
        self.progress = progress
        #: where calibration and QAT fine-tuning run (part of those artifacts' cache keys: CUDA
        #: and CPU kernels round differently, so their results are different artifacts)
        self.device = device
        self._torch: dict[str, Artifact] = {}
        self._onnx: dict[str, Artifact] = {}

    # ---- cache keys ---------------------------------------------------------------------------
    def _parts(self, mode: str) -> dict:
        r = self.recipe
        parts = {"recipe": r.name, "mode": mode, "weights": self.state.weights,
                 "input": [r.input.name, list(r.input.shape), r.input.dtype,
                           sorted((k, list(v)) for k, v in r.input.dynamic.items())],
                 "outputs": list(r.output_names), "versions": library_versions()}
        if mode in ("trt_ptq", "partial", "torch_ptq", "qat"):
            parts["quant"] = repr(r.quant)
            parts["calib"] = self.calib_id()
        if mode in ("torch_ptq", "qat"):
            parts["device"] = self.device.split(":")[0]
        if mode == "qat":
            parts["qat"] = repr(r.qat)
            parts["train"] = self.state.train_data.fingerprint()
        return parts

    def calib_batches(self) -> Iterator[np.ndarray]:
        """The recipe's calibration batches at the opt shape (also fed to TensorRT's calibrators)."""
        r = self.recipe
        return fixed_batches(self.state.calib_data, r.input.batch_size, r.quant.calib_batches)

    def calib_id(self) -> str:
        """Fingerprint of the calibration data (keys calibrated artifacts and TensorRT caches)."""
        return self.state.calib_data.fingerprint()

    # ---- torch ------------------------------------------------------------------------------
    def _torch_quant_config(self):
        from qatcheck.build.torch_quant import TorchQuantConfig

        return TorchQuantConfig.from_settings(self.recipe.quant)

    def _quantized_state(self, mode: str) -> Path:
        from qatcheck.build import torch_quant

        cfg = self._torch_quant_config()

        def build_ptq(path: Path) -> None:
            qm = torch_quant.quantize_model(self.state.model, cfg)
            torch_quant.calibrate(qm, self.calib_batches(), cfg, device=self.device, progress=self.progress)
            torch_quant.save_quantized(qm, path, cfg)

        def build_qat(path: Path) -> None:
            from qatcheck.build.qat import QATConfig, finetune

            qm = self.torch_artifact("torch_ptq").module
            q = self.recipe.qat
            epochs = iter(range(1 << 30))
            finetune(qm, lambda: shuffled_batches(self.state.train_data, q.batch_size, next(epochs)),
                     QATConfig(epochs=q.epochs, lr=q.lr, batch_size=q.batch_size,
                               max_batches_per_epoch=q.max_batches_per_epoch),
                     loss_fn=self.recipe.loss, device=self.device,
                     progress=self.progress)
            torch_quant.save_quantized(qm, path, cfg)

        build = build_ptq if mode == "torch_ptq" else build_qat
        return self.cache.get_or_build(f"{self.recipe.name}-{mode}-state", self._parts(mode), ".pt", build)

    def torch_artifact(self, mode: str) -> Artifact:
        """A fresh-per-session torch module for the mode (fp16 conversion happens in the runner)."""
        if mode not in self._torch:
            if mode in ("torch_ptq", "qat"):
                from qatcheck.build import torch_quant

                path = self._quantized_state(mode)
                module = torch_quant.load_quantized(copy.deepcopy(self.state.model),
                                                    self._torch_quant_config(), path)
                art = Artifact("torch", "int8", module=module.eval(), path=path, digest=file_digest(path))
            else:
                art = Artifact("torch", PRECISION[mode], module=copy.deepcopy(self.state.model),
                               digest=self.state.weights[-16:])
            self._torch[mode] = art
        # every runner gets its own copy: the fp16 runner converts in place
        a = self._torch[mode]
        return Artifact(a.kind, a.precision, module=copy.deepcopy(a.module), path=a.path, digest=a.digest)

    # ---- onnx -------------------------------------------------------------------------------
    def onnx_artifact(self, mode: str) -> Artifact:
        if mode not in self._onnx:
            path, info = self._build_onnx(mode)
            precision = "int8" if mode in ("trt_ptq", "partial", "torch_ptq", "qat") else PRECISION[mode]
            self._onnx[mode] = Artifact("onnx", precision, path=path, digest=file_digest(path), info=info)
        return self._onnx[mode]

    def _build_onnx(self, mode: str) -> tuple[Path, dict]:
        r = self.recipe
        name = f"{r.name}-{mode}"
        parts = self._parts(mode)
        if mode in ("fp32", "dynamic"):
            def build(path: Path) -> None:
                export.export_onnx(self.state.model, r.input, path, r.output_names,
                                   dynamic=(mode == "dynamic"))
            return self.cache.get_or_build(name, parts, ".onnx", build), {}
        if mode == "fp16":
            src = self.onnx_artifact("fp32").path
            return self.cache.get_or_build(name, parts, ".onnx", lambda p: export.convert_fp16(src, p)), {}
        if mode in ("trt_ptq", "partial"):
            from qatcheck.build.onnx_ptq import OnnxPTQConfig, quantize_onnx

            q = r.quant
            cfg = OnnxPTQConfig(calibrator=q.calibrator, percentile=q.percentile,
                                per_channel=q.per_channel,
                                exclude=tuple(q.keep_precision) if mode == "partial" else ())
            src = self.onnx_artifact("fp32").path
            info: dict = {"calibrator": q.calibrator}
            if mode == "partial":
                info["kept"] = list(q.keep_precision)

            def build_ptq(path: Path) -> None:
                quantize_onnx(src, path, self.calib_batches(), cfg, input_name=r.input.name,
                              progress=self.progress)
            return self.cache.get_or_build(name, parts, ".onnx", build_ptq), info
        if mode in ("torch_ptq", "qat"):
            from qatcheck.build import torch_quant

            def build_qdq(path: Path) -> None:
                module = self.torch_artifact(mode).module
                torch_quant.export_qdq_onnx(module, export.example_input(r.input), path,
                                            r.input.name, r.output_names)
            return self.cache.get_or_build(name, parts, ".onnx", build_qdq), {
                "calibrator": r.quant.torch_calibrator}
        raise ArtifactError(f"no ONNX build for mode {mode!r}")
