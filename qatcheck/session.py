"""The session: measure -> judge -> record, one case at a time.

- :meth:`QatcheckSession.measure` runs a case and returns its :class:`Measurement` (the parts the
  caller needs: the eval pass, the latency loop); each part is measured once per session.
- ``check_*`` hand the measurement, the stored baseline and the tolerances to a pure judge
  (:mod:`qatcheck.judges`) and return its :class:`Verdict`.
- :meth:`QatcheckSession.record` is the one place that owns ``--update-baselines``: it stages a
  verdict's values for the baseline store, unless the case failed; :meth:`QatcheckSession.finish`
  writes them once, at the end (after :mod:`qatcheck.report` rendered the tables).
- A recipe's world (builder, cache, task, data) is its :class:`~qatcheck.workspace.RecipeWorkspace`;
  which cases exist and what they are compared with comes from :mod:`qatcheck.cases`; a failed case
  is handed to its reproduction bundle and localization as a :class:`~qatcheck.workspace.CaseView`.

Everything a pytest test does goes through here, so the plugin stays a thin layer of hooks and the
logic can be used (and tested) without pytest.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from qatcheck import fingerprint as fpr
from qatcheck import cases, judges, report, results, timing
from qatcheck.artifacts import ArtifactBuilder, onnx_quantizer_for
from qatcheck.backends import create_backend, executes
from qatcheck.backends.base import Backend, BuildContext, Runner
from qatcheck.baselines import BaselineStore
from qatcheck.cache import ArtifactCache
from qatcheck.data.base import inputs_fingerprint
from qatcheck.data.batching import pad_batch, resize
from qatcheck.errors import BaselineError, ConfigError, DataError
from qatcheck.evaluate import combined_parity, evaluate
from qatcheck.fsutil import file_digest, trim_heap
from qatcheck.measurement import PARTS, Case, Measurement, Verdict
from qatcheck.modes import calibrator_of, parity_reference, resolve, spec as mode_spec
from qatcheck.options import Options
from qatcheck.recipe import ParityThresholds, Recipe, is_onnx_only
from qatcheck.reference_store import ReferenceStore
from qatcheck.report_files import Run
from qatcheck.tasks.base import metric_spec
from qatcheck.workspace import CaseView, RecipeWorkspace

__all__ = ["Options", "QatcheckSession"]


#: the note under a table whose latency column is empty for want of a baseline
UNTIMED_NOTE = ("latency: a case is timed only where its latency is judged or recorded (a baseline for "
                "this device, --update-baselines, a speedup floor); --qatcheck-latency always times every case")


#: the most bytes of parity-reference outputs a session keeps at once (_eval_infer): a reference
#: whose outputs for the whole eval set fit is run once; a larger one runs again for each case
MEMO_BYTES = 256 << 20


class QatcheckSession:
    def __init__(self, options: Options, backends: dict[str, Backend] | None = None) -> None:
        self.options = options
        self.run = Run()  # who wrote a report row, and when (report_files merges overlapping runs)
        #: backends by name; the ones not given are created from the registry on first use
        self._backends: dict[str, Backend] = dict(backends or {})
        self.store = BaselineStore(options.baselines_dir)
        self.cache = ArtifactCache(options.cache_dir, enabled=options.use_cache)
        #: measured parts reused while nothing that determines them changed (qatcheck.results)
        self.results = results.ResultCache(Path(options.cache_dir) / "results",
                                           read=options.use_cache and not options.remeasure)
        self.references = ReferenceStore(options.latency_reference_dir or Path(options.cache_dir) / "latency-reference")
        self.recipes: dict[str, Recipe] = {}
        self._workspaces: dict[str, RecipeWorkspace] = {}
        self._runners: dict[tuple, Runner] = {}
        #: a reference case's outputs per input batch, for the recipe being measured (_eval_infer)
        self._outputs: dict[Case, dict[str, list[np.ndarray]]] = {}
        self._reference_sets: dict[str, set[Case]] = {}
        self._memo_bytes = 0
        #: each recipe's task, kept when its workspace is let go (the report reads it at the end)
        self._tasks: dict[str, Any] = {}
        #: the cases this run measures (the plugin's collected ones): a parity reference's outputs
        #: are kept where two of them read it; None: nothing is kept
        self.selected: set[Case] | None = None
        self.measurements: dict[Case, Measurement] = {}
        self.verdicts: dict[tuple[Case, str], Verdict] = {}
        #: pytest outcomes per case and test (filled by the plugin; the report's verdict column)
        self.outcomes: dict[Case, dict[str, str]] = {}
        #: what a failed check's message adds to its verdict - where the damage enters, the
        #: reproduction command (filled by the plugin; the report's Failures section)
        self.failure_details: dict[tuple[Case, str], list[str]] = {}
        #: verdicts whose values --update-baselines refused to record (the case failed)
        self.refused: list[Verdict] = []
        #: error message -> the test that reported it first (one message per root cause)
        self.errors: dict[str, str] = {}

    # ---- cases ------------------------------------------------------------------------------
    def register(self, recipe: Recipe) -> None:
        known = self.recipes.get(recipe.name)
        if known is not None and known is not recipe and known != recipe:
            raise ConfigError(f"two different recipes are named {recipe.name!r}; names key baselines "
                              "and reports, so they must be unique")
        self.recipes[recipe.name] = recipe

    def cases(self, recipe: Recipe, modes: Iterable[str] | None = None,
              backends: Iterable[str] | None = None) -> list[Case]:
        """The recipe, registered, and its cases (the planner's: :func:`qatcheck.cases.plan`)."""
        self.register(recipe)
        return cases.plan(recipe, modes, backends)

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            self._backends[name] = create_backend(name, self.options)
        return self._backends[name]

    def unavailable_reason(self, backend: str) -> str | None:
        try:
            b = self.backend(backend)
        except ConfigError as exc:
            return str(exc)
        return b.unavailable_reason()

    def workspace(self, recipe_name: str) -> RecipeWorkspace:
        """The recipe's world (builder, cache, task, data), made once per session with its options."""
        if recipe_name not in self._workspaces:
            self._workspaces[recipe_name] = RecipeWorkspace(
                self.recipes[recipe_name], self.cache, progress=self._show_progress(),
                device=self._train_device(), onnx_quantizer=onnx_quantizer_for(self.options))
        return self._workspaces[recipe_name]

    def builder(self, recipe_name: str) -> ArtifactBuilder:
        return self.workspace(recipe_name).builder

    def _train_device(self) -> str:
        """Where calibration and QAT run: the torch backend's device (CUDA when present)."""
        from qatcheck.backends.torch_backend import resolve_device

        return resolve_device(self.options.device)

    def task(self, recipe_name: str):
        """The recipe's task, built once (detection needs the eval set's ground truth)."""
        if recipe_name not in self._tasks:
            self._tasks[recipe_name] = self.workspace(recipe_name).task
        return self._tasks[recipe_name]

    def context(self, case: Case) -> BuildContext:
        """The same build context for every backend: it takes the artifact it executes from it."""
        b = self.builder(case.recipe)
        dynamic = case.dynamic
        return BuildContext(recipe=self.recipes[case.recipe], mode=case.mode, dynamic=dynamic,
                            torch_artifact=b.torch_artifact, torch_identity=b.torch_identity,
                            onnx_artifact=lambda mode: b.onnx_artifact(mode, dynamic),
                            calib_batches=b.calib_batches, calib_id=b.calib_id(), options=self.options,
                            cache_dir=self.options.cache_dir, use_cache=self.options.use_cache)

    def runner(self, case: Case) -> Runner:
        key = (case.recipe, case.mode, case.backend, case.dynamic)
        if key not in self._runners:
            self._runners[key] = self.backend(case.backend).runner(self.context(case))
        return self._runners[key]

    def shape(self, case: Case) -> tuple[int, ...]:
        return cases.input_shape(self.recipes[case.recipe], case)

    def reference_case(self, case: Case) -> Case | None:
        return cases.reference_case(self.recipes[case.recipe], case)

    def skip_reason(self, case: Case) -> str | None:
        return cases.skip_reason(self.recipes[case.recipe], case)

    def case_view(self, case: Case) -> CaseView:
        """``case`` as its reproduction bundle and localization read it (what ran it and its
        reference, its floors, its measurement, where its reports go): they never see the session."""
        ref = self.reference_case(case)
        debug = getattr(self.backend(case.backend), "debug_tensors", None)
        return CaseView.of(case, self.workspace(case.recipe), self.options.reports_dir,
                           runner=self.runner(case), reference=ref,
                           reference_runner=self.runner(ref) if ref is not None else None,
                           measurement=self.measurements.get(case),
                           debug_tensors=(lambda: debug(self.context(case))) if debug is not None else None)

    # ---- measuring --------------------------------------------------------------------------
    def _show_progress(self) -> bool:
        """Progress bars only on an interactive terminal: in CI logs they are noise."""
        stream = sys.__stderr__
        return self.options.progress and stream is not None and stream.isatty()

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.__stderr__,
                    disable=not self._show_progress(), unit="batch")

    def measure(self, case: Case, parts: Iterable[str] = ("eval",), benchmark=None) -> Measurement:
        """The case's measurement holding at least ``parts`` (``eval``: metrics and parity over
        the whole eval set; ``latency``: the timed loop, through ``benchmark`` when given). Each
        part is measured once per session; a later part makes a new record with both."""
        parts = set(parts)
        unknown = parts - set(PARTS)
        if unknown:
            raise ConfigError(f"unknown measurement part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
        m = self.measurements.get(case) or Measurement(
            case=case, calibrator=calibrator_of(case.mode, self.recipes[case.recipe].quant, self.options),
            shape=tuple(self.shape(case)))
        measure = {"eval": self._measure_eval, "structure": self._measure_structure,
                   "latency": lambda c: self._measure_latency(c, benchmark)}
        for part in PARTS:
            if part in parts and part not in m.parts:
                m = self._extend(m, part, self._measured(case, part, measure[part]))
        if m.settings is None:  # read once its artifact exists (a missing library has skipped by then)
            m = dataclasses.replace(m, settings=self.builder(case.recipe).settings(case.mode))
            self.measurements[case] = m
        return m

    def _measured(self, case: Case, part: str, measure) -> dict:
        """The part's values: reused from the result cache while every input of its key is
        unchanged (qatcheck.results), else measured and stored for the next run; with the
        seconds spent (building artifacts, measuring) and whether it was reused."""
        start, built = time.perf_counter(), self.cache.build_seconds
        cached = part in results.CACHED_PARTS
        key, inputs = self._result_key(case, part) if cached else (None, None)
        new = self.results.get(key, part) if key else None
        reused = new is not None
        if reused:
            if part == "eval":  # what the session checks on the first batch of a measured run
                self._check_outputs(case, new.get("output_shapes"))
        else:
            new = measure(case)
            if cached:
                key, inputs = self._result_key(case, part)  # the artifacts exist now
                if key:
                    self.results.put(key, part, inputs, new)
        build = self.cache.build_seconds - built
        seconds = {part: time.perf_counter() - start - build, **({"build": build} if build else {})}
        return {**new, "seconds": seconds, "reused": frozenset({part} if reused else ())}

    def _result_key(self, case: Case, part: str) -> tuple[str | None, dict | None]:
        """The part's result-cache key and what it holds (qatcheck.results); (None, None) where
        the case's backend (or its reference's) cannot name what it executes before building it."""
        recipe = self.recipes[case.recipe]
        try:
            ident = self.backend(case.backend).identity(self.context(case))
            if ident is None:
                return None, None
            inputs = {"part": part, "case": [case.recipe, case.mode, case.backend, case.shape],
                      "shape": list(self.shape(case)), **ident}
            if part == "eval":
                ref = self.reference_case(case)
                if ref is not None:
                    rid = self.backend(ref.backend).identity(self.context(ref))
                    if rid is None:
                        return None, None
                    inputs["reference"] = {"case": [ref.mode, ref.backend, ref.shape], **rid}
                data = self.workspace(case.recipe).eval_data
                # the dataset's class by its file where it is the user's (what batches() computes)
                inputs.update(eval_data=[data.fingerprint(), inputs_fingerprint(data), results.code_identity(type(data))],
                              samples=cases.subset(recipe, case, len(data)),
                              task=results.task_identity(recipe), onnx_only=is_onnx_only(recipe))
        except Exception:  # noqa: BLE001 - measured instead; measuring raises the cause where it is one
            return None, None
        return results.result_key(inputs), inputs

    def _extend(self, m: Measurement, part: str, new: dict) -> Measurement:
        notes = tuple(dict.fromkeys(m.notes + new.pop("notes", ())))
        seconds = dict(m.seconds)
        for k, v in new.pop("seconds", {}).items():
            seconds[k] = seconds.get(k, 0.0) + v
        reused = m.reused | new.pop("reused", frozenset())
        m = dataclasses.replace(m, **new, notes=notes, parts=m.parts | {part}, seconds=seconds, reused=reused)
        self.measurements[m.case] = m
        return m

    def remeasure_latency(self, case: Case) -> Measurement:
        """A fresh latency loop for a case that looked slower (pytest-benchmark's fixture times
        only once per test, so re-measurements use qatcheck's own loop)."""
        m = self.measure(case, ("latency",))
        new = self._measure_latency(case, None)
        attempts = dict(latency_attempts=m.latency_attempts + 1,
                        latency_attempt_medians=m.latency_attempt_medians + tuple(new.pop("latency_attempt_medians", ())))
        if m.latency is not None and new["latency"] is not None and _speed(new["latency"]) >= _speed(m.latency):
            # interference only ever adds time: the fastest attempt is the model's latency
            new = {}
        return self._extend(m, "latency", {**new, **attempts})

    def _measure_eval(self, case: Case) -> dict:
        """Evaluate the case over the whole eval set (streaming), with parity against its reference
        computed on the same batches."""
        recipe = self.recipes[case.recipe]
        task = self.task(case.recipe)
        runner = self.runner(case)
        ref_case = self.reference_case(case)
        ref_runner = self.runner(ref_case) if ref_case else None
        shape = self.shape(case)
        data = self.workspace(case.recipe).eval_data

        def named(count: int) -> list[str]:
            return [recipe.output_names[i] if i < len(recipe.output_names) else f"output{i}" for i in range(count)]

        at_opt = self._at_opt(case)

        def check_outputs(outs) -> None:
            self._check_outputs(case, {n: o.shape[1:] for n, o in zip(named(len(outs)), outs)})

        subset = cases.subset(recipe, case, len(data))
        with self._progress(-(-(subset or len(data)) // shape[0]), case.id) as bar:
            batches = self.workspace(case.recipe).eval_batches(
                case, max_samples=subset, resize_targets=getattr(task, "resize_targets", None))
            ev = evaluate(self._eval_infer(case, runner), batches, task,
                          reference=self._eval_infer(ref_case, ref_runner) if ref_runner else None, on_batch=bar.update,
                          source=f"Recipe({case.recipe}).eval_data ({data.name})", check_outputs=check_outputs)
        names = named(len(ev.output_shapes))
        notes = self._artifact_notes(case, runner)
        if subset:
            notes += (f"checked on the eval set's first {subset} samples at the {case.shape} profile point "
                      "(Recipe.profile_samples): runs, output shapes and parity; accuracy is judged at opt",)
        # a metric over a subset is not the model's accuracy: none is reported where it would be one
        out = dict(device=runner.device, metrics={} if subset else ev.metrics,
                   artifact=self._artifact_digest(case, runner),
                   eval_samples=ev.samples, eval_seconds=ev.seconds, eval_fingerprint=data.fingerprint(),
                   eval_inputs=inputs_fingerprint(data), eval_targets=ev.targets,
                   nonfinite_outputs=ev.nonfinite_outputs, nonfinite_samples=ev.nonfinite_samples,
                   notes=notes,
                   output_shapes={n: list(sh) for n, sh in zip(names, ev.output_shapes)} if at_opt else None)
        if ref_runner is not None:
            if is_onnx_only(recipe):  # vs the fp32 graph: same precision is an export check
                kind = "export" if mode_spec(case.mode).precision == "fp32" else "quantization"
            else:
                kind = parity_reference(case.mode, case.backend)[1]
            out.update(parity=combined_parity(ev), output_parity=dict(zip(names, ev.parity)),
                       parity_reference=f"{ref_case.backend} {ref_case.mode} ({kind})")
        return out

    def _eval_infer(self, case: Case, runner: Runner):
        """``runner.infer`` for an evaluation. A case that is another case's parity reference (torch
        fp32 for every int8 graph at its shape, a torch twin for its export) keeps its outputs per
        input batch while its recipe is measured, so it runs over the eval set once per session,
        not once more for every case compared with it: the same outputs, since inference on the
        same runner and input is deterministic. Each caller gets its own copy."""
        if case not in self._shared_references(case.recipe):
            return runner.infer
        memo = self._outputs.setdefault(case, {})

        def infer(x: np.ndarray) -> list[np.ndarray]:
            key = hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).hexdigest() + str(x.shape)
            if key in memo:
                return [o.copy() for o in memo[key]]
            outs = [np.array(o, copy=True) for o in runner.infer(x)]
            size = sum(o.nbytes for o in outs)
            if self._memo_bytes + size <= MEMO_BYTES:  # beyond it, run again: memory stays bounded
                memo[key] = outs
                self._memo_bytes += size
                return [o.copy() for o in outs]
            return outs
        return infer

    def _shared_references(self, recipe_name: str) -> set[Case]:
        """The recipe's cases whose outputs this run reads at least twice: the parity reference of
        two selected cases, or of one and a selected case itself (``selected``: the plugin's
        collected cases; a session used without it keeps nothing)."""
        if recipe_name not in self._reference_sets:
            recipe, readers = self.recipes[recipe_name], {}
            for c in self.selected or ():
                if c.recipe == recipe_name:
                    readers[c] = readers.get(c, 0) + 1
                    if (r := cases.reference_case(recipe, c)) is not None:
                        readers[r] = readers.get(r, 0) + 1
            self._reference_sets[recipe_name] = {c for c, n in readers.items() if n >= 2}
        return self._reference_sets[recipe_name]

    def release(self, recipe_name: str) -> None:
        """The run is done with ``recipe_name`` (the plugin says so after the recipe's last
        collected test): its runners, kept reference outputs, model, data and builder are let go,
        so a session holds the recipes it is measuring, not every recipe so far. Its measurements,
        verdicts and task stay (the report reads them); a later use makes the rest again."""
        self._runners = {k: r for k, r in self._runners.items() if k[0] != recipe_name}
        for c in [c for c in self._outputs if c.recipe == recipe_name]:
            self._memo_bytes -= sum(o.nbytes for outs in self._outputs.pop(c).values() for o in outs)
        if self._workspaces.pop(recipe_name, None) is not None:
            gc.collect()  # torch modules and ONNX Runtime sessions sit in reference cycles
            trim_heap()

    def _at_opt(self, case: Case) -> bool:
        """Output shapes are recorded and compared at the recipe's own input shape only (a dynamic
        H/W profile point has other output shapes, and is right to)."""
        return tuple(self.shape(case)[1:]) == tuple(self.recipes[case.recipe].input.shape[1:])

    def _check_outputs(self, case: Case, shapes: dict | None) -> None:
        """Each output's per-sample shape vs the baseline's, before a metric reads the wrong tensor
        (and fails obscurely, or quietly): a DataError naming the outputs that changed."""
        if not shapes or not self._at_opt(case) or self.options.update_baselines:
            return
        changed = judges.outputs_changed(shapes, self.store.data(case.recipe).get("outputs"))
        if changed:
            raise DataError(f"{case.id}: " + "; ".join(changed))

    def _artifact_digest(self, case: Case, runner: Runner) -> str:
        """What was measured: the ONNX file's digest (TensorRT: the engine's plan key)."""
        if executes(case.backend) == "torch":
            return ""
        plan = getattr(runner, "plan", None)
        if plan is not None and getattr(plan, "cache_key", None):
            return plan.cache_key
        return self.builder(case.recipe).onnx_artifact(case.mode, case.dynamic).digest

    def _artifact_notes(self, case: Case, runner: Runner) -> tuple[str, ...]:
        """What the builder of the ONNX file the case ran says about it (the fp16 conversion's
        folded nodes and those it kept in fp32); nothing where the runner built from another file."""
        path = getattr(runner, "artifact_path", None)
        art = self.builder(case.recipe).built_onnx(path) if path is not None else None
        return tuple(art.info.get("notes", ())) if art is not None else ()

    def _measure_latency(self, case: Case, benchmark=None) -> dict:
        if self.options.latency_off:
            return dict(latency=None, latency_skipped=self.options.latency_off)
        if self.options.xdist_worker:  # pytest-benchmark is off on xdist workers: qatcheck's own loop
            benchmark = None
        runner = self.runner(case)
        gate = mode_spec(case.mode).latency_skip  # the mode's own reason not to time here (fp8 off an FP8 GPU)
        reason = resolve(gate)(runner.device) if gate is not None else None
        if reason:
            return dict(device=runner.device, latency=None, latency_skipped=reason)
        fp = fpr.device_fingerprint(runner.device, runner.versions())
        untimed = self._untimed_reason(case, fp)
        if untimed:
            return dict(device=runner.device, latency=None, latency_skipped=untimed, fingerprint=fp,
                        fingerprint_id=fpr.fingerprint_id(fp), notes=(UNTIMED_NOTE,))
        shape = self.shape(case)
        call = runner.timed_call(self._latency_input(case))
        notes = [call.note] if getattr(call, "note", "") else []
        probe = self._time_probe(runner)
        # known as tightly as the judge needs, more samples change no verdict (Options.latency_precision)
        target = self.recipes[case.recipe].tolerances.latency_rel * self.options.latency_precision
        with timing.CpuLoad() as load:
            stats = timing.measure(call, shape[0], self.options.latency_iterations, self.options.warmup_s,
                                   benchmark, self.options.latency_duration_s, target or None)
        if stats is None:  # pytest-benchmark is disabled: nothing was timed
            return dict(device=runner.device, latency=None, notes=tuple(notes))
        # what it was timed with (a CUDA-graph capture that failed timed eager events instead)
        fp = fpr.device_fingerprint(runner.device, runner.versions())
        probe += self._time_probe(runner)  # before and after: drift during the loop hits both
        stats = dataclasses.replace(stats, foreign_load=load.load, cpus=os.cpu_count() or 0)
        if probe:
            stats = dataclasses.replace(stats, probe_ms=float(np.median(probe)),
                                        probe_ci_rel=timing.median_ci_rel(probe))
        if stats.noisy:  # a note, not a warning per case: the verdict already weighs the noise
            notes.append(f"latency CV above {timing.CV_WARNING:.1%}: the machine is noisy; the latency "
                         "verdicts account for it (a wider interval, inconclusive rather than red)")
        if mode_spec(case.mode).int8 and runner.device == "CPUExecutionProvider":
            p = mode_spec(case.mode).precision
            notes.append(f"{p} Q/DQ on onnxruntime CPU runs as fake-quant: not an {p} latency")
        return dict(device=runner.device, latency=stats, fingerprint=fp,
                    fingerprint_id=fpr.fingerprint_id(fp), notes=tuple(notes), latency_attempts=1,
                    latency_host_bound=getattr(call, "host_bound", ""),
                    latency_attempt_medians=(stats.median_ms,), latency_artifact=self._timed_onnx(case, runner))

    def _untimed_reason(self, case: Case, fp: dict) -> str:
        """Why the case is not timed under --qatcheck-latency ("" when it is): ``never``; ``judged``
        (the default) times only what a verdict or a recording will read - a latency baseline for
        this device's fingerprint, --update-baselines, or a speedup floor the mode is in."""
        policy = self.options.latency
        if policy == "always" or (policy == "judged" and self.options.update_baselines):
            return ""
        if policy == "never":
            return "latency not timed (--qatcheck-latency never)"
        tol = self.recipes[case.recipe].tolerances
        if tol.speedup_for(case.mode) or case.mode in {tol.speedup_for(m)[1] for m in tol.speedup_floor}:
            return ""
        fid = fpr.fingerprint_id(fp)
        if self.store.get(case.recipe, case.key, "latency", "median_ms", fid) is not None:
            return ""
        return (f"no latency baseline for {case.key} on this device (fingerprint {fid}: {fpr.describe(fp)}): "
                "not timed; record one with --update-baselines (--qatcheck-latency always times it anyway)")

    def _latency_input(self, case: Case) -> np.ndarray:
        """The batch every latency loop of the case times: the eval set's first, at the case's shape."""
        shape = self.shape(case)
        x, _ = next(iter(self.workspace(case.recipe).eval_data.batches(shape[0])))
        return pad_batch(resize(x, shape[2:]), shape[0])[0]

    def _timed_onnx(self, case: Case, runner: Runner) -> str:
        """The digest of the ONNX file the case times, where its backend can time a recorded one
        beside it (Backend.reference_runner); "" otherwise."""
        path = getattr(runner, "artifact_path", None)
        if path is None or type(self.backend(case.backend)).reference_runner is Backend.reference_runner:
            return ""
        return file_digest(path)

    def measure_paired(self, case: Case) -> Measurement:
        """Time the case's artifact beside the one its latency baseline was recorded from
        (qatcheck.reference_store), interleaved in this process - when the artifact changed since the
        baseline and the recorded one is kept. A second call adds rounds to the first."""
        m = self.measure(case, ("latency",))
        base = self.baseline(case)
        ref = base.get("latency", "artifact", m.fingerprint_id) if base is not None and m.latency else None
        if not ref or not m.latency_artifact or ref == m.latency_artifact:
            return m
        path = self.references.get(ref)
        if path is None:
            return self._extend(m, "latency", {"notes": (
                f"the artifact changed since the latency baseline, but the recorded one ({ref}) is not in "
                f"{self.references.root}: judged against the stored number alone (keep that directory "
                "between runs, --qatcheck-latency-reference)",)})
        reference = self.backend(case.backend).reference_runner(self.context(case), path)
        x = self._latency_input(case)
        got = timing.paired(self.runner(case).timed_call(x), reference.timed_call(x), ref,
                            self.options.latency_duration_s or 3.0, self.options.warmup_s)
        if m.latency_paired is not None:
            got = m.latency_paired.extended(got)
        return self._extend(m, "latency", {"latency_paired": got})

    def _time_probe(self, runner: Runner) -> list[float]:
        """Samples of the runner's machine-speed probe (qatcheck.backends.probe): a fixed workload
        timed like the model, so the judge can tell a slower machine from a slower model."""
        from qatcheck.backends import probe as probe_mod

        call = runner.probe()
        if call is None:
            return []
        return timing.collect(call, self.options.latency_iterations, 0.05, None, probe_mod.SECONDS)[0]

    def _measure_structure(self, case: Case) -> dict:
        """The quantizers of what the case runs: the torch module's (torch backends) or the ONNX
        graph's (graph backends). TensorRT's own calibrator keeps no Q/DQ in a graph: nothing to
        read there (its engine audit, test_precision, covers it)."""
        from qatcheck.quantize.structure import onnx_structure, torch_structure

        if not mode_spec(case.mode).int8:
            return dict(structure=None)
        b = self.builder(case.recipe)
        if executes(case.backend) == "torch":
            return dict(structure=torch_structure(b.torch_artifact(case.mode).module))
        plan = getattr(self.runner(case), "plan", None) if case.backend == "tensorrt" else None
        if plan is not None and getattr(plan, "quantization", "") == "implicit":
            return dict(structure=None, notes=("TensorRT calibrates this mode itself (implicit INT8): "
                                               "no Q/DQ graph to read; test_precision audits the engine",))
        mode = plan.onnx_mode if plan is not None else case.mode
        return dict(structure=onnx_structure(b.onnx_artifact(mode, case.dynamic).path))

    # ---- judging ----------------------------------------------------------------------------
    def baseline(self, case: Case) -> judges.CaseBaseline | None:
        """The case's stored entries; None while recording (--update-baselines: nothing stored is
        compared, floors and budgets still are). A malformed file raises here, naming the field."""
        if self.options.update_baselines:
            self.store.data(case.recipe)  # a malformed file fails now, before anything is recorded
            return None
        data = self.store.data(case.recipe)
        where = str(self.store.path(case.recipe))
        if not self.store.root.is_dir():
            where += f" (the directory {self.store.root} does not exist: a mistyped --qatcheck-baselines?)"
        entries = data["cases"].get(case.key, {})
        return judges.CaseBaseline(where, entries, eval_data=data.get("eval_data"),
                                   outputs=data.get("outputs"), settings=entries.get("settings"))

    def _conclude(self, verdict: Verdict) -> Verdict:
        self.verdicts[(verdict.case, verdict.check)] = verdict
        return self.record(verdict)

    def budget_reference(self, case: Case) -> Case:
        """The fp32 case ``case``'s accuracy budget is judged against (:func:`qatcheck.cases.budget_reference`)."""
        return cases.budget_reference(self.recipes[case.recipe], case)

    def check_accuracy(self, case: Case) -> Verdict:
        recipe = self.recipes[case.recipe]
        task = self.task(case.recipe)
        subset = cases.subset(recipe, case, len(self.workspace(case.recipe).eval_data))
        if subset:  # checked on a subset there (runs, outputs, parity): accuracy is opt's
            return self._conclude(Verdict("accuracy", case, status="skip", reason=(
                f"accuracy is judged at opt and in the static case: at the {case.shape} profile point "
                f"the build is checked on {subset} samples (runs, output shapes, parity; "
                "Recipe.profile_samples=None evaluates the whole set at every point)")))
        m = self.measure(case, ("eval",))
        budget = recipe.tolerances.fp32_budget(case.mode)
        fp32 = self.measure(self.budget_reference(case), ("eval",)) if budget is not None else None
        return self._conclude(judges.judge_accuracy(
            m, self.baseline(case), metric_names=task.metric_names, primary=task.primary_metric,
            tolerance_points=recipe.tolerances.metric_points, fp32=fp32, budget_points=budget,
            strict=self.options.strict, specs={n: metric_spec(task, n) for n in task.metric_names},
            value_rel=recipe.tolerances.value_metric_rel))

    def parity_thresholds(self, case: Case) -> ParityThresholds | None:
        return cases.parity_thresholds(self.recipes[case.recipe], case)

    def check_parity(self, case: Case) -> Verdict:
        tol = self.recipes[case.recipe].tolerances
        m = self.measure(case, ("eval",))
        return self._conclude(judges.judge_parity(
            m, self.baseline(case), thresholds=self.parity_thresholds(case),
            agreement_name=self.task(case.recipe).agreement_name,
            cosine_tolerance=tol.parity_cosine, agreement_tolerance=tol.parity_agreement,
            strict=self.options.strict, output_floors=tol.output_floors(case.mode)))

    def check_latency(self, case: Case, benchmark=None) -> Verdict:
        """Judge the case's latency; a case that looks slower but whose interval reaches below the
        tolerance is re-measured (up to --qatcheck-latency-retries times) before the verdict."""
        tol = self.recipes[case.recipe].tolerances
        m = self.measure(case, ("latency",), benchmark)
        m = self.measure_paired(case)
        floor = tol.speedup_for(case.mode)
        speedup = None
        if floor is not None and m.latency is not None:
            ref = self.measure(case.with_mode(floor[1], keep_shape=True), ("latency",))
            speedup = (floor[0], floor[1], ref)
        while True:
            retries_left = self.options.latency_retries - (m.latency_attempts - 1)
            verdict = judges.judge_latency(
                m, self.baseline(case), tolerance_rel=tol.latency_rel,
                device=fpr.describe(m.fingerprint) if m.fingerprint else "", retries_left=retries_left,
                strict=self.options.latency_strict, speedup=speedup)
            if verdict.status != "retry":
                return self._conclude(verdict)
            if m.latency_paired is not None:  # more interleaved rounds, counted as an attempt
                m = self._extend(self.measure_paired(case), "latency", {"latency_attempts": m.latency_attempts + 1})
            else:
                m = self.remeasure_latency(case)

    def check_structure(self, case: Case) -> Verdict:
        m = self.measure(case, ("structure",))
        return self._conclude(judges.judge_structure(
            m, self.baseline(case), scale_rel=self.recipes[case.recipe].tolerances.scale_rel))

    def check_precision(self, case: Case, expect: dict) -> Verdict:
        """The TensorRT precision audit against a recipe's expectation (see judges.judge_precision);
        backends without an engine to inspect skip."""
        # only backends that build engines have an audit; the others skip without building anything
        audits = getattr(self.backend(case.backend), "audits_precision", False)
        audit = getattr(self.runner(case), "audit", None) if audits else None
        kept = self.recipes[case.recipe].quant.keep_precision if mode_spec(case.mode).keeps_layers else ()
        return self._conclude(judges.judge_precision(case, audit, expect, tuple(kept)))

    # ---- recording --------------------------------------------------------------------------
    def record(self, verdict: Verdict) -> Verdict:
        """Under --update-baselines, stage the verdict's values for the baseline store - unless the
        case failed (a floor, a budget, non-finite outputs): a failing run never becomes the new
        baseline. --qatcheck-force-update records it anyway. Written at the session's end."""
        if not self.options.update_baselines or not verdict.updates:
            return verdict
        case = verdict.case
        if verdict.status == "fail" and not self.options.force_update:
            self.refused.append(verdict)
            # the case's entry keeps values of its old settings: it must keep those settings too
            self.store.stage_settings(case.recipe, case.key, None)
            return verdict
        for update in verdict.updates:
            self.store.stage(verdict.case.recipe, update)
            if update.artifact:  # kept, so a later run can time it beside a changed artifact
                self.references.put(self.runner(verdict.case).artifact_path, update.artifact)
        m = self.measurements.get(case)
        if m is not None and m.settings and not any(v.case == case for v in self.refused):
            self.store.stage_settings(case.recipe, case.key, m.settings)
        if verdict.check == "accuracy":  # metrics are only comparable on the same eval data
            eval_data = {"fingerprint": m.eval_fingerprint, "samples": m.eval_samples, "inputs": m.eval_inputs}
            if m.eval_targets:
                eval_data["targets"] = m.eval_targets
            self.store.stage_meta(verdict.case.recipe, "eval_data", eval_data)
            if m.output_shapes:  # a later run whose outputs swapped places is told so by name
                self.store.stage_meta(verdict.case.recipe, "outputs", m.output_shapes)
        return verdict

    # ---- finishing ----------------------------------------------------------------------------
    def finish(self) -> report.Summary:
        """End of session: the tables and report files (:mod:`qatcheck.report` renders them from
        the measurements), then - under ``--update-baselines`` - the one baseline write of the
        session, reported change by change. A write that fails records nothing, and says so
        (``Summary.baselines_not_written``: the run must not pass)."""
        summary = report.render(self)
        if self.options.update_baselines:
            created = not self.store.root.is_dir()
            try:
                summary.baseline_changes = self.store.commit()
            except BaselineError as exc:
                summary.baselines_not_written = str(exc)
            summary.text += report.baselines_text(summary, self.store.root if created else None, self.refused)
        summary.text += report.footer_text(summary.files, self.cache) + report.cost_text(self)
        self.summary = summary
        return summary


def _speed(stats) -> float:
    """A latency attempt's figure for choosing the best one: its median, relative to its
    machine-speed probe when it has one."""
    return stats.median_ms / stats.probe_ms if stats.probe_ms else stats.median_ms
