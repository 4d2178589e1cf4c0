"""A reproduction bundle for a failing parity or accuracy case: ``reports/repro/<case>/``, and the
one ``polygraphy run`` command that replays the comparison outside pytest.

What users of Polygraphy, ModelOpt and the TensorRT tracker ask for first is a reproducer. The
bundle holds one input batch made of the eval samples whose outputs are furthest from the
reference (``inputs.json``, Polygraphy's input-data format), the reference's outputs on it
(``reference_outputs.json``, Polygraphy ``RunResults``), the settings (``settings.json``) and the
command (``repro.sh``):

    polygraphy run <model> --onnxrt --load-inputs inputs.json --load-outputs reference_outputs.json \\
        --compare cosine_similarity --cosine-similarity-threshold <the case's floor> [<output>:<floor>]

A TensorRT case gets ``--trt`` with the flags its build plan used (``trt_plan.polygraphy_cli_args``:
precision flags or strong typing, TensorRT's calibration cache, pinned layers, the profile).

The model: a bundle used to copy the case's ONNX artifact and four whole eval batches (3.2 MB for
the built-in detector, 46-48 MB reported for a mid-size one). Now ``<model>`` is the artifact
cache entry itself, recorded with its digest (``settings.json``: ``model``, ``model_digest``),
where that entry will still be there: an intact entry of a cache in use, not under the system's
temp directory (:func:`cached_artifact`). There ``repro.sh`` first checks the file is there with
that digest and otherwise exits 2 naming both (the entry was pruned or rebuilt: rerun the case).
Elsewhere (a temp cache, ``--qatcheck-no-cache``) the artifact is copied in as ``model.onnx``.

The samples: Polygraphy judges each batch on its own while qatcheck's parity accumulates over the
eval set, so the bundle keeps the worst samples (lowest cosine of any output, sample by sample)
among the first :data:`SEARCH_BATCHES` batches - as many as one batch at the case's shape holds
(the exported graph's batch is fixed: 32 for digits, 16 for the detector), so one batch instead of
four. Before printing the command qatcheck runs Polygraphy's own comparator
(``CosineSimilarityCompareFunc``, the one the command uses) on that batch, through the case's
runner: the failure message says whether the command reproduces the failure, so a printed command
is never a guess. Only cases run from an ONNX file (ONNX Runtime, TensorRT) get a bundle; a
PyTorch case has no file to hand over.
"""
from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qatcheck.parity import ParityAccumulator
from qatcheck.workspace import CaseView

#: eval batches searched for the worst samples; the bundle keeps one batch of them
SEARCH_BATCHES = 16


@dataclass
class Bundle:
    """A written bundle: the command, and what Polygraphy's comparator said of its batches."""

    path: Path
    command: str
    #: does Polygraphy's comparison fail on the bundle's batches (the command exits non-zero)?
    reproduces: bool
    #: one line: which outputs fell below their floor in how many batches, at what cosine
    polygraphy_verdict: str
    #: the command's model is the artifact cache entry (by path and digest), not a copy
    referenced: bool = False

    def message_lines(self) -> list[str]:
        """What a failure message adds: Polygraphy's verdict on the bundle, the command, and where
        the model is when it is not in the bundle."""
        lines = [self.polygraphy_verdict, f"reproduce outside pytest: {self.command}"]
        if self.referenced:
            lines.append(f"(its model is the artifact cache entry, not a copy: {self.path / 'repro.sh'} "
                         "checks it is still there before replaying)")
        return lines


def cosine_thresholds(floor: float, output_floors: dict[str, float], names: list[str]) -> dict[str, float]:
    """Polygraphy's per-output cosine thresholds (``""``: the default) from the case's floor and the
    recipe's per-output floors for the case's mode (``Tolerances.output_floors``)."""
    return {"": float(floor), **{n: float(output_floors[n]) for n in names if n in output_floors}}


def polygraphy_compare(names, ref_outputs, case_outputs, thresholds: dict[str, float]):
    """Polygraphy's cosine comparison of the case's outputs with the reference's, batch by batch
    (the comparison ``polygraphy run --compare cosine_similarity`` makes): (passed, one line)."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    for runner_name, batches in (("reference", ref_outputs), ("case", case_outputs)):
        results.append((runner_name, [IterationResult({n: np.asarray(o) for n, o in zip(names, outs)},
                                                      runner_name=runner_name) for outs in batches]))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # its per-batch log is the command's to print
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CosineSimilarityCompareFunc(cosine_similarity_threshold=thresholds))
    failing: dict[str, list[float]] = {}
    for pairs in accuracy:  # one AccuracyResult per comparison: (runner, runner) -> iterations
        for iteration in (it for per_iteration in pairs.values() for it in per_iteration):
            for name, result in iteration.items():
                if not bool(result):
                    failing.setdefault(name, []).append(float(getattr(result, "cosine_similarity", float("nan"))))
    if not failing:
        where = "the bundle's batch" if len(ref_outputs) == 1 else f"all {len(ref_outputs)} batches"
        return True, (f"Polygraphy's cosine comparison passes on {where}: the failure shows only over "
                      "the whole eval set, the command will not reproduce it")
    worst = "; ".join(f"output {n!r} below {thresholds.get(n, thresholds[''])} in {len(c)}/{len(ref_outputs)} "
                      f"batches (lowest cosine {min(c):.4f})" for n, c in failing.items())
    return False, f"Polygraphy's cosine comparison fails on the bundle: {worst}"


def sample_cosines(refs, outs) -> list[float]:
    """Each sample's cosine with the reference (the lowest over the outputs): what picks the
    bundle's samples."""
    cosines = []
    for j in range(len(refs[0])):
        per_output = []
        for r, o in zip(refs, outs):
            acc = ParityAccumulator()
            acc.update(np.asarray(r)[j], np.asarray(o)[j])
            per_output.append(acc.cosine())
        cosines.append(min(per_output))
    return cosines


def worst_samples(view: CaseView) -> tuple[np.ndarray, list[int], list[float]] | None:
    """One input batch at the case's shape made of the eval samples whose outputs are furthest
    from the reference's, searched in the first :data:`SEARCH_BATCHES` batches: (the batch, the
    samples' eval indices, their cosines). None when no full batch was searched (a padded batch
    is not the model's input as run)."""
    shape, runner, ref_runner = view.shape, view.runner, view.reference_runner
    scored: list[tuple[float, int, np.ndarray]] = []
    for i, (x, _, n) in enumerate(view.workspace.eval_batches(view.case)):
        if i >= SEARCH_BATCHES or n < shape[0]:
            break
        x = np.asarray(x)
        cosines = sample_cosines(list(ref_runner.infer(x)), list(runner.infer(x)))
        scored += [(c, i * shape[0] + j, x[j]) for j, c in enumerate(cosines)]
    if not scored:
        return None
    worst = sorted(sorted(scored, key=lambda t: t[0])[:shape[0]], key=lambda t: t[1])
    return np.stack([t[2] for t in worst]), [t[1] for t in worst], [t[0] for t in worst]


def temporary_roots() -> list[Path]:
    """Where a cache is temporary: the system's temp directory (pytest's tmp_path, a CI scratch
    dir) - a bundle copies an artifact from there rather than point into it."""
    return [Path(tempfile.gettempdir()).resolve()]


def cached_artifact(view: CaseView, model: Path) -> str | None:
    """The digest by which the bundle references ``model`` in the artifact cache instead of
    copying it; None: copy it. The rule: reference it only where the entry will still be there -
    an intact entry of a cache in use (not ``--qatcheck-no-cache``, which rebuilds every artifact
    and replaces the entry) that is not under a temporary directory (:func:`temporary_roots`)."""
    cache = view.workspace.cache
    root = Path(cache.root).resolve()
    if not cache.enabled or any(root == t or t in root.parents for t in temporary_roots()):
        return None
    return cache.entry_digest(Path(model))


#: what repro.sh runs first when the model is a cache entry: it must still be there, unchanged
_CHECK_ARTIFACT = """python3 - {path} {digest} <<'CHECK' || exit 2
import hashlib, sys
path, digest = sys.argv[1], sys.argv[2]
h = hashlib.sha256()
try:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
except FileNotFoundError:
    sys.exit(f"repro: the model {{path}} (sha256 {{digest}}...) is gone: this bundle references that "
             "artifact cache entry, which was pruned; rerun the case under pytest to rebuild it, then this script")
found = h.hexdigest()[:len(digest)]
if found != digest:
    sys.exit(f"repro: the model {{path}} changed since this bundle was written (sha256 {{found}}..., the bundle "
             f"needs {{digest}}...): the cache entry was rebuilt; rerun the case under pytest for a new bundle")
CHECK
"""


def write(view: CaseView, check: str) -> Bundle | None:
    """Write the bundle for ``view.case`` (its ``check`` failed); None when the case has no ONNX
    file or no reference to compare with."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    case, runner, ref_case, ref_runner = view.case, view.runner, view.reference, view.reference_runner
    model = getattr(runner, "artifact_path", None)
    if model is None or ref_case is None or ref_runner is None:
        return None
    recipe = view.recipe
    found = worst_samples(view)
    if found is None:
        return None
    x, samples, cosines = found
    # both outputs on the bundle's very batch: what the command loads and compares
    refs, outs = list(ref_runner.infer(x)), list(runner.infer(x))
    floor = view.thresholds
    names = list(recipe.output_names)
    thresholds = cosine_thresholds(floor.min_cosine if floor is not None else 0.999,
                                   recipe.tolerances.output_floors(case.mode), names)
    passed, verdict = polygraphy_compare(names, [refs], [outs], thresholds)
    out = Path(view.reports_dir) / "repro" / case.id
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    digest = cached_artifact(view, Path(model))
    if digest is None:
        shutil.copyfile(model, out / "model.onnx")
    model_path = Path(model).resolve() if digest else out / "model.onnx"
    save_json([{recipe.input.name: x}], str(out / "inputs.json"))
    results = RunResults()
    results.append(("reference", [IterationResult({n: np.asarray(r) for n, r in zip(names, refs)},
                                                  runner_name="reference")]))
    results.save(str(out / "reference_outputs.json"))
    backend_args = runner.polygraphy_run_args(out)
    settings = {"case": case.id, "failed_check": check, "reference": ref_case.id,
                "artifact": str(model), "model": str(model_path), "model_digest": digest,
                "model_copied": digest is None, "samples": samples,
                "sample_cosines": [round(float(c), 6) for c in cosines],
                "cosine_threshold": thresholds[""], "output_cosine_thresholds": thresholds,
                "input": recipe.input.name, "outputs": names, "polygraphy_reproduces": not passed,
                "polygraphy_verdict": verdict, "backend_args": backend_args}
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    threshold_args = [f"{thresholds['']:g}", *(f"{n}:{t:g}" for n, t in thresholds.items() if n)]
    command = " ".join(["polygraphy", "run", shlex.quote(str(model_path)),
                        *map(shlex.quote, backend_args),
                        "--load-inputs", shlex.quote(str(out / "inputs.json")),
                        "--load-outputs", shlex.quote(str(out / "reference_outputs.json")),
                        "--compare", "cosine_similarity", "--cosine-similarity-threshold", *threshold_args])
    (out / "repro.sh").write_text(script(f"{case.id}'s comparison with {ref_case.id}", command, model_path, digest))
    return Bundle(out, command, not passed, verdict, referenced=digest is not None)


def script(what: str, command: str, model: Path, digest: str | None) -> str:
    """``repro.sh``: the command, after checking a referenced model is still the one recorded."""
    head = f"#!/bin/sh\n# replays {what} outside pytest (exit 1: it still fails"
    if digest is None:
        return head + ")\n" + command + "\n"
    return (head + "; exit 2: its model, an artifact cache entry, is gone or changed)\n"
            + _CHECK_ARTIFACT.format(path=shlex.quote(str(model)), digest=shlex.quote(digest)) + command + "\n")
