"""Q/DQ placement rules (qatcheck.quantize.qdq_rules), the Q/DQ lint (qatcheck.quantize.qdq_lint) and the
YOLO pieces (the ``yolov8`` decoder, qatcheck.zoo.yolo).

A tiny YOLO-style network built from plain nn modules with ultralytics' block structure (Conv,
Bottleneck with a residual Add, C2f, SPPF with MaxPool, an ultralytics-style layer graph with an
Upsample + Concat layer) stands in for YOLO, so everything runs without the ``yolo`` extra; the same
checks run on the real yolov8n-from-yaml when ultralytics is installed.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qatcheck.quantize import qdq_rules as R
from qatcheck.quantize.qdq_lint import lint_qdq
from qatcheck.quantize.qdq_rules import QDQRules
from qatcheck.quantize.torch_quant import (
    TorchQuantConfig,
    _iter_quantizers,
    calibrate,
    export_qdq_onnx,
    load_quantized,
    quantize_model,
    quantizer_names,
    save_quantized,
)
from qatcheck.errors import ConfigError, DataError


# ---- a tiny YOLO-style model (ultralytics' block structure, plain nn modules) ------------------
class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1, self.cv2 = Conv(c1, 2 * self.c), Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c1 // 2), Conv(c1 // 2 * 4, c2)
        self.m, self.n = nn.MaxPool2d(k, 1, k // 2), 3

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, d: int = 1) -> None:
        super().__init__()
        self.d = d

    def forward(self, x):
        return torch.cat(x, self.d)


for _cls, _kind, _rule, _fwd in ((Bottleneck, "residual_add", R.bottleneck_rule, R.bottleneck_forward),
                                 (C2f, "shared_concat", R.c2f_rule, R.c2f_forward),
                                 (SPPF, "shared_concat", R.sppf_rule, R.sppf_forward),
                                 (Concat, "shared_concat", R.concat_rule, R.concat_forward)):
    R.register_block_rule(_cls, _kind, _rule, _fwd)


class TinyYolo(nn.Module):
    """stem -> C2f(residual) -> down -> SPPF -> upsample + Concat with the C2f -> C2f -> 1x1 head,
    run like ultralytics' DetectionModel (layers carry ``i`` and ``f``)."""

    def __init__(self) -> None:
        super().__init__()
        layers = [(-1, Conv(1, 8, 3, 2)), (-1, C2f(8, 8, 2, shortcut=True)), (-1, Conv(8, 16, 3, 2)),
                  (-1, SPPF(16, 16)), (-1, nn.Upsample(scale_factor=2.0)), ([-1, 1], Concat(1)),
                  (-1, C2f(24, 8)), (-1, nn.Conv2d(8, 6, 1))]
        for i, (f, m) in enumerate(layers):
            m.i, m.f = i, f
        self.model = nn.Sequential(*(m for _, m in layers))
        self.save = [1]

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


@pytest.fixture(scope="module", autouse=True)
def _single_thread(single_thread_module):
    """Intra-op threads only add overhead on models this small (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = TinyYolo()
    with torch.no_grad():  # non-trivial BN statistics, so activation ranges differ per tensor
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 16, 16) * 2)
    return model.eval()


def _batches(n: int = 2, size: int = 8, hw: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, hw, hw, generator=g) for _ in range(n)]


def _quantized(model: nn.Module, rules: QDQRules | None, calibrator: str = "max", hw: int = 16) -> nn.Module:
    cfg = TorchQuantConfig(calibrator=calibrator, num_bins=256, qdq_rules=rules)
    qm = quantize_model(model, cfg)
    calibrate(qm, _batches(hw=hw), cfg)
    return qm


def _export(qm: nn.Module, path: Path, hw: int = 16, outputs: tuple[str, ...] = ("out",)) -> Path:
    export_qdq_onnx(qm, torch.zeros(2, 1, hw, hw), path, "input", outputs)
    return path


def _disable_all(qm: nn.Module) -> None:
    for _, q in _iter_quantizers(qm):
        q.disable()


# ---- rules ----------------------------------------------------------------------------------
def test_rule_forwards_compute_the_original_function(tiny) -> None:
    """With every quantizer off, the rule-installed forwards are the blocks' own forwards."""
    qm = quantize_model(tiny, TorchQuantConfig(calibrator="max", qdq_rules=QDQRules()))
    _disable_all(qm)
    x = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(qm(x), tiny(x), rtol=0, atol=0)
    assert "forward" in vars(qm.model[1]) and "forward" not in vars(tiny.model[1])  # the copy only


def test_shared_quantizers_are_one_module(tiny) -> None:
    qm = quantize_model(tiny, TorchQuantConfig(calibrator="max", qdq_rules=QDQRules()))
    c2f, sppf, cat, c2f_b = qm.model[1], qm.model[3], qm.model[5], qm.model[6]
    s = c2f._qdq_concat[0]
    assert len(c2f._qdq_concat) == 4 and all(q is s for q in c2f._qdq_concat)
    assert c2f.cv2.conv._input_quantizer is s  # the Concat's consumer
    for b in c2f.m:  # bottlenecks read Concat inputs: input quantizer and Add identity are the shared one
        assert b.cv1.conv._input_quantizer is s and b._qdq_add_identity is s
        assert b._qdq_add_residual is not s
    assert sppf.m._input_quantizer is sppf._qdq_concat[0] is sppf.cv2.conv._input_quantizer
    assert len(sppf._qdq_concat) == 4
    # the Concat layer's consumer in the layer graph (f == -1 right after it)
    assert c2f_b.cv1.conv._input_quantizer is cat._qdq_concat[0] is cat._qdq_concat[1]
    # sharing is one module: calibration and quantizer_names see it once
    names = quantizer_names(qm)
    assert len(names) == len(set(map(id, (qm.get_submodule(n) for n in names))))


def test_lint_finds_missing_rules_and_rules_remove_every_finding(tiny, tmp_path) -> None:
    before = lint_qdq(_export(_quantized(tiny, None), tmp_path / "plain.onnx"))
    after = lint_qdq(_export(_quantized(tiny, QDQRules()), tmp_path / "rules.onnx"))
    print(f"\nQ/DQ pairs before/after the rules: {before.qdq_pairs} / {after.qdq_pairs}\n{before}\n{after}")
    # plain pytorch-quantization: 2 residual Adds and 4 Concats (2 C2f, SPPF, the Concat layer)
    # without input quantizers
    assert len(before.by_kind("add_unquantized_input")) == 2
    assert {f.node for f in before.by_kind("concat_unquantized_input")} == {
        "/model.1/Concat", "/model.3/Concat", "/model.5/Concat", "/model.6/Concat"}
    assert after.ok, str(after)
    assert (after.concats, after.adds) == (4, 2)
    assert after.activation_pairs > before.activation_pairs
    assert after.weight_pairs == before.weight_pairs


def test_planted_unshared_concat_input_is_found_exactly(tiny, tmp_path) -> None:
    qm = _quantized(tiny, QDQRules())
    assert lint_qdq(_export(qm, tmp_path / "ok.onnx")).ok
    planted = copy.deepcopy(qm.model[3]._qdq_concat[2])  # SPPF: the second pooled input
    planted._amax.data.mul_(1.5)
    qm.model[3]._qdq_concat[2] = planted
    report = lint_qdq(_export(qm, tmp_path / "planted.onnx"))
    assert [(f.kind, f.node) for f in report.findings] == [("concat_scale_mismatch", "/model.3/Concat")], str(report)
    finding = report.findings[0]
    assert len(set(finding.scales)) == 2 and None not in finding.scales
    assert "2 different scales" in finding.message and "share one quantizer" in finding.message
    assert "/model.3/Concat" in str(report)


def test_unquantized_add_input_is_found(tiny, tmp_path) -> None:
    qm = _quantized(tiny, QDQRules())
    qm.model[1].m[0]._qdq_add_residual.disable()
    report = lint_qdq(_export(qm, tmp_path / "add.onnx"))
    assert [(f.kind, f.node) for f in report.findings] == [("add_unquantized_input", "/model.1/m.0/Add")]
    assert "m.0/cv2/act/Mul_output_0" in report.findings[0].message


def test_each_rule_switch(tiny, tmp_path) -> None:
    no_add = lint_qdq(_export(_quantized(tiny, QDQRules(residual_add=False)), tmp_path / "a.onnx"))
    assert {f.kind for f in no_add.findings} == {"add_unquantized_input"}
    no_cat = lint_qdq(_export(_quantized(tiny, QDQRules(shared_concat=False)), tmp_path / "c.onnx"))
    assert {f.kind for f in no_cat.findings} == {"concat_unquantized_input"}
    qm = quantize_model(tiny, TorchQuantConfig(calibrator="max", qdq_rules=QDQRules(shared_maxpool=False)))
    assert qm.model[3].m._input_quantizer is not qm.model[3]._qdq_concat[0]


def test_ignore_policy(tiny) -> None:
    qm = quantize_model(tiny, TorchQuantConfig(calibrator="max", qdq_rules=QDQRules(ignore=(r"model\.3",))))
    assert not [n for n in quantizer_names(qm) if n.startswith("model.3.")]
    assert "_qdq_concat" not in qm.model[3]._modules  # no rule touches an ignored block
    assert any(n.startswith("model.2.") for n in quantizer_names(qm))
    # a pattern below a block: that bottleneck is left alone, the C2f's Concat is still shared
    qm = quantize_model(tiny, TorchQuantConfig(calibrator="max", qdq_rules=QDQRules(ignore=(r"model\.1\.m\.0",))))
    b0 = qm.model[1].m[0]
    assert b0.cv1.conv._input_quantizer._disabled and "_qdq_add_residual" not in b0._modules
    assert qm.model[1].m[1].cv1.conv._input_quantizer is qm.model[1]._qdq_concat[0]
    with pytest.raises(ConfigError, match=r"QDQRules.ignore pattern 'model\.\(3' is not a valid regex"):
        QDQRules(ignore=("model.(3",))
    with pytest.raises(ConfigError, match=r"'model.99' matches no module .*modules: model, model\.0, "
                                          r"model\.0\.conv, model\.0\.bn"):
        quantize_model(tiny, TorchQuantConfig(qdq_rules=QDQRules(ignore=("model.99",))))
    with pytest.raises(ConfigError, match="tuple of regexes"):
        QDQRules(ignore="model.3")


def test_save_load_round_trip_keeps_the_shared_amax(tiny, tmp_path) -> None:
    cfg = TorchQuantConfig(calibrator="percentile", num_bins=256, qdq_rules=QDQRules())
    qm = quantize_model(tiny, cfg)
    calibrate(qm, _batches(), cfg)
    save_quantized(qm, tmp_path / "q.pt", cfg)
    loaded = load_quantized(copy.deepcopy(tiny), cfg, tmp_path / "q.pt")
    s = loaded.model[1]._qdq_concat[0]
    assert s is loaded.model[1].cv2.conv._input_quantizer is loaded.model[1].m[0]._qdq_add_identity
    assert float(s.amax) == float(qm.model[1]._qdq_concat[0].amax)
    x = _batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qm(x), rtol=0, atol=0)
    with pytest.raises(Exception, match="different TorchQuantConfig"):
        load_quantized(copy.deepcopy(tiny), TorchQuantConfig(calibrator="percentile", num_bins=256),
                       tmp_path / "q.pt")


def test_residual_rules_for_qatcheck_blocks(tmp_path) -> None:
    from qatcheck.zoo.digit_detector import DigitDetector
    from qatcheck.zoo.digits_net import DigitsNet

    torch.manual_seed(0)
    net = DigitsNet().eval()  # layer1: identity Add, layer2: downsample Add
    plain = lint_qdq(_export(_quantized(net, None, hw=8), tmp_path / "d0.onnx", hw=8, outputs=("logits",)))
    ruled = _quantized(net, QDQRules(), hw=8)
    assert ruled.layer1._qdq_add_identity is ruled.layer1.conv1._input_quantizer
    assert ruled.layer2._qdq_add_identity is not ruled.layer2.conv1._input_quantizer
    report = lint_qdq(_export(ruled, tmp_path / "d1.onnx", hw=8, outputs=("logits",)))
    assert len(plain.by_kind("add_unquantized_input")) == 2 and report.ok, str(report)
    det = DigitDetector().eval()
    qd = _quantized(det, QDQRules(), hw=64)
    report = lint_qdq(_export(qd, tmp_path / "det.onnx", hw=64, outputs=("heatmap", "size", "offset")))
    assert report.adds == 1 and not report.by_kind("add_unquantized_input"), str(report)


# ---- lint -------------------------------------------------------------------------------------
def test_lint_errors_and_cli(tiny, tmp_path, capsys) -> None:
    from qatcheck.__main__ import main
    from qatcheck.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no such ONNX file"):
        lint_qdq(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="junk.onnx"):
        lint_qdq(tmp_path / "junk.onnx")
    plain = _export(_quantized(tiny, None), tmp_path / "plain.onnx")
    assert main(["lint", str(plain)]) == 1
    out = capsys.readouterr().out
    assert "6 finding(s)" in out and "Add /model.1/m.0/Add" in out
    assert main(["lint", str(plain), "--ignore", "/model\\.[1356]/"]) == 0
    assert main(["lint", str(tmp_path / "absent.onnx")]) == 2
    # a loaded model works too, and an fp32 graph has nothing to say
    from qatcheck.quantize.export import export_onnx
    from qatcheck.recipe import InputSpec

    fp32 = tmp_path / "fp32.onnx"
    export_onnx(tiny, InputSpec(shape=(1, 1, 16, 16)), fp32, ("out",))
    report = lint_qdq(onnx.load(str(fp32)))
    assert report.qdq_pairs == 0 and report.concats == 0 and len(report.by_kind("add_unquantized_input")) == 2


# ---- yolov8 decoder ---------------------------------------------------------------------------
def _yolo_maps(objects, classes: int = 10, n: int = 1, sizes=(8, 4, 2), reg_max: int = 16) -> list[np.ndarray]:
    """Raw maps with one confident anchor per object: ``(image, level, gy, gx, cls, (l, t, r, b)
    in cells (integers < reg_max), logit)``; everything else has a -10 class logit."""
    maps = [np.zeros((n, 4 * reg_max + classes, s, s), np.float32) for s in sizes]
    for m in maps:
        m[:, 4 * reg_max:] = -10.0
    for i, level, gy, gx, c, dist, logit in objects:
        m = maps[level]
        for side, d in enumerate(dist):
            m[i, side * reg_max + d, gy, gx] = 30.0  # a one-hot distribution at bin d
        m[i, 4 * reg_max + c, gy, gx] = logit
    return maps


def test_yolov8_decoder_boxes_scores_and_nms() -> None:
    from qatcheck.tasks.detection import YoloV8Decoder, make_decoder

    objs = [(0, 0, 2, 3, 4, (1, 1, 2, 1), 3.0),   # stride 8, centre (28, 20): box 20 12 44 28
            (0, 1, 1, 1, 7, (1, 0, 1, 2), 1.0),   # stride 16, centre (24, 24): box 8 24 40 56
            (0, 0, 2, 4, 4, (2, 1, 1, 1), 2.0),   # next cell, same class, same box -> suppressed by NMS
            (1, 2, 0, 1, 9, (0, 0, 1, 1), -8.0)]  # image 1: under the score threshold
    d0, d1 = make_decoder("yolov8").decode(_yolo_maps(objs, n=2))
    np.testing.assert_allclose(d0.boxes, [[20, 12, 44, 28], [8, 24, 40, 56]], atol=1e-3)
    np.testing.assert_allclose(d0.scores, [1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-1.0))], atol=1e-5)
    assert d0.labels.tolist() == [4, 7] and len(d1) == 0
    assert len(YoloV8Decoder(nms_iou=1.0).decode(_yolo_maps(objs, n=2))[0]) == 3
    assert YoloV8Decoder().num_classes(_yolo_maps([], classes=3)) == 3
    # strides are inferred from the map sizes (coarsest = P5 = 32): a P2-P5 head
    p2 = _yolo_maps([(0, 0, 5, 6, 1, (1, 1, 1, 1), 2.0)], sizes=(16, 8, 4, 2))
    assert YoloV8Decoder().level_strides(p2) == (4, 8, 16, 32)
    (d,) = YoloV8Decoder().decode(p2)
    np.testing.assert_allclose(d.boxes, [[22, 18, 30, 26]], atol=1e-3)
    np.testing.assert_allclose(YoloV8Decoder(strides=(8, 16, 32, 64)).decode(p2)[0].boxes, [[44, 36, 60, 52]],
                               atol=1e-3)


def test_yolov8_decoder_shape_errors_and_class_mismatch() -> None:
    from qatcheck.tasks.detection import DetectionTask, YoloV8Decoder

    with pytest.raises(DataError, match="needs 3 outputs"):
        YoloV8Decoder(strides=(8, 16, 32)).decode(_yolo_maps([])[:2])
    with pytest.raises(DataError, match=r"more than 64 channels"):
        YoloV8Decoder().num_classes([np.zeros((1, 64, 8, 8), np.float32)] * 3)
    with pytest.raises(ConfigError, match="strides must be positive"):
        YoloV8Decoder(strides=(8, 0))
    task = DetectionTask(None, list(range(1, 11)), "yolov8", ("small",))
    task.check_model(_yolo_maps([]))
    with pytest.raises(DataError, match="predicts 3 classes but the eval data declares 10"):
        task.check_model(_yolo_maps([], classes=3))


# ---- ultralytics ------------------------------------------------------------------------------
def test_missing_ultralytics_is_a_config_error(monkeypatch) -> None:
    from qatcheck.zoo import yolo

    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[yolo\]'"):
        yolo.import_ultralytics()


def _need_ultralytics() -> None:
    """Skip without the ``yolo`` extra; import it the offline way (qatcheck's config dir, fonts)."""
    from qatcheck.zoo.yolo import import_ultralytics

    try:
        import_ultralytics()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def yolov8n():
    _need_ultralytics()
    from qatcheck.zoo.yolo import build_yolo, fuse_batchnorm

    torch.manual_seed(0)
    return fuse_batchnorm(build_yolo("yolov8n.yaml", num_classes=10, in_channels=1).eval())


def test_yolov8n_rules_lint_and_planted_regression(yolov8n, tmp_path) -> None:
    names = ("p3", "p4", "p5")
    qm = quantize_model(yolov8n, TorchQuantConfig(calibrator="max", qdq_rules=QDQRules()))
    x = _batches(1, hw=64)[0]
    _disable_all(qm)
    with torch.no_grad():  # rule forwards == ultralytics' forwards
        for a, b in zip(qm(x), yolov8n(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    qm = _quantized(yolov8n, QDQRules(), hw=64)
    before = lint_qdq(_export(_quantized(yolov8n, None, hw=64), tmp_path / "plain.onnx", 64, names))
    after = lint_qdq(_export(qm, tmp_path / "rules.onnx", 64, names))
    print(f"\nyolov8n Q/DQ pairs before/after the rules: {before.qdq_pairs} / {after.qdq_pairs}\n"
          f"{before.summary()}\n{after.summary()}")
    assert len(before.by_kind("add_unquantized_input")) == 6  # 6 Bottleneck Adds in the backbone
    assert len(before.by_kind("concat_unquantized_input")) == 13  # 8 C2f + SPPF + 4 neck Concats
    assert after.ok, str(after)
    assert (after.adds, after.concats) == (6, 13)
    # planted: one input of the first neck Concat gets its own quantizer
    neck = qm.model[11]
    planted = copy.deepcopy(neck._qdq_concat[1])
    planted._amax.data.mul_(0.5)
    neck._qdq_concat[1] = planted
    report = lint_qdq(_export(qm, tmp_path / "planted.onnx", 64, names))
    assert [(f.kind, f.node) for f in report.findings] == [("concat_scale_mismatch", "/model.11/Concat")]


def test_yolo_checkpoint_class_count_mismatch_is_one_data_error(yolov8n) -> None:
    from qatcheck.tasks.detection import DetectionTask
    from qatcheck.zoo.yolo import build_yolo

    task = DetectionTask(None, list(range(1, 11)), "yolov8", ("small",))
    with torch.no_grad():
        task.check_model([o.numpy() for o in yolov8n(torch.zeros(1, 1, 64, 64))])
        three = build_yolo("yolov8n.yaml", num_classes=3).eval()
        outs = [o.numpy() for o in three(torch.zeros(1, 1, 64, 64))]
    with pytest.raises(DataError, match="predicts 3 classes but the eval data declares 10"):
        task.check_model(outs)


def test_shipped_yolo_checkpoint_recipe_and_loss() -> None:
    _need_ultralytics()
    from qatcheck.data import digit_detection as dd
    from qatcheck.tasks.detection import DetectionTask
    from qatcheck.zoo.recipes import yolo_recipe
    from qatcheck.zoo.train_yolo import evaluate
    from qatcheck.zoo.yolo import YOLO_CHECKPOINT, load_digit_yolo, yolo_loss

    assert YOLO_CHECKPOINT.stat().st_size <= 8 * 1024 * 1024
    meta = torch.load(YOLO_CHECKPOINT, weights_only=True)["meta"]
    model = load_digit_yolo()
    recipe = yolo_recipe()
    assert recipe.output_names == model.output_names == tuple(meta["output_names"])
    assert recipe.decoder == "yolov8" and recipe.quant.qdq_rules == QDQRules()
    val = dd.digit_detection_split("val")
    assert meta["val_fingerprint"] == val.fingerprint()
    x, targets = next(val.batches(16))
    with torch.no_grad():
        outs = model(torch.from_numpy(x))
    DetectionTask.for_dataset(val, recipe.decoder).check_model([o.numpy() for o in outs])
    loss = yolo_loss(outs, targets)
    assert torch.isfinite(loss) and 0 < float(loss) < 10
    small = dd.CocoDataset(*(lambda f: (f / "images", f / "instances.json"))(dd.ensure_split("val")),
                           input_size=(64, 64), letterbox=False, max_images=100, channels=1,
                           mean=(dd.MEAN,), std=(dd.STD,))
    m = evaluate(model, small)
    assert m["map50"] >= meta["val_map50"] - 0.08, (m, meta)


def test_shared_quantizer_histogram_stays_bounded(tiny) -> None:
    """A shared quantizer sees a narrow tensor, then wide ones: pytorch-quantization's histogram
    would grow to ~200k bins (and entropy calibration would take minutes); ours stays within
    num_bins .. 2 * num_bins with the same range and nearly the same amax."""
    from pytorch_quantization.calib import HistogramCalibrator

    from qatcheck.quantize.torch_quant import _BoundedHistogramCalibrator

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1000, generator=g) * s for s in (0.1, 5.0, 40.0, 1.0)]
    lib, ours = HistogramCalibrator(8, None, False, num_bins=512), _BoundedHistogramCalibrator(8, None, False, 512)
    for x in xs:
        lib.collect(x)
        ours.collect(x)
    assert lib._calib_hist.numel() > 100_000 and 512 <= ours._calib_hist.numel() <= 1024
    assert ours._calib_bin_edges.numel() == ours._calib_hist.numel() + 1
    assert float(ours._calib_hist.sum()) == float(lib._calib_hist.sum())
    assert float(ours._calib_bin_edges[-1]) >= max(float(x.abs().max()) for x in xs)
    a, b = (float(c.compute_amax("percentile", percentile=99.9)) for c in (lib, ours))
    assert abs(a - b) / a < 0.01
    ours.reset()
    ours.collect(xs[0])
    assert ours._calib_hist.numel() == 512
    qm = quantize_model(tiny, TorchQuantConfig(calibrator="entropy", num_bins=256, qdq_rules=QDQRules()))
    assert isinstance(qm.model[1]._qdq_concat[0]._calibrator, _BoundedHistogramCalibrator)
    assert type(qm.model[0].conv._input_quantizer._calibrator) is HistogramCalibrator
