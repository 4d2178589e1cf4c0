"""The sensitivity ranking does not tie on small subsets (issue #12, item 5): layers are ranked by
the output SQNR vs fp32 (continuous), not by the subset's top-1 (whole samples), and a budget's
chosen layers are stated on the subset and on the full eval set, which decides.

Two planted models where ONE layer causes the trt_ptq drop (the zoo's DigitsNet, one channel feeding
``<block>.conv2`` scaled up by ``factor`` and the weights reading it scaled down, so int8 on that
conv loses the other channels' resolution):

* ``tie``: clean digits, factor 40. On the first 64 samples no layer's exclusion moves top-1 at
  all (every layer ties on the metric, trt_ptq equals fp32 there); on the full 540 samples trt_ptq
  is 0.93 points below fp32 and excluding ``layer1.conv2`` recovers all of it. A 0.5-point budget
  "met" on the subset with no layer is missed on the full set.
* ``noise``: digits with Gaussian noise (sigma 0.3, seed 2), ``layer2.conv2`` planted (factor 22).
  On the first 256 samples excluding ``layer1.conv1`` flips 5 samples right by chance, the
  culprit 1, so a metric-first ranking put the culprit 2nd (measured with the previous ranking);
  on the full set the culprit is the layer whose exclusion recovers the drop.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from qatcheck.analysis import sensitivity as S
from qatcheck.analysis.keeplist import keep_list
from qatcheck.analysis.sensitivity_report import markdown_report, table_rows, write_reports
from qatcheck.data.base import ArrayDataset
from qatcheck.recipe import QuantSettings, Recipe

pytestmark = pytest.mark.usefixtures("single_thread_module")


def _planted(factor: float, block: str) -> nn.Module:
    from qatcheck.zoo.digits_net import DIGITS_CHECKPOINT, load_digits_net

    net = load_digits_net(DIGITS_CHECKPOINT).eval()
    blk = getattr(net, block)
    with torch.no_grad():
        blk.bn1.weight[0] *= factor
        blk.bn1.bias[0] = abs(float(blk.bn1.bias[0])) * factor
        blk.conv2.weight[:, 0] /= factor
    return net


def _recipe(name: str, net: nn.Module, noise: float = 0.0, seed: int = 0) -> Recipe:
    from qatcheck.data.digits import digits_split
    from qatcheck.zoo.recipes import digits_recipe

    val = digits_split("val")
    x = val.images
    if noise:
        x = (x + noise * np.random.default_rng(seed).standard_normal(x.shape)).astype(np.float32)
    data = ArrayDataset(f"digits_val_{name}", x, np.asarray(val.targets))
    return digits_recipe(name=name, model=lambda: net, eval_data=lambda: data, weights_id=name,
                         modes=("fp32", "trt_ptq"), top_k=(1,),
                         quant=QuantSettings(calibrator="minmax", calib_batches=2))


SCENARIOS = {  # name: (block, factor, noise sigma, noise seed, profile subset)
    "tie": ("layer1", 40.0, 0.0, 0, 64),
    "noise": ("layer2", 22.0, 0.3, 2, 256),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sens_rank_cache")


def _profile(name: str, cache_dir) -> tuple[S.SensitivityRunner, S.Profile, str]:
    block, factor, noise, seed, samples = SCENARIOS[name]
    runner = S.SensitivityRunner(_recipe(name, _planted(factor, block), noise, seed), "onnx",
                                 cache_dir, progress=False)
    return runner, S.profile(runner, "onnx", max_samples=samples), f"{block}.conv2"


def _assert_ranked_by_sqnr(prof: S.Profile, culprit: str) -> None:
    table = "\n".join(" | ".join(r) for r in table_rows(prof)[1])
    assert prof.ranked[0] == culprit, table
    keys = [r.excluded_sqnr_db for r in prof.layers]
    assert all(k is not None and math.isfinite(k) for k in keys), table
    assert len(set(keys)) == len(keys), f"layers tie on the ranking key:\n{table}"
    assert keys == sorted(keys, reverse=True) and [r.rank for r in prof.layers] == list(
        range(1, len(keys) + 1))
    assert prof.ranked_by == "excluded_sqnr_db"
    # the culprit stands out by a wide margin, not by rounding
    assert keys[0] - keys[1] > 3.0, table
    for r in prof.layers:
        assert r.sqnr_gain_db == pytest.approx(r.excluded_sqnr_db - prof.ptq_sqnr_db)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_culprit_ranked_first_where_the_subset_metric_cannot_tell(name, cache_dir):
    runner, prof, culprit = _profile(name, cache_dir)
    assert prof.samples == SCENARIOS[name][-1] and not prof.cached
    gains = {r.layer: r.gain_points for r in prof.layers}
    # the scenario: the subset's top-1 does not single the culprit out
    if name == "tie":
        assert prof.ptq == prof.fp32 and set(gains.values()) == {0.0}, gains
    _assert_ranked_by_sqnr(prof, culprit)
    # on the full eval set the culprit is what costs the accuracy: excluding it alone recovers
    # at least the whole drop
    fp32, ptq, alone = (runner.full_metric(None), runner.full_metric([]),
                        runner.full_metric([culprit]))
    assert ptq < fp32 - 0.005 and alone >= fp32 - 1e-9, (fp32, ptq, alone)


def test_budget_states_subset_and_full_figures(cache_dir, tmp_path):
    runner, prof, culprit = _profile("tie", cache_dir)
    res = S.choose_layers(runner, S.Budget(points=0.5), "onnx", prof=prof)
    # the full eval set decides: the subset would have needed no layer, the full set needs one
    assert res.met and res.layers == [culprit], res.message
    assert res.samples == 540 and res.ptq < res.floor <= res.partial
    assert (res.subset_samples, res.subset_fp32, res.subset_ptq) == (64, prof.fp32, prof.ptq)
    assert res.subset_ptq_met and res.subset_met and res.subset_partial == pytest.approx(prof.fp32)
    assert res.subset_partial_sqnr_db == pytest.approx(prof.row(culprit).excluded_sqnr_db)
    msg = res.message
    assert f"{res.partial:.2%} on the full eval set of 540" in msg
    assert f"on the profile's 64-sample subset with {culprit} in higher precision" in msg
    assert f"{res.subset_partial:.2%}" in msg and f"trt_ptq {prof.ptq:.2%}" in msg
    assert "NOTE: the subset alone would have needed no layer" in msg
    assert msg.endswith(f"keep_precision=('{culprit}',)")

    files = write_reports(prof, tmp_path, res)
    assert [f.name for f in files] == ["tie-sensitivity.json", "tie-sensitivity.png",
                                       "tie-sensitivity.md"]
    data = json.loads(files[0].read_text())
    check = data["budget_check"]
    assert check["decided_by"] == "full" and check["layers"] == [culprit]
    assert check["subset"]["samples"] == 64 and check["full"]["samples"] == 540
    assert check["subset"]["ptq"] == pytest.approx(prof.ptq * 100, abs=1e-3)
    assert check["full"]["ptq"] == pytest.approx(res.ptq * 100, abs=1e-3)
    assert check["full"]["partial"] == pytest.approx(res.partial * 100, abs=1e-3)
    assert check["subset"]["ptq_met"] is True and check["full"]["met"] is True
    assert data["budget"]["subset_partial"] == res.subset_partial
    assert data["profile"]["ranked_by"] == "excluded_sqnr_db"
    assert data["profile"]["layers"][0]["excluded_sqnr_db"] == prof.layers[0].excluded_sqnr_db
    md = files[2].read_text()
    assert md == markdown_report(prof, res)
    assert (f"| profile subset | 64 | {prof.fp32 * 100:.2f} | {prof.ptq * 100:.2f} | "
            f"{res.subset_partial * 100:.2f} | met |") in md
    assert (f"| full eval set (decides) | 540 | {res.fp32 * 100:.2f} | {res.ptq * 100:.2f} | "
            f"{res.partial * 100:.2f} | met |") in md
    assert f"| 1 | {culprit} | {prof.layers[0].excluded_sqnr_db:.2f} |" in md
    keep = keep_list(prof, res)
    assert "on the profile's 64-sample subset" in keep.summary and "(the ranking key)" in \
        keep.reasons[culprit]


def test_budget_missed_on_the_full_set_says_so(cache_dir, monkeypatch):
    """Even all layers excluded misses the budget on the full set: said, with the subset's figure
    for the same variant (which would have passed) next to it."""
    runner, prof, _ = _profile("tie", cache_dir)
    real = runner.full_metric
    monkeypatch.setattr(runner, "full_metric", lambda ex: real(ex) if not ex else 0.9)
    res = S.choose_layers(runner, S.Budget(points=0.5), "onnx", prof=prof)
    assert not res.met and res.partial == 0.9
    assert "cannot be met on the full eval set of 540" in res.message
    assert res.subset_met and "NOTE: the subset alone would have needed no layer" in res.message


def _row(layer: str, gain: float, cosine: float, sqnr: float) -> S.LayerSensitivity:
    return S.LayerSensitivity(layer, [layer], 0.9 + gain / 100, cosine, gain, excluded_sqnr_db=sqnr)


def test_rank_is_by_sqnr_not_by_the_metric():
    """The subset metric never decides the order: a layer whose exclusion flipped samples by
    chance (larger gain) ranks below one whose exclusion brings the outputs closer to fp32."""
    rows = [_row("lucky", 1.95, 0.9954, 20.14), _row("culprit", 0.39, 0.9993, 28.16),
            _row("flat", 0.0, 0.9956, 20.40), _row("worse", -1.17, 0.9961, 20.84)]
    assert [r.layer for r in S._rank(rows)] == ["culprit", "worse", "flat", "lucky"]
    # exact SQNR ties (an exclusion that changes no output) fall back to cosine, gain, name
    tied = [_row("b", 0.0, 0.99, 20.0), _row("a", 0.0, 0.99, 20.0), _row("c", 0.0, 0.995, 20.0),
            _row("d", 0.39, 0.99, 20.0)]
    assert [r.layer for r in S._rank(tied)] == ["c", "d", "a", "b"]


def test_sqnr_db():
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((4, 10)).astype(np.float32)] for _ in range(3)]
    noisy = [[r[0] + 0.01 * rng.standard_normal(r[0].shape).astype(np.float32)] for r in ref]
    sig = sum(float((r[0].astype(np.float64) ** 2).sum()) for r in ref)
    err = sum(float(((r[0].astype(np.float64) - o[0]) ** 2).sum()) for r, o in zip(ref, noisy))
    assert S.sqnr_db(ref, noisy) == pytest.approx(10 * math.log10(sig / err))
    assert 35 < S.sqnr_db(ref, noisy) < 45  # 1% noise: ~40 dB
    assert S.sqnr_db(ref, ref) == S._SQNR_CAP_DB  # equal outputs: the cap, still finite JSON
    # several outputs: the mean of the per-output SQNRs, so a change in ANY output moves it (the
    # worst output alone would tie layers that only feed another head)
    two = [[r[0], 3 * r[0]] for r in ref]
    one_noisy = S.sqnr_db(two, [[o[0], 3 * r[0]] for r, o in zip(ref, noisy)])
    assert one_noisy == pytest.approx((S.sqnr_db(ref, noisy) + S._SQNR_CAP_DB) / 2)
    both = S.sqnr_db(two, [[o[0], 3 * o[0]] for o in noisy])  # the same relative error in each
    assert both == pytest.approx(S.sqnr_db(ref, noisy)) and both < one_noisy
    nan = [[np.full_like(r[0], np.nan)] for r in ref]
    assert S.sqnr_db(ref, nan) == -S._SQNR_CAP_DB  # non-finite never reads as close to fp32
    with pytest.raises(ValueError, match="2 output batches vs 3"):
        S.sqnr_db(ref, noisy[:2])
