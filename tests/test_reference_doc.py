"""docs/reference.md is generated from the code (issue 12: a recipe author must not need the
source): it must be current, and it must cover every field a recipe has."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from qatcheck import recipe as R
from qatcheck.reference_doc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_the_reference_is_current():
    assert DOC.read_text() == render(), "docs/reference.md is stale: python -m qatcheck reference --write docs/reference.md"


def test_every_recipe_and_settings_field_is_documented_with_its_meaning():
    text = render()
    for cls in (R.Recipe, R.InputSpec, R.QuantSettings, R.QATSettings, R.Tolerances, R.ParityThresholds):
        for f in dataclasses.fields(cls):
            row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"{cls.__name__}.{f.name} is not in the reference"
            assert not row.rstrip().endswith("|  |"), f"{cls.__name__}.{f.name} has no meaning (a #: comment)"
    for needed in ("def update(self, outputs", "HeadTargets", "digits_split", "coco_evaluate", "loss",
                   "task_output", "combined_parity", "choose_layers"):
        assert needed in text, needed
