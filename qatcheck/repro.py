"""A reproduction bundle for a failing parity or accuracy case: ``reports/repro/<case>/``, and the
one ``polygraphy run`` command that replays the comparison outside pytest.

What users of Polygraphy, ModelOpt and the TensorRT tracker ask for first is a reproducer. The
bundle holds the case's ONNX artifact (``model.onnx``), the eval batches where its outputs are
furthest from the reference (``inputs.json``, Polygraphy's input-data format) and the reference's
outputs on them (``reference_outputs.json``, Polygraphy ``RunResults``), the settings
(``settings.json``) and the command (``repro.sh``):

    polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs reference_outputs.json \\
        --compare cosine_similarity --cosine-similarity-threshold <the case's floor> [<output>:<floor>]

A TensorRT case gets ``--trt`` with the flags its build plan used (``trt_plan.polygraphy_cli_args``:
precision flags or strong typing, TensorRT's calibration cache, pinned layers, the profile).

Polygraphy judges each batch on its own while qatcheck's parity accumulates over the eval set, so
the bundle keeps the worst batches (lowest cosine of any output) among the first ones, and before
printing the command qatcheck runs Polygraphy's own comparator (``CosineSimilarityCompareFunc``,
the one the command uses) on those batches, through the case's runner: the failure message says
whether the command reproduces the failure, so a printed command is never a guess. Only cases run
from an ONNX file (ONNX Runtime, TensorRT) get a bundle; a PyTorch case has no file to hand over.
"""
from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qatcheck.parity import ParityAccumulator
from qatcheck.workspace import CaseView

#: eval batches searched for the worst ones, and how many the bundle keeps
SEARCH_BATCHES = 16
KEEP_BATCHES = 4


@dataclass
class Bundle:
    """A written bundle: the command, and what Polygraphy's comparator said of its batches."""

    path: Path
    command: str
    #: does Polygraphy's comparison fail on the bundle's batches (the command exits non-zero)?
    reproduces: bool
    #: one line: which outputs fell below their floor in how many batches, at what cosine
    polygraphy_verdict: str


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
        return True, (f"Polygraphy's cosine comparison passes on all {len(ref_outputs)} batches: the "
                      "failure shows only over the whole eval set, the command will not reproduce it")
    worst = "; ".join(f"output {n!r} below {thresholds.get(n, thresholds[''])} in {len(c)}/{len(ref_outputs)} "
                      f"batches (lowest cosine {min(c):.4f})" for n, c in failing.items())
    return False, f"Polygraphy's cosine comparison fails on the bundle: {worst}"


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
    shape = view.shape
    scored = []
    for i, (x, _, n) in enumerate(view.workspace.eval_batches(case)):
        if i >= SEARCH_BATCHES or n < shape[0]:  # a padded batch is not the model's input as run
            break
        outs, refs = list(runner.infer(x)), list(ref_runner.infer(x))
        cos = []
        for r, o in zip(refs, outs):
            acc = ParityAccumulator()
            acc.update(np.asarray(r), np.asarray(o))
            cos.append(acc.result()["cosine"])
        scored.append((min(cos), i, x, refs, outs))
    if not scored:
        return None
    worst = sorted(scored, key=lambda t: t[0])[:KEEP_BATCHES]
    worst.sort(key=lambda t: t[1])
    floor = view.thresholds
    names = list(recipe.output_names)
    thresholds = cosine_thresholds(floor.min_cosine if floor is not None else 0.999,
                                   recipe.tolerances.output_floors(case.mode), names)
    passed, verdict = polygraphy_compare(names, [t[3] for t in worst], [t[4] for t in worst], thresholds)
    out = Path(view.reports_dir) / "repro" / case.id
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(model, out / "model.onnx")
    save_json([{recipe.input.name: t[2]} for t in worst], str(out / "inputs.json"))
    results = RunResults()
    results.append(("reference", [IterationResult({n: np.asarray(r) for n, r in zip(names, t[3])},
                                                  runner_name="reference") for t in worst]))
    results.save(str(out / "reference_outputs.json"))
    backend_args = runner.polygraphy_run_args(out)
    settings = {"case": case.id, "failed_check": check, "reference": ref_case.id,
                "artifact": str(model), "batches": [t[1] for t in worst],
                "batch_cosines": [round(float(t[0]), 6) for t in worst],
                "cosine_threshold": thresholds[""], "output_cosine_thresholds": thresholds,
                "input": recipe.input.name, "outputs": names, "polygraphy_reproduces": not passed,
                "polygraphy_verdict": verdict, "backend_args": backend_args}
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    threshold_args = [f"{thresholds['']:g}", *(f"{n}:{t:g}" for n, t in thresholds.items() if n)]
    command = " ".join(["polygraphy", "run", shlex.quote(str(out / "model.onnx")),
                        *map(shlex.quote, backend_args),
                        "--load-inputs", shlex.quote(str(out / "inputs.json")),
                        "--load-outputs", shlex.quote(str(out / "reference_outputs.json")),
                        "--compare", "cosine_similarity", "--cosine-similarity-threshold", *threshold_args])
    (out / "repro.sh").write_text("#!/bin/sh\n# replays " + case.id + "'s comparison with " + ref_case.id
                                  + " outside pytest (exit 1: it still fails)\n" + command + "\n")
    return Bundle(out, command, not passed, verdict)
