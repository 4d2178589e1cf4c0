"""Models with several outputs (issue 12): the recipe names the output its task scores, other heads
get tasks of their own (a custom regression metric, lower is better, with its own baseline), parity
is judged per output, and outputs that change places are named.

The model: a three-headed net on the digits (box regression N x 4, five landmarks N x 10, a
two-class probability "is it >= 5" N x 2), trained here in a few seconds, seeded. Before issue 12
such a model was scored on output 0 (the boxes) as class logits and recorded as the baseline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qatcheck.errors import ConfigError, DataError
from qatcheck.judges import CaseBaseline, judge_accuracy
from qatcheck.measurement import Case, Measurement
from qatcheck.tasks.base import MetricSpec
from qatcheck.tasks.classification import ClassificationTask

SUITE = '''
import functools
import os

import numpy as np
import pytest
import torch
from torch import nn

from qatcheck.data.base import ArrayDataset
from qatcheck.data.digits import digits_split
from qatcheck.recipe import InputSpec, QuantSettings, Recipe, Tolerances
from qatcheck.standard import test_accuracy, test_parity  # noqa: F401
from qatcheck.tasks import register_task, task_names
from qatcheck.tasks.base import MetricSpec
from qatcheck.tasks.heads import HeadTargets

ORDER = {order!r}  # the order the model returns its heads in


class LandmarkL2:
    """Mean Euclidean distance between predicted and true landmarks (5 points, pixels)."""

    def __init__(self):
        self.total, self.n = 0.0, 0

    def update(self, outputs, targets):
        d = (outputs[0] - np.asarray(targets)).reshape(len(targets), 5, 2)
        self.total += float(np.sqrt((d ** 2).sum(-1)).mean(-1).sum())
        self.n += len(targets)

    def result(self):
        return {{"l2": self.total / self.n}}


class LandmarkTask:
    name = "landmark_l2"
    primary_metric = "l2"
    metric_names = ("l2",)
    agreement_name = "l2"
    metric_specs = {{"l2": MetricSpec(higher_is_better=False, fraction=False)}}

    def metric(self):
        return LandmarkL2()

    def agreement(self):
        raise NotImplementedError  # a head's task is scored, the recipe's task gives the agreement


if "landmark_l2" not in task_names():
    register_task("landmark_l2", lambda recipe, eval_data: LandmarkTask())


def landmarks(images):
    """Five points per image: the intensity-weighted centroid of each horizontal band and of the
    whole image (pixels) - a target a small CNN learns well."""
    x = images[:, 0]
    h, w = x.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w]
    pts = []
    for band in [slice(0, h // 2), slice(h // 2, h), slice(0, h // 4), slice(3 * h // 4, h), slice(0, h)]:
        m = x[:, band] - x[:, band].min(axis=(1, 2), keepdims=True) + 1e-6
        pts += [(m * ys[band]).sum((1, 2)) / m.sum((1, 2)), (m * xs[band]).sum((1, 2)) / m.sum((1, 2))]
    return np.stack(pts, 1).astype(np.float32)


def ink_boxes(images):
    """The box around the digit's ink (x0, y0, x1, y1 in pixels)."""
    x = images[:, 0]
    ink = x > x.mean(axis=(1, 2), keepdims=True)
    rows, cols = ink.any(2), ink.any(1)
    first = lambda a: a.argmax(1)
    last = lambda a: a.shape[1] - 1 - a[:, ::-1].argmax(1)
    return np.stack([first(cols), first(rows), last(cols), last(rows)], 1).astype(np.float32)


def with_heads(ds):
    big = (np.asarray(ds.targets) >= 5).astype(np.int64)
    return ArrayDataset(ds.name + "-heads", ds.images, HeadTargets({{"prob": big, "landmarks": landmarks(ds.images)}}))


class ThreeHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 64), nn.ReLU())
        self.boxes, self.landmarks, self.prob = nn.Linear(64, 4), nn.Linear(64, 10), nn.Linear(64, 2)

    def forward(self, x):
        f = self.body(x)
        heads = {{"boxes": self.boxes(f), "landmarks": self.landmarks(f), "prob": self.prob(f)}}
        return tuple(heads[k] for k in ORDER)


@functools.lru_cache(maxsize=None)
def trained():
    ckpt = os.environ.get("THREE_HEADS_CKPT")
    if ckpt and os.path.exists(ckpt):  # trained once per test, not once per pytest process
        net = ThreeHeads()
        net.load_state_dict(torch.load(ckpt))
        return net.eval()
    torch.manual_seed(0)
    ds = digits_split("train")
    x = torch.from_numpy(ds.images)
    big = torch.from_numpy((np.asarray(ds.targets) >= 5).astype(np.int64))
    lmk = torch.from_numpy(landmarks(ds.images))
    box = torch.from_numpy(ink_boxes(ds.images))
    net = ThreeHeads()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    global ORDER
    order, ORDER = ORDER, ("boxes", "landmarks", "prob")
    for _ in range(25):
        for i in range(0, len(x), 128):
            boxes, lm, prob = net(x[i:i + 128])
            loss = nn.functional.cross_entropy(prob, big[i:i + 128]) + 0.05 * nn.functional.mse_loss(lm, lmk[i:i + 128])
            loss = loss + 0.05 * nn.functional.mse_loss(boxes, box[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ORDER = order
    if ckpt:
        torch.save(net.state_dict(), ckpt)
    return net.eval()


RECIPE = Recipe(
    name="faces", task="classification", model=trained,
    eval_data=lambda: with_heads(digits_split("val")), calib_data=lambda: digits_split("calib"),
    input=InputSpec(name="input", shape=(32, 1, 16, 16)), output_names=("boxes", "landmarks", "prob"),
    task_output="prob", heads={{"landmarks": "landmark_l2"}}, top_k=(1,),
    modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"),
    quant=QuantSettings(calibrator="percentile", calib_batches=4),
    tolerances=Tolerances(output_min_cosine={{"*": {{"landmarks": 0.999}}}}))

pytestmark = pytest.mark.qatcheck_recipe(RECIPE)
'''

ORDER = ("boxes", "landmarks", "prob")


def _run(pytester, tmp_path, *args):
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--qatcheck-cache", str(tmp_path / "cache"),
        "--qatcheck-baselines", str(tmp_path / "baselines"), "--qatcheck-reports", str(tmp_path / "reports"),
        "--qatcheck-no-progress", "--benchmark-disable", *args)


def test_named_head_scored_custom_head_baselined_parity_per_output_reorder_named(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("THREE_HEADS_CKPT", str(tmp_path / "three_heads.pt"))
    pytester.makepyfile(test_faces=SUITE.format(order=ORDER))
    rec = _run(pytester, tmp_path, "--update-baselines")
    assert rec.ret == 0, rec.stdout.str()
    cases = {c["case"]["id"]: c for c in json.loads((tmp_path / "reports" / "faces.json").read_text())["cases"]}
    fp32 = cases["faces-fp32-torch"]
    # the named head is scored: "is it >= 5" on the digits, far above the 12% a box column gave
    assert fp32["metrics"]["top1"] > 0.9, fp32["metrics"]
    assert 0 < fp32["metrics"]["landmarks.l2"] < 2.0  # pixels on a 16x16 image
    int8 = cases["faces-trt_ptq-onnxruntime"]
    assert set(int8["output_parity"]) == {"boxes", "landmarks", "prob"}
    stored = json.loads((tmp_path / "baselines" / "faces.json").read_text())
    assert stored["outputs"] == {"boxes": [4], "landmarks": [10], "prob": [2]}
    assert set(stored["cases"]["trt_ptq-onnxruntime"]["values"]) == {"landmarks.l2"}
    assert "landmarks.l2" in (tmp_path / "reports" / "faces.md").read_text()
    rec.stdout.fnmatch_lines(["parity per output (cosine / max-abs):", "*trt_ptq-onnxruntime: boxes * / *, landmarks *, prob *"])
    clean = _run(pytester, tmp_path)
    assert clean.ret == 0, clean.stdout.str()

    # the model now returns its heads in another order; the recipe still says boxes, landmarks, prob
    pytester.makepyfile(test_faces=SUITE.format(order=("prob", "boxes", "landmarks")))
    swapped = _run(pytester, tmp_path, "-k", "accuracy and fp32-torch")
    assert swapped.ret == 1
    swapped.stdout.fnmatch_lines(["*output 'boxes' has per-sample shape (2,); the baseline recorded (4,)*"])


def test_a_multi_output_classification_recipe_must_name_its_output():
    from qatcheck.zoo.recipes import digits_recipe

    with pytest.raises(ConfigError, match="set task_output"):
        digits_recipe(output_names=("boxes", "logits"))
    with pytest.raises(ConfigError, match="names output 'nope'"):
        digits_recipe(output_names=("boxes", "logits"), task_output="nope")
    with pytest.raises(ConfigError, match="task 'nope', which is unknown"):
        digits_recipe(output_names=("boxes", "logits"), task_output="logits", heads={"boxes": "nope"})
    from qatcheck.recipe import Tolerances
    with pytest.raises(ConfigError, match=r"output_min_cosine\['fp8'\] names output 'x'"):
        digits_recipe(tolerances=Tolerances(output_min_cosine={"fp8": {"x": 0.9}}))
    with pytest.raises(ConfigError, match=r"output_min_cosine\['logits'\] is 0.9; the floors are per mode"):
        digits_recipe(tolerances=Tolerances(output_min_cosine={"logits": 0.9}))  # the old flat form


def test_top_k_at_or_above_the_class_count_is_an_error_naming_the_output():
    task = ClassificationTask((1, 5), output="prob")
    with pytest.raises(DataError, match="top-5, but output 'prob' has 2 classes"):
        task.check_model([np.zeros((4, 2), np.float32)])
    task.check_model([np.zeros((4, 10), np.float32)])  # ten classes: top-5 means something


def _m(value: float) -> Measurement:
    return Measurement(case=Case("r", "trt_ptq", "onnxruntime"), metrics={"l2": value}, parts=frozenset({"eval"}))


def test_a_lower_is_better_value_metric_is_judged_in_its_direction_relative_to_its_baseline():
    specs = {"l2": MetricSpec(higher_is_better=False, fraction=False)}
    base = CaseBaseline("b.json", {"values": {"l2": {"value": 0.50, "tolerance": 0.05}}})
    kw = dict(metric_names=("l2",), primary="l2", tolerance_points=0.5, specs=specs, value_rel=0.05)
    v = judge_accuracy(_m(0.56), base, **kw)  # 12% larger error: worse
    assert v.status == "fail" and "l2 0.56 is above the baseline 0.5 by 12.0%" in v.failures[0]
    assert "lower is better" in v.failures[0]
    assert judge_accuracy(_m(0.52), base, **kw).status == "pass"      # 4%: within 5%
    assert judge_accuracy(_m(0.40), base, **kw).status == "improved"  # a smaller error
    assert v.updates[0].section == "values" and v.updates[0].tolerance == 0.05
    # a fraction in the values section would be refused by the store; a value > 1 is fine there
    v = judge_accuracy(_m(3.5), None, **kw)
    assert v.ok and v.updates[0].value == 3.5
    # the fp32 budget of a value metric is a percentage of fp32's value
    fp32 = _m(0.5)
    v = judge_accuracy(_m(0.6), None, **kw, fp32=fp32, budget_points=10.0)
    assert v.status == "fail" and "20.0% above fp32" in v.failures[0]


def test_each_output_is_held_to_its_floor_and_named_when_below():
    from qatcheck.judges import judge_parity
    from qatcheck.recipe import ParityThresholds

    outs = {"boxes": {"cosine": 0.9995, "max_abs": 0.01, "mean_abs": 0.001},
            "landmarks": {"cosine": 0.9731, "max_abs": 0.2, "mean_abs": 0.02},
            "prob": {"cosine": 0.9999, "max_abs": 0.01, "mean_abs": 0.001}}
    m = Measurement(case=Case("r", "trt_ptq", "onnxruntime"), parts=frozenset({"eval"}), output_parity=outs,
                    parity={**outs["landmarks"], "top1_agreement": 1.0}, parity_reference="torch fp32 (quantization)")
    kw = dict(thresholds=ParityThresholds(min_cosine=0.98, min_top1_agreement=0.95), agreement_name="top1_agreement",
              cosine_tolerance=0.0005, agreement_tolerance=0.01)
    v = judge_parity(m, None, **kw)  # the drifting head is named, the others pass
    assert v.status == "fail" and len(v.failures) == 1 and v.failures[0].startswith("output 'landmarks': cosine 0.973100")
    assert judge_parity(m, None, **kw, output_floors={"landmarks": 0.97}).status == "pass"  # its own floor
    assert judge_parity(m, None, **kw, output_floors={"boxes": 0.9999}).failures[0].startswith("output 'boxes'")
