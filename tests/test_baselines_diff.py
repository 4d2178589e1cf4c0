"""``python -m qatcheck baselines diff`` (issue 24 item 2): what moved between two versions of the
baselines, in tolerance units, largest first; structure by quantizer; cases and recipes added or
removed; files, directories and git revisions; bad input one line, exit 2.

Most cases are synthetic documents (validated by ``qatcheck.baselines`` as the CLI does); one
test records a real digits baseline, re-records it with another calibrator and diffs the two
through git, as a reviewer would see the pull request.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest

from qatcheck import baselines
from qatcheck.__main__ import main
from qatcheck.baselines_diff import diff_recipe, diff_stores, markdown, table_rows

ROOT = Path(__file__).resolve().parents[1]


def entry(value: float, tolerance: float) -> dict:
    return {"tolerance": tolerance, "value": value}


def document(recipe: str = "digits", **cases: dict) -> dict:
    """A valid baseline document (checked by the store's own validator)."""
    doc = {"qatcheck_baseline": 1, "recipe": recipe, "cases": cases}
    return baselines.validate(doc, Path(f"{recipe}.json"), recipe)


def trt_ptq_case(**changes: float) -> dict:
    """One int8 case with every section; ``changes``: name -> new value (``top1``, ``cosine``,
    ``stem`` (stem.conv's input scale), ``pairs``, ``median``)."""
    return {
        "settings": {"calibrator": changes.get("calibrator", "percentile")},
        "metrics": {"top1": entry(changes.get("top1", 0.99), 0.5)},
        "values": {"l2": entry(changes.get("l2", 0.04), 0.05)},
        "parity": {"cosine": entry(changes.get("cosine", 0.9998), 0.0005)},
        "structure": {"qdq_pairs": entry(changes.get("pairs", 13), 0.0),
                      "stem.conv:input.scale": entry(changes.get("stem", 0.0200), 0.05),
                      "fc:weight.channels": entry(10, 0.0),
                      "fc:weight.scale_min": entry(0.0036, 0.05),
                      "fc:weight.scale_max": entry(0.0044, 0.05)},
        "latency": {"3f2a9c1b7d44": {"device": "CPU x2 (onnxruntime 1.20)",
                                     "median_ms": entry(changes.get("median", 1.0), 0.15),
                                     "spread": {"cv": 0.03, "ci_rel": 0.01}}},
    }


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["baselines", "diff", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                           *args], cwd=repo, check=True, capture_output=True, text=True).stdout


# ---- the diff itself ---------------------------------------------------------------------------

def test_an_identical_pair_shows_no_change_and_counts_the_entries(tmp_path, capsys):
    """The real digits baseline against a copy of itself: nothing printed but the count."""
    data = baselines.load(ROOT / "baselines" / "digits.json", "digits")
    diff = diff_recipe("digits", data, copy.deepcopy(data))
    assert diff.status == "unchanged" and diff.changes == () and not diff.cases_added
    entries = sum(len(v) for c in data["cases"].values() for s, v in c.items() if s != "settings")
    assert diff.unchanged == entries > 100

    (tmp_path / "copy.json").write_text((ROOT / "baselines" / "digits.json").read_text())
    rc, out, err = cli(capsys, str(ROOT / "baselines" / "digits.json"), str(tmp_path / "copy.json"))
    assert (rc, err) == (0, "") and out.splitlines()[-1] == "unchanged: digits", out
    rc, out, _ = cli(capsys, str(ROOT / "baselines"), str(ROOT / "baselines"), "--markdown")
    recipes = len(list((ROOT / "baselines").glob("*.json")))
    assert rc == 0 and f"No baseline changed ({recipes} recipe(s) compared)." in out


def test_each_section_is_measured_in_its_own_tolerance_unit_largest_first():
    """top1 -1 point (tolerance 0.5 points: -2), a scale +10% (±5%: +2), cosine -0.0001 (0.0005:
    -0.2), latency +30% (+15%: +2), a regression value +2.5% (±5%: +0.5); one more Q/DQ pair (a
    count's tolerance is 0: infinite, first)."""
    old = document(**{"trt_ptq-onnxruntime": trt_ptq_case()})
    new = document(**{"trt_ptq-onnxruntime": trt_ptq_case(top1=0.98, stem=0.022, cosine=0.9997, median=1.3,
                                                          l2=0.041, pairs=14)})
    diff = diff_recipe("digits", old, new)
    got = {(c.section, c.name, c.field): c for c in diff.changes}
    assert got["metrics", "top1", ""].change == pytest.approx(-1.0) and got["metrics", "top1", ""].units == pytest.approx(-2.0)
    assert got["structure", "stem.conv:input", "scale"].change == pytest.approx(0.10)
    assert got["structure", "stem.conv:input", "scale"].units == pytest.approx(2.0)
    assert got["parity", "cosine", ""].units == pytest.approx(-0.2)
    assert got["values", "l2", ""].units == pytest.approx(0.5)
    lat = got["latency", "median_ms", ""]
    assert lat.units == pytest.approx(2.0) and lat.fingerprint == "3f2a9c1b7d44" and lat.device.startswith("CPU x2")
    assert got["structure", "qdq_pairs", ""].units == math.inf
    assert [c.name for c in diff.changes][0] == "qdq_pairs"
    sizes = [abs(c.units) for c in diff.changes]
    assert sizes == sorted(sizes, reverse=True)
    assert diff.beyond == 4 and diff.unchanged == 3  # the channels and the fc scales did not move

    header, rows = table_rows(diff)
    by_entry = {r[1]: r for r in rows}
    assert by_entry["Q/DQ pairs"][4:] == ["+1", "∞ (exact)"]
    assert by_entry["quantizer stem.conv:input scale"][2:] == ["0.02", "0.022", "+10%", "+2.00"]
    assert by_entry["metrics.top1"][4:] == ["-1 pt", "-2.00"]
    assert by_entry["latency.median_ms on CPU x2 (onnxruntime 1.20)"][4:] == ["+30%", "+2.00"]


def test_structure_changes_are_named_by_quantizer():
    """A quantizer dropped and one added are one line each with their scale (not one line per
    field); the one that stayed lists only its moved field."""
    case = trt_ptq_case()
    moved = copy.deepcopy(case)
    s = moved["structure"]
    for f in ("channels", "scale_min", "scale_max"):
        del s[f"fc:weight.{f}"]
    s["layer1.add:input1.scale"] = entry(0.031, 0.05)
    s["stem.conv:input.scale"] = entry(0.015, 0.05)
    diff = diff_recipe("digits", document(**{"trt_ptq-onnxruntime": case}),
                       document(**{"trt_ptq-onnxruntime": moved}))
    structure = [(c.kind, c.name, c.field, c.old, c.new) for c in diff.changes if c.section == "structure"]
    assert structure == [
        ("removed", "fc:weight", "", "scale 0.0036..0.0044 over 10 channels", None),
        ("added", "layer1.add:input1", "", None, "scale 0.031"),
        ("moved", "stem.conv:input", "scale", 0.02, 0.015)]
    assert diff.changes[2].units == pytest.approx(-5.0)
    rows = table_rows(diff)[1]
    assert rows[1][1:] == ["quantizer layer1.add:input1", "—", "scale 0.031", "added", "∞"]
    assert rows[2][4:] == ["-25%", "-5.00"]


def test_cases_and_recipes_added_and_removed_are_listed():
    old = document(**{"fp32-torch": trt_ptq_case(), "qat-torch": trt_ptq_case()})
    new = document(**{"fp32-torch": trt_ptq_case(), "trt_ptq-onnxruntime": trt_ptq_case()})
    gone = document("fashion", **{"fp32-torch": trt_ptq_case()})
    diffs = {d.recipe: d for d in diff_stores({"digits": old, "fashion": gone}, {"digits": new, "yolo": new})}
    assert diffs["digits"].cases_added == ("trt_ptq-onnxruntime",)
    assert diffs["digits"].cases_removed == ("qat-torch",) and diffs["digits"].changes == ()
    assert (diffs["fashion"].status, diffs["yolo"].status) == ("removed", "added")
    text = markdown(list(diffs.values()), "old", "new")
    assert "- cases added: trt_ptq-onnxruntime" in text and "- cases removed: qat-torch" in text
    assert "#### fashion\n\nRecipe removed (1 case)" in text and "#### yolo\n\nRecipe added (2 cases)" in text


def test_settings_a_tolerance_edit_and_a_new_device_are_reported_not_counted_as_moves():
    old = document(**{"trt_ptq-onnxruntime": trt_ptq_case()})
    new_case = trt_ptq_case(calibrator="minmax")
    new_case["metrics"]["top1"]["tolerance"] = 1.0  # widened by hand
    new_case["latency"]["77aa"] = {"device": "H100", "median_ms": entry(0.2, 0.15)}
    diff = diff_recipe("digits", old, document(**{"trt_ptq-onnxruntime": new_case}))
    kinds = {(c.section, c.name, c.kind) for c in diff.changes}
    assert kinds == {("settings", "calibrator", "moved"), ("metrics", "top1", "tolerance"),
                     ("latency", "median_ms", "added")}
    assert diff.beyond == 0
    rows = table_rows(diff)[1]
    assert ["trt_ptq-onnxruntime", "metrics.top1", "0.99", "0.99", "tolerance 0.5 → 1", ""] in rows
    assert "- settings: calibrator percentile → minmax (trt_ptq-onnxruntime)" in markdown([diff], "a", "b")


# ---- the command: files, directories, revisions, bad input ---------------------------------------

def _store(root: Path, **docs: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (root / f"{name}.json").write_text(baselines.dumps(doc))
    return root


def test_a_git_revision_against_the_working_tree(tmp_path, capsys, monkeypatch):
    """HEAD's baselines/ against the working tree's (NEW omitted), two revisions, and --dir."""
    repo = tmp_path / "repo"
    _store(repo / "baselines", digits=document(**{"trt_ptq-onnxruntime": trt_ptq_case()}))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    _store(repo / "baselines", digits=document(**{"trt_ptq-onnxruntime": trt_ptq_case(stem=0.03)}))
    monkeypatch.chdir(repo / "baselines")  # --dir is relative to where the command runs, as paths are
    rc, out, err = cli(capsys, "HEAD", "--dir", ".")
    assert (rc, err) == (0, ""), err
    assert out.splitlines()[0] == "baselines HEAD:baselines → ."
    assert "digits: 1 entry changed (1 beyond their tolerance), 8 unchanged" in out
    assert "quantizer stem.conv:input scale" in out and "+50%" in out and "+10.00" in out

    monkeypatch.chdir(repo)
    git(repo, "commit", "-qam", "re-recorded")
    rc, out, _ = cli(capsys, "HEAD~1", "HEAD", "--markdown")
    assert rc == 0 and out.startswith("### Baselines: HEAD~1:baselines → HEAD:baselines\n")
    assert "| trt_ptq-onnxruntime | quantizer stem.conv:input scale | 0.02 | 0.03 | +50% | +10.00 |" in out
    assert cli(capsys, "HEAD", "--fail-on-change")[0] == 0  # the working tree is HEAD now
    assert cli(capsys, "HEAD~1", "--fail-on-change")[0] == 1
    rc, out, _ = cli(capsys, "HEAD~1", "--json")
    [recipe] = json.loads(out)["recipes"]
    assert recipe["changes"][0]["units"] == pytest.approx(10.0)


def test_a_file_against_a_directory_compares_its_recipe_only(tmp_path, capsys):
    store = _store(tmp_path / "b", digits=document(**{"fp32-torch": trt_ptq_case(top1=0.97)}),
                   fashion=document("fashion", **{"fp32-torch": trt_ptq_case()}))
    old = _store(tmp_path / "a", digits=document(**{"fp32-torch": trt_ptq_case()})) / "digits.json"
    rc, out, _ = cli(capsys, str(old), str(store))
    assert rc == 0 and "fashion" not in out and "-2 pt" in out and "-4.00" in out


@pytest.mark.parametrize("make, named", [
    (lambda d: "no-such-thing", "'no-such-thing' is neither a baseline file, a directory of them nor a git revision"),
    (lambda d: (d / "notes.json").write_text('{"a": 1}') and str(d / "notes.json"),
     "notes.json: 'recipe' must be the recipe's name, got None"),
    (lambda d: (d / "half.json").write_text('{"cases": ') and str(d / "half.json"), "half.json is not valid JSON"),
    (lambda d: _store(d / "bad", digits={"qatcheck_baseline": 1, "recipe": "digits", "cases": {
        "fp32-torch": {"metrics": {"top1": {"value": "high", "tolerance": 0.5}}}}}) and str(d / "bad"),
     "digits.json: cases['fp32-torch'].metrics.top1.value must be a finite number, got 'high'"),
])
def test_bad_input_is_one_line_naming_it_exit_2(tmp_path, capsys, monkeypatch, make, named):
    monkeypatch.chdir(tmp_path)  # not a git repository: a name that is no path is no revision either
    good = _store(tmp_path / "good", digits=document(**{"fp32-torch": trt_ptq_case()}))
    rc, out, err = cli(capsys, make(tmp_path), str(good))
    assert (rc, out) == (2, "") and len(err.splitlines()) == 1, err
    assert err.startswith("qatcheck baselines: error: ") and named in err, err


def test_a_revision_without_the_directory_is_one_line(tmp_path, capsys, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "README").write_text("x")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "no baselines yet")
    _store(tmp_path / "baselines", digits=document(**{"fp32-torch": trt_ptq_case()}))
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "HEAD")
    assert rc == 2 and err == ("qatcheck baselines: error: revision HEAD has no directory baselines "
                               "(--dir names the baselines directory)\n")
    rc, _, err = cli(capsys, "HEAD~3")
    assert rc == 2 and "'HEAD~3' is neither a baseline file" in err


# ---- real data: a calibrator change, re-recorded -------------------------------------------------

SUITE = '''
import dataclasses
import pytest
from qatcheck.standard import test_accuracy, test_parity, test_structure  # noqa: F401
from qatcheck.zoo import recipes
Q = recipes.digits_recipe().quant
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    modes=("fp32", "trt_ptq"), backends=("onnxruntime",), dynamic_modes=(),
    quant=dataclasses.replace(Q, calibrator={calibrator!r})))
'''


def record(pytester, cache: Path, calibrator: str, *args: str) -> None:
    pytester.makepyfile(test_suite=SUITE.format(calibrator=calibrator))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}",
                                          "--qatcheck-cache", str(cache), "--update-baselines", *args,
                                          str(pytester.path / "test_suite.py"))
    assert "baselines updated" in result.stdout.str(), result.stdout.str()


def test_a_re_recorded_calibrator_change_names_the_moved_scales_and_the_metric_deltas(
        pytester, tmp_path_factory, capsys):
    """digits fp32 + trt_ptq on ONNX Runtime recorded with the percentile calibrator and committed,
    then re-recorded with entropy (14 points worse: recorded only with --qatcheck-force-update - the
    pull request a reviewer must catch). The diff of HEAD against the working tree names the
    calibrator, the metrics' drop in points and tolerance units, and every input scale entropy moved
    by quantizer - the stem's cut by more than half, the clipping that costs the accuracy - largest
    move first; the weight scales (per-channel max either way) and fp32 stay unchanged."""
    cache = tmp_path_factory.mktemp("diff-cache")
    record(pytester, cache, "percentile")
    git(pytester.path, "init", "-q")
    git(pytester.path, "add", "baselines")
    git(pytester.path, "commit", "-qm", "percentile")
    record(pytester, cache, "entropy", "--qatcheck-force-update")
    capsys.readouterr()

    rc = main(["baselines", "diff", "HEAD", "--markdown"])
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    print(out)  # the example in docs/baselines.md
    old = subprocess.run(["git", "show", "HEAD:baselines/digits.json"], cwd=pytester.path, check=True,
                         capture_output=True).stdout
    [diff] = diff_stores({"digits": baselines.parse(old, "HEAD:digits.json")},
                         {"digits": baselines.load(pytester.path / "baselines" / "digits.json", "digits")})
    assert "- settings: calibrator percentile → entropy (trt_ptq-onnxruntime)" in out
    assert f"{diff.unchanged} unchanged" in out and diff.unchanged > 20
    assert not [c for c in diff.changes if not c.case.startswith("trt_ptq")]  # fp32 is the same model
    moved = {(c.section, c.name, c.field): c for c in diff.changes if c.numeric}

    top1 = moved["metrics", "top1", ""]
    assert top1.change == pytest.approx((top1.new - top1.old) * 100) and top1.change < -5
    assert top1.units == pytest.approx(top1.change / 0.5)
    assert f"| trt_ptq-onnxruntime | metrics.top1 | {top1.old:.6g} | {top1.new:.6g} | {top1.change:+.3g} pt | {top1.units:+.2f} |" in out
    assert moved["parity", "cosine", ""].units < -10

    scales = [c for c in moved.values() if c.section == "structure"]
    assert {c.field for c in scales} == {"scale"} and all(c.name.endswith(":input") for c in scales)
    stem = moved["structure", "stem.conv:input", "scale"]
    assert stem.change == pytest.approx(stem.new / stem.old - 1) and stem.change < -0.5
    assert stem.units == pytest.approx(stem.change / 0.05)
    assert f"| quantizer stem.conv:input scale | {stem.old:.6g} | {stem.new:.6g} | {stem.change * 100:+.3g}% | {stem.units:+.2f} |" in out
    rows = [line for line in out.splitlines() if line.startswith("| trt_ptq")]
    sizes = [abs(float(r.rsplit("|", 2)[1])) for r in rows]
    assert len(rows) == len(moved) and sizes == sorted(sizes, reverse=True)
