"""A reproduction bundle for a failing parity or accuracy case: ``reports/repro/<case>/``, and the
one ``polygraphy run`` command that replays the comparison outside pytest.

What users of Polygraphy, ModelOpt and the TensorRT tracker ask for first is a reproducer. The
bundle holds the case's ONNX artifact (``model.onnx``), the eval batches where its outputs are
furthest from the reference (``inputs.json``, Polygraphy's input-data format) and the reference's
outputs on them (``reference_outputs.json``, Polygraphy ``RunResults``), the settings
(``settings.json``) and the command (``repro.sh``):

    polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs reference_outputs.json \\
        --compare cosine_similarity --cosine-similarity-threshold <the case's floor>

Polygraphy judges each batch on its own while qatcheck's parity accumulates over the eval set, so
the bundle keeps the worst batches (lowest cosine of any output) among the first ones: a failure the
eval set shows is visible in them. Only cases run from an ONNX file (ONNX Runtime, TensorRT) get a
bundle; a PyTorch case has no file to hand over.
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np

from qatcheck.data.batching import eval_batches
from qatcheck.parity import ParityAccumulator

#: eval batches searched for the worst ones, and how many the bundle keeps
SEARCH_BATCHES = 16
KEEP_BATCHES = 4


def write(session, case, check: str) -> str | None:
    """Write the bundle for ``case`` (its ``check`` failed); returns the command, or None when the
    case has no ONNX file or no reference to compare with."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    runner = session.runner(case)
    model = getattr(runner, "artifact_path", None)
    ref_case = session.reference_case(case)
    if model is None or ref_case is None:
        return None
    recipe = session.recipes[case.recipe]
    ref_runner = session.runner(ref_case)
    shape = session.shape(case)
    data = session._states[case.recipe].eval_data
    scored = []
    for i, (x, _, n) in enumerate(eval_batches(data, shape)):
        if i >= SEARCH_BATCHES or n < shape[0]:  # a padded batch is not the model's input as run
            break
        outs, refs = list(runner.infer(x)), list(ref_runner.infer(x))
        cos = []
        for r, o in zip(refs, outs):
            acc = ParityAccumulator()
            acc.update(np.asarray(r), np.asarray(o))
            cos.append(acc.result()["cosine"])
        scored.append((min(cos), i, x, refs))
    if not scored:
        return None
    worst = sorted(scored, key=lambda t: t[0])[:KEEP_BATCHES]
    worst.sort(key=lambda t: t[1])
    floor = session.parity_thresholds(case)
    threshold = floor.min_cosine if floor is not None else 0.999
    out = Path(session.options.reports_dir) / "repro" / case.id
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(model, out / "model.onnx")
    names = list(recipe.output_names)
    save_json([{recipe.input.name: x} for _, _, x, _ in worst], str(out / "inputs.json"))
    results = RunResults()
    results.append(("reference", [IterationResult({n: np.asarray(r) for n, r in zip(names, refs)},
                                                  runner_name="reference") for _, _, _, refs in worst]))
    results.save(str(out / "reference_outputs.json"))
    settings = {"case": case.id, "failed_check": check, "reference": ref_case.id,
                "artifact": str(model), "batches": [i for _, i, _, _ in worst],
                "batch_cosines": [round(float(c), 6) for c, _, _, _ in worst],
                "cosine_threshold": threshold, "input": recipe.input.name, "outputs": names}
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    command = " ".join(["polygraphy", "run", shlex.quote(str(out / "model.onnx")), "--onnxrt",
                        "--load-inputs", shlex.quote(str(out / "inputs.json")),
                        "--load-outputs", shlex.quote(str(out / "reference_outputs.json")),
                        "--compare", "cosine_similarity", "--cosine-similarity-threshold", f"{threshold:g}"])
    (out / "repro.sh").write_text("#!/bin/sh\n# replays " + case.id + "'s comparison with " + ref_case.id
                                  + " outside pytest (exit 1: it still fails)\n" + command + "\n")
    return command
