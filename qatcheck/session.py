"""The session: runs cases, keeps one measurement per case, checks them against baselines.

Everything a pytest test does goes through here, so the plugin stays a thin layer of hooks and the
logic can be used (and tested) without pytest.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from qatcheck import fingerprint as fpr
from qatcheck.artifacts import ArtifactBuilder, RecipeState
from qatcheck.backends.base import Backend, Runner
from qatcheck.baselines import BaselineStore, Update
from qatcheck.cache import ArtifactCache
from qatcheck.errors import ConfigError
from qatcheck.measurement import Case, Measurement
from qatcheck.modes import INT8_MODES, ONNX_ONLY_MODES, parity_reference, unsupported_reason
from qatcheck.parity import ParityAccumulator
from qatcheck.recipe import ParityThresholds, Recipe
from qatcheck.tasks import make_task
from qatcheck import timing

#: comparisons of floats read back from JSON
EPS = 1e-9


@dataclass
class Options:
    baselines_dir: Path = Path("baselines")
    reports_dir: Path = Path("reports")
    cache_dir: Path = Path(".qatcheck_cache")
    use_cache: bool = True
    update_baselines: bool = False
    require: tuple[str, ...] = ()
    device: str = "auto"
    ort_provider: str = "auto"
    latency_iterations: int = 200
    warmup_s: float = 0.2
    #: cap on the timed loop per case (seconds; None = always ``latency_iterations``)
    latency_duration_s: float | None = 3.0
    progress: bool = True
    #: CUDA timing: replay a captured CUDA graph (auto: fall back to eager events if capture fails)
    cuda_graph: str = "auto"
    #: TensorRT int8 form for trt_ptq/partial: auto | native (TensorRT calibrator) | qdq
    trt_ptq: str = "auto"


@dataclass
class CheckResult:
    """What a check found: failure lines, or a skip reason. Never raises for a regression, so the
    same result feeds the assertion and the report."""

    failures: list[str] = field(default_factory=list)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def calibrator_for(recipe: Recipe, mode: str) -> str:
    if mode in ONNX_ONLY_MODES:
        return recipe.quant.calibrator
    if mode in ("torch_ptq", "qat"):
        return recipe.quant.torch_calibrator
    return "-"


def pad_batch(x: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Zero-pad a short final batch for static-shape graphs; return it and the real count."""
    n = len(x)
    if n >= size:
        return x, n
    pad = np.zeros((size - n, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad]), n


def resize(x: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
    """Resize NCHW inputs to the case's spatial shape (dynamic H/W profiles)."""
    if tuple(x.shape[2:]) == tuple(hw):
        return x
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=tuple(hw), mode="bilinear",
                                        align_corners=False)
    return t.numpy()


class QatcheckSession:
    def __init__(self, options: Options, backends: dict[str, Backend]) -> None:
        self.options = options
        self.backends = backends
        self.store = BaselineStore(options.baselines_dir)
        self.cache = ArtifactCache(options.cache_dir, enabled=options.use_cache)
        self.recipes: dict[str, Recipe] = {}
        self._states: dict[str, RecipeState] = {}
        self._builders: dict[str, ArtifactBuilder] = {}
        self._runners: dict[tuple, Runner] = {}
        self._tasks: dict[str, object] = {}
        self.measurements: dict[Case, Measurement] = {}
        self.check_results: dict[tuple[Case, str], CheckResult] = {}

    # ---- cases ------------------------------------------------------------------------------
    def register(self, recipe: Recipe) -> None:
        known = self.recipes.get(recipe.name)
        if known is not None and known is not recipe and known != recipe:
            raise ConfigError(f"two different recipes are named {recipe.name!r}; names key baselines "
                              "and reports, so they must be unique")
        self.recipes[recipe.name] = recipe

    def cases(self, recipe: Recipe, modes: Iterable[str] | None = None,
              backends: Iterable[str] | None = None) -> list[Case]:
        """Every (mode, backend, shape) of the recipe that makes sense, in table order."""
        self.register(recipe)
        modes = [m for m in recipe.modes if modes is None or m in modes]
        backends = [b for b in recipe.backends if backends is None or b in backends]
        out = []
        for mode in modes:
            shapes = ("min", "opt", "max") if mode == "dynamic" else ("opt",)
            for backend in backends:
                if unsupported_reason(mode, backend):
                    continue
                out.extend(Case(recipe.name, mode, backend, s) for s in shapes)
        return out

    def unavailable_reason(self, backend: str) -> str | None:
        b = self.backends.get(backend)
        return f"no backend named {backend!r}" if b is None else b.unavailable_reason()

    def builder(self, recipe_name: str) -> ArtifactBuilder:
        if recipe_name not in self._builders:
            state = RecipeState(self.recipes[recipe_name])
            self._states[recipe_name] = state
            self._builders[recipe_name] = ArtifactBuilder(state, self.cache, self._show_progress(),
                                                          device=self._train_device())
        return self._builders[recipe_name]

    def _train_device(self) -> str:
        """Where calibration and QAT run: the torch backend's device (CUDA when present)."""
        from qatcheck.backends.torch_backend import resolve_device

        return resolve_device(self.options.device)

    def task(self, recipe_name: str):
        """The recipe's task, built once (detection needs the eval set's ground truth)."""
        if recipe_name not in self._tasks:
            self.builder(recipe_name)
            self._tasks[recipe_name] = make_task(self.recipes[recipe_name],
                                                 lambda: self._states[recipe_name].eval_data)
        return self._tasks[recipe_name]

    def runner(self, case: Case) -> Runner:
        key = (case.recipe, case.mode, case.backend)
        if key not in self._runners:
            backend = self.backends[case.backend]
            b = self.builder(case.recipe)
            if "torch" in backend.accepts():
                self._runners[key] = backend.runner(b.torch_artifact(case.mode))
            elif case.backend == "tensorrt":
                self._runners[key] = backend.runner(b.onnx_artifact(case.mode), self._trt_context(case))
            else:
                self._runners[key] = backend.runner(b.onnx_artifact(case.mode))
        return self._runners[key]

    def _trt_context(self, case: Case):
        """What the TensorRT backend needs to plan a build: it may build from another mode's ONNX
        (fp32 ONNX + TensorRT's own calibrator on TensorRT <= 10) and calibrate itself."""
        from qatcheck.backends.tensorrt_backend import BuildContext

        b = self.builder(case.recipe)
        return BuildContext(recipe=self.recipes[case.recipe], mode=case.mode,
                            cache_dir=self.options.cache_dir, onnx_artifact=b.onnx_artifact,
                            calib_batches=b.calib_batches, calib_id=b.calib_id(),
                            use_cache=self.options.use_cache, ptq_form=self.options.trt_ptq,
                            cuda_graph=self.options.cuda_graph)

    def shape(self, case: Case) -> tuple[int, ...]:
        return self.recipes[case.recipe].input.profile()[case.shape]

    # ---- measuring --------------------------------------------------------------------------
    def _show_progress(self) -> bool:
        """Progress bars only on an interactive terminal: in CI logs they are noise."""
        stream = sys.__stderr__
        return self.options.progress and stream is not None and stream.isatty()

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.__stderr__,
                    disable=not self._show_progress(), unit="batch")

    def measure(self, case: Case) -> Measurement:
        """Evaluate the case over the whole eval set (streaming), with parity against its
        reference computed on the same batches. Done once per case per session."""
        if case in self.measurements:
            return self.measurements[case]
        recipe = self.recipes[case.recipe]
        task = self.task(case.recipe)
        runner = self.runner(case)
        ref = parity_reference(case.mode, case.backend)
        ref_runner = self.runner(Case(case.recipe, ref[0], "torch", case.shape)) if ref else None
        shape = self.shape(case)
        data = self._states[case.recipe].eval_data
        metric, agreement = task.metric(), task.agreement()
        parities: list[ParityAccumulator] = []
        n_batches = -(-len(data) // shape[0])
        t0 = time.perf_counter()
        with self._progress(n_batches, case.id) as bar:
            for x, y in data.batches(shape[0]):
                xb, n = pad_batch(resize(x, shape[2:]), shape[0])
                outs = [o[:n] for o in runner.infer(xb)]
                if bar.n == 0 and hasattr(task, "check_model"):
                    task.check_model(outs)  # e.g. a detector's class count vs the data's
                metric.update(outs, y)
                if ref_runner is not None:
                    routs = [o[:n] for o in ref_runner.infer(xb)]
                    if not parities:
                        parities = [ParityAccumulator() for _ in routs]
                    for acc, r, o in zip(parities, routs, outs):
                        acc.update(r, o)
                    agreement.update(routs, outs)
                bar.update()
        m = Measurement(case=case, calibrator=calibrator_for(recipe, case.mode), device=runner.device,
                        shape=tuple(shape), metrics=metric.result(),
                        artifact=self._artifact_digest(case, runner),
                        eval_samples=len(data), eval_seconds=time.perf_counter() - t0)
        if ref_runner is not None:
            par = parities[0].result()
            if len(parities) > 1:  # several outputs: the worst one speaks for the model
                worst = min((p.result() for p in parities), key=lambda d: d["cosine"])
                par = {**worst, "max_abs": max(p.result()["max_abs"] for p in parities)}
            m.parity = {**par, **agreement.result()}
            m.parity_reference = f"torch {ref[0]} ({ref[1]})"
        self.measurements[case] = m
        return m

    def _artifact_digest(self, case: Case, runner: Runner) -> str:
        """What was measured: the ONNX file's digest (TensorRT: the engine's plan key)."""
        if case.backend == "torch":
            return ""
        plan = getattr(runner, "plan", None)
        if plan is not None and getattr(plan, "cache_key", None):
            return plan.cache_key
        return self.builder(case.recipe).onnx_artifact(case.mode).digest

    # ---- checks -----------------------------------------------------------------------------
    def _stage(self, case: Case, section: str, name: str, value: float, tolerance: float,
               fingerprint: str | None = None, device: str | None = None) -> None:
        self.store.stage(case.recipe, Update(case.key, section, name, float(value), float(tolerance),
                                             fingerprint, device))

    def _missing(self, case: Case, what: str) -> str:
        return (f"no baseline for {case.key} {what} in {self.store.path(case.recipe)}; "
                "record it with --update-baselines")

    def check_accuracy(self, case: Case) -> CheckResult:
        recipe = self.recipes[case.recipe]
        task = self.task(case.recipe)
        m = self.measure(case)
        res = CheckResult()
        tol = recipe.tolerances
        for name in task.metric_names:
            value = m.metrics[name]
            if self.options.update_baselines:
                self._stage(case, "metrics", name, value, tol.metric_points)
                continue
            base = self.store.get(case.recipe, case.key, "metrics", name)
            if base is None:
                res.failures.append(self._missing(case, f"metrics.{name}"))
            elif value < base["value"] - base["tolerance"] / 100 - EPS:
                res.failures.append(
                    f"{name} {value:.2%} is below the baseline {base['value']:.2%} by "
                    f"{(base['value'] - value) * 100:.2f} points (tolerance {base['tolerance']:g} "
                    f"points) [{self.store.path(case.recipe)}]")
        budget = tol.fp32_budget_points.get(case.mode)
        if budget is not None and case.shape == "opt":
            fp32 = self.measure(case.with_mode("fp32"))
            p = task.primary_metric
            drop = (fp32.metrics[p] - m.metrics[p]) * 100
            if drop > budget + EPS:
                res.failures.append(f"{p} {m.metrics[p]:.2%} is {drop:.2f} points below fp32 "
                                    f"{fp32.metrics[p]:.2%} on {case.backend} (budget {budget:g} points)")
        self.check_results[(case, "accuracy")] = res
        return res

    def parity_thresholds(self, case: Case) -> ParityThresholds | None:
        ref = parity_reference(case.mode, case.backend)
        if ref is None:
            return None
        tol = self.recipes[case.recipe].tolerances
        if ref[1] == "quantization":
            return tol.quant_parity
        return tol.export_parity.get(case.mode, tol.quant_parity)

    def check_parity(self, case: Case) -> CheckResult:
        recipe = self.recipes[case.recipe]
        task = self.task(case.recipe)
        m = self.measure(case)
        res = CheckResult()
        thr = self.parity_thresholds(case)
        if m.parity is None or thr is None:
            res.skipped = f"{case.id} is the parity reference (PyTorch fp32) itself"
            self.check_results[(case, "parity")] = res
            return res
        p, agree = m.parity, task.agreement_name
        vs = f"vs {m.parity_reference}"
        bad = [k for k in ("cosine", agree, "max_abs") if not math.isfinite(p.get(k, 0.0))]
        if bad:  # NaN compares False against every floor: it must fail explicitly
            res.failures.append(f"non-finite parity {', '.join(f'{k}={p[k]}' for k in bad)} {vs}: the "
                                "outputs contain NaN or inf (fp16 overflow, a zero scale?)")
            self.check_results[(case, "parity")] = res
            return res
        if p["cosine"] < thr.min_cosine - EPS:
            res.failures.append(f"cosine {p['cosine']:.6f} {vs} is below the floor {thr.min_cosine}")
        if p[agree] < thr.min_top1_agreement - EPS:
            res.failures.append(f"{agree} {p[agree]:.2%} {vs} is below the floor "
                                f"{thr.min_top1_agreement:.2%}")
        if thr.max_abs is not None and p["max_abs"] > thr.max_abs + EPS:
            res.failures.append(f"max_abs {p['max_abs']:.3g} {vs} is above the ceiling {thr.max_abs:g}")
        tol = recipe.tolerances
        for name, t in (("cosine", tol.parity_cosine), (agree, tol.parity_agreement)):
            if self.options.update_baselines:
                self._stage(case, "parity", name, p[name], t)
                continue
            base = self.store.get(case.recipe, case.key, "parity", name)
            if base is None:
                res.failures.append(self._missing(case, f"parity.{name}"))
            elif p[name] < base["value"] - base["tolerance"] - EPS:
                res.failures.append(f"{name} {p[name]:.6f} {vs} fell below the baseline "
                                    f"{base['value']:.6f} - tolerance {base['tolerance']:g}")
        self.check_results[(case, "parity")] = res
        return res

    def check_latency(self, case: Case, benchmark=None) -> CheckResult:
        recipe = self.recipes[case.recipe]
        res = CheckResult()
        m = self.measure(case)
        runner = self.runner(case)
        shape = self.shape(case)
        x, _ = next(iter(self._states[case.recipe].eval_data.batches(shape[0])))
        x, _ = pad_batch(resize(x, shape[2:]), shape[0])
        call = runner.timed_call(x)
        if getattr(call, "note", ""):
            res.notes.append(call.note)
        stats = timing.measure(call, shape[0], self.options.latency_iterations,
                               self.options.warmup_s, benchmark, self.options.latency_duration_s)
        if stats is None:
            res.skipped = "latency not measured: pytest-benchmark is disabled (--benchmark-disable)"
            self.check_results[(case, "latency")] = res
            return res
        fp = fpr.device_fingerprint(runner.device, runner.versions())
        fid = fpr.fingerprint_id(fp)
        m.latency, m.fingerprint, m.fingerprint_id = stats, fp, fid
        m.notes = res.notes  # the same list: notes added below reach the report too
        if stats.noisy:
            msg = (f"{case.id}: latency CV {stats.cv:.1%} exceeds {timing.CV_WARNING:.1%}; the machine "
                   "is noisy, medians are less trustworthy")
            res.notes.append(f"latency CV above {timing.CV_WARNING:.1%}: the machine is noisy, medians "
                             "are less trustworthy")
            warnings.warn(msg, stacklevel=2)
        if case.mode in INT8_MODES and runner.device == "CPUExecutionProvider":
            res.notes.append("int8 Q/DQ on onnxruntime CPU runs as fake-quant: not an int8 latency")
        tol = recipe.tolerances.latency_rel
        if self.options.update_baselines:
            self._stage(case, "latency", "median_ms", stats.median_ms, tol, fid, fpr.describe(fp))
        else:
            base = self.store.get(case.recipe, case.key, "latency", "median_ms", fid)
            if base is None:
                res.skipped = (f"no latency baseline for {case.key} on this device (fingerprint {fid}: "
                               f"{fpr.describe(fp)}); record one with --update-baselines")
            elif stats.median_ms > base["value"] * (1 + base["tolerance"]) + EPS:
                res.failures.append(
                    f"median latency {stats.median_ms:.4f} ms is {stats.median_ms / base['value'] - 1:+.1%} "
                    f"vs the baseline {base['value']:.4f} ms on this device (tolerance "
                    f"+{base['tolerance']:.0%}; p90 {stats.p90_ms:.4f} ms, CV {stats.cv:.1%})")
        self.check_results[(case, "latency")] = res
        return res

    def check_precision(self, case: Case, expect: dict) -> CheckResult:
        """The TensorRT precision audit against a recipe's expectation.

        ``expect`` maps a layer kind (``conv``, ``gemm``) to the precision(s) it must run in, plus
        optional ``max_reformats``; layers the recipe keeps in higher precision are exempt. Other
        backends have no engine to inspect: the check skips there.
        """
        from qatcheck.backends.trt_audit import PrecisionAuditError

        res = CheckResult()
        audit = getattr(self.runner(case), "audit", None) if case.backend == "tensorrt" else None
        if audit is None:
            res.skipped = f"{case.backend} has no engine precision audit (TensorRT only)"
        else:
            expect = dict(expect)
            max_reformats = expect.pop("max_reformats", None)
            kept = self.recipes[case.recipe].quant.keep_precision if case.mode == "partial" else ()
            res.notes.append(audit.describe())
            try:
                for kind, precision in expect.items():
                    audit.assert_all(kind, precision, except_layers=kept)
                if max_reformats is not None:
                    audit.assert_reformats(int(max_reformats))
            except PrecisionAuditError as exc:
                res.failures.append(f"{exc} [{audit.describe()}]")
        self.check_results[(case, "precision")] = res
        return res
