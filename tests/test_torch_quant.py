"""torch_ptq / qat builders: pytorch-quantization Q/DQ, calibration, Q/DQ ONNX export, QAT.

A small residual CNN trained for a few seconds on scikit-learn's digits (8x8, 10 classes) stands in
for a recipe model: big enough that a broken quantization range visibly destroys accuracy, small
enough that the whole file runs in well under a minute on a CPU.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pytorch_quantization.calib import histogram as pq_histogram
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from qatcheck.quantize.qat import QATConfig, finetune
from qatcheck.quantize.torch_quant import (
    TorchQuantConfig,
    _compute_amax_mse,
    calibrate,
    export_qdq_onnx,
    load_quantized,
    quantize_model,
    quantizer_names,
    save_quantized,
)
from qatcheck.errors import ArtifactError, ConfigError, DataError

CALIBRATORS = ("max", "entropy", "mse", "percentile")
#: 512 bins keep entropy calibration fast (its search is O(bins^2) in Python).
BINS = 512


class ResNetTiny(nn.Module):
    """Conv stem, one residual block, max pool, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding="same")
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.fc(self.gap(self.pool(x)).flatten(1))


@pytest.fixture(scope="module", autouse=True)
def _single_thread(single_thread_module):
    """Intra-op threads only add overhead on models this small (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # N,1,8,8 in [-0.5, 0.5]
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    return {"x_train": images[:1400], "y_train": labels[:1400],
            "x_test": images[1400:], "y_test": labels[1400:]}


def _batches(x: np.ndarray, y: np.ndarray, size: int = 64):
    return lambda: ((x[i:i + size], y[i:i + size]) for i in range(0, len(x), size))


@pytest.fixture(scope="module")
def fp32_model(digits) -> nn.Module:
    torch.manual_seed(0)
    model = ResNetTiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    model.train()
    for _ in range(8):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def _calib_batches(digits) -> list[np.ndarray]:
    return [digits["x_train"][i:i + 128] for i in range(0, 512, 128)]


def _predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _input_quantizers(qmodel: nn.Module) -> dict[str, TensorQuantizer]:
    return {n: m for n, m in qmodel.named_modules()
            if isinstance(m, TensorQuantizer) and n.endswith("_input_quantizer") and not m._disabled}


@pytest.fixture(scope="module")
def calibrated(fp32_model, digits) -> dict[str, nn.Module]:
    """One calibrated model per calibrator, shared by the tests that only read them."""
    out = {}
    for name in CALIBRATORS:
        config = TorchQuantConfig(calibrator=name, num_bins=BINS)
        qmodel = quantize_model(fp32_model, config)
        calibrate(qmodel, _calib_batches(digits), config)
        out[name] = qmodel
    return out


def test_fp32_model_is_a_meaningful_reference(fp32_model, digits):
    assert _accuracy(_predict(fp32_model, digits["x_test"]), digits["y_test"]) > 0.9


def test_quantize_model_replaces_layers_in_a_copy(fp32_model):
    qmodel = quantize_model(fp32_model, TorchQuantConfig(num_bins=BINS))
    assert type(fp32_model.conv1) is nn.Conv2d  # original untouched, nn not monkeypatched
    assert not any(isinstance(m, TensorQuantizer) for m in fp32_model.modules())
    assert type(nn.Conv2d(1, 1, 1)) is nn.Conv2d
    assert {type(qmodel.conv1).__name__, type(qmodel.pool).__name__, type(qmodel.gap).__name__,
            type(qmodel.fc).__name__} == {"QuantConv2d", "QuantMaxPool2d", "QuantAdaptiveAvgPool2d",
                                          "QuantLinear"}
    assert qmodel.conv2.padding == "same"
    assert torch.equal(qmodel.conv1.weight, fp32_model.conv1.weight)
    assert qmodel.conv1.weight is not fp32_model.conv1.weight
    names = quantizer_names(qmodel)
    assert len(names) == 6 + 4  # 6 quantized layers' inputs, 4 of them with weights
    assert "stem.0._input_quantizer" in names and "fc._weight_quantizer" in names


@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_each_calibrator_gives_finite_amax_and_close_outputs(calibrated, fp32_model, digits,
                                                             calibrator):
    qmodel = calibrated[calibrator]
    inputs = _input_quantizers(qmodel)
    assert len(inputs) == 6
    for name, q in inputs.items():
        assert q.amax is not None and q.amax.numel() == 1, name
        assert torch.isfinite(q.amax).all() and q.amax.item() > 0, name
    assert qmodel.conv1.weight_quantizer.amax.shape == (16, 1, 1, 1)  # per output channel
    assert not qmodel.training
    ref, out = _predict(fp32_model, digits["x_test"]), _predict(qmodel, digits["x_test"])
    assert _cosine(ref, out) > 0.99
    assert _accuracy(out, digits["y_test"]) > _accuracy(ref, digits["y_test"]) - 0.03


def test_mse_runs_on_cpu_and_stays_within_max(calibrated):
    assert not torch.cuda.is_available()  # the path under test: no .cuda() anywhere
    mse, mx = _input_quantizers(calibrated["mse"]), _input_quantizers(calibrated["max"])
    for name in mse:
        assert mse[name].amax.item() <= mx[name].amax.item() * (1 + 1e-6), name


def test_cpu_mse_search_matches_pytorch_quantization(monkeypatch):
    """Same search as the library's CUDA-only _compute_amax_mse (run here with .cuda() a no-op)."""
    torch.manual_seed(1)
    cal = pq_histogram.HistogramCalibrator(8, None, False, num_bins=BINS)
    cal.collect(torch.randn(64, 32).exp())   # skewed, long-tailed: the optimum is well inside
    cal.collect(torch.randn(64, 32).exp() * 2)  # a second, wider batch grows the histogram
    ours = _compute_amax_mse(cal)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    theirs = cal.compute_amax("mse")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours.item() < cal._calib_bin_edges[-1].item()


@pytest.mark.parametrize("bad", [dict(calibrator="kl"), dict(num_bins=64), dict(percentile=20.0),
                                 dict(exclude="fc"), dict(exclude=("fc[",))])
def test_bad_config_is_a_config_error(bad):
    with pytest.raises(ConfigError) as err:
        TorchQuantConfig(**bad)
    if "calibrator" in bad:
        assert "'kl'" in str(err.value) and "entropy" in str(err.value) and "mse" in str(err.value)


def test_calibration_data_errors(fp32_model, digits):
    config = TorchQuantConfig(calibrator="max")
    qmodel = quantize_model(fp32_model, config)
    with pytest.raises(DataError, match="no batches"):
        calibrate(qmodel, [], config)
    x = digits["x_train"][:32]
    with pytest.raises(DataError, match=r"expected \(N, 1, 8, 8\)"):
        calibrate(qmodel, [x, x[:, :, :4]], config)  # inconsistent batches
    with pytest.raises(DataError, match=r"\(32, 1, 8, 8\).*expected \(N, 1, 16, 16\)"):
        calibrate(qmodel, [x], config, input_shape=(32, 1, 16, 16))
    with pytest.raises(DataError, match=r"\(32, 3, 8, 8\) does not fit the model"):
        calibrate(qmodel, [np.repeat(x, 3, axis=1)], config)  # wrong channel count
    # the model is still usable after the failures
    calibrate(qmodel, [(x, digits["y_train"][:32])], config)  # (inputs, targets) pairs accepted
    assert all(q.amax is not None for q in _input_quantizers(qmodel).values())


def test_exclude_disables_exactly_the_named_module(fp32_model, digits):
    config = TorchQuantConfig(calibrator="max", exclude=("conv1",))
    qmodel = quantize_model(fp32_model, config)
    all_names = set(quantizer_names(quantize_model(fp32_model, TorchQuantConfig(calibrator="max"))))
    assert all_names - set(quantizer_names(qmodel)) == {"conv1._input_quantizer",
                                                         "conv1._weight_quantizer"}
    calibrate(qmodel, _calib_batches(digits), config)
    assert qmodel.conv1.input_quantizer.amax is None
    x = torch.from_numpy(digits["x_test"][:8])
    with torch.no_grad():  # conv1 sees its input unquantized
        stem = qmodel.stem(x)
        assert torch.equal(qmodel.conv1.input_quantizer(stem), stem)


def test_quantizer_that_sees_no_data_is_disabled_and_stays_so(fp32_model, digits, tmp_path):
    model = copy.deepcopy(fp32_model)
    model.aux = nn.Linear(10, 2)  # registered but never called (like an eval-mode aux head)
    config = TorchQuantConfig(calibrator="max")
    qmodel = quantize_model(model, config)
    calibrate(qmodel, _calib_batches(digits), config)
    assert not any(n.startswith("aux.") for n in quantizer_names(qmodel))
    export_qdq_onnx(qmodel, torch.from_numpy(digits["x_test"][:2]), tmp_path / "m.onnx", "input",
                    ["logits"])
    save_quantized(qmodel, tmp_path / "m.pt", config)
    loaded = load_quantized(model, config, tmp_path / "m.pt")
    assert quantizer_names(loaded) == quantizer_names(qmodel)


def test_exclude_matching_nothing_names_pattern_and_candidates(fp32_model):
    with pytest.raises(ConfigError) as err:
        quantize_model(fp32_model, TorchQuantConfig(exclude=("layer1.*",)))
    message = str(err.value)
    assert "'layer1.*'" in message and "stem.0" in message and "conv1" in message


def test_qdq_onnx_export_matches_fake_quant(calibrated, digits, tmp_path):
    qmodel = calibrated["entropy"]
    path = tmp_path / "sub" / "model.onnx"
    assert TensorQuantizer.use_fb_fake_quant is False
    export_qdq_onnx(qmodel, torch.from_numpy(digits["x_test"][:4]), path, "input", ["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    assert TensorQuantizer.use_fb_fake_quant is False
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp file left
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= 6 and ops.count("DequantizeLinear") >= 6 + 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = digits["x_test"]  # a batch size different from the export example: dynamic batch works
    onnx_out = session.run(["logits"], {"input": x})[0]
    torch_out = _predict(qmodel, x)
    assert _cosine(onnx_out, torch_out) > 0.999
    assert (onnx_out.argmax(1) == torch_out.argmax(1)).mean() > 0.98


def test_export_restores_flag_on_failure_and_refuses_uncalibrated(calibrated, fp32_model, tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(Exception):
        export_qdq_onnx(calibrated["max"], torch.zeros(2, 3, 8, 8), path, "input", ["logits"])
    assert TensorQuantizer.use_fb_fake_quant is False
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="calibrate first"):
        export_qdq_onnx(quantize_model(fp32_model, TorchQuantConfig()), torch.zeros(2, 1, 8, 8),
                        path, "input", ["logits"])
    with pytest.raises(ConfigError, match="opset"):
        export_qdq_onnx(calibrated["max"], torch.zeros(2, 1, 8, 8), path, "input", ["logits"],
                        opset=11)


def test_save_load_round_trip_is_bit_identical(calibrated, fp32_model, digits, tmp_path):
    config = TorchQuantConfig(calibrator="percentile", num_bins=BINS)
    path = tmp_path / "q.pt"
    save_quantized(calibrated["percentile"], path, config)
    fresh = ResNetTiny().eval()  # the factory's model: its weights must come from the file
    loaded = load_quantized(fresh, config, path)
    assert not loaded.training
    x = torch.from_numpy(digits["x_test"])
    with torch.no_grad():
        assert torch.equal(loaded(x), calibrated["percentile"](x))
    assert quantizer_names(loaded) == quantizer_names(calibrated["percentile"])
    with pytest.raises(ArtifactError, match="calibrator"):
        load_quantized(fresh, TorchQuantConfig(calibrator="max"), path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="junk.pt"):
        load_quantized(fresh, config, tmp_path / "junk.pt")


def test_per_tensor_weights_and_transposed_conv_axis():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 6, 2, stride=2)).eval()
    config = TorchQuantConfig(calibrator="max")
    per_channel = quantize_model(model, config)
    calibrate(per_channel, [torch.randn(4, 2, 8, 8)], config)
    assert per_channel[1].weight_quantizer.amax.shape == (1, 6, 1, 1)  # output channels of (in, out, k, k)
    per_tensor = quantize_model(model, TorchQuantConfig(calibrator="max", per_channel=False))
    calibrate(per_tensor, [torch.randn(4, 2, 8, 8)], config)
    assert per_tensor[0].weight_quantizer.amax.numel() == 1


def test_finetune_reduces_loss_deterministically_and_leaves_eval(digits):
    # QAT starts from a trained model (its straight-through gradients vanish outside the calibrated
    # ranges, so a random model barely learns); a few fp32 steps leave plenty of loss to remove.
    torch.manual_seed(3)
    base = ResNetTiny()
    x, y = digits["x_train"][:512], digits["y_train"][:512]
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    for images, labels in _batches(x, y)():
        opt.zero_grad()
        nn.functional.cross_entropy(base(torch.from_numpy(images)), torch.from_numpy(labels)).backward()
        opt.step()
    base.eval()
    config = TorchQuantConfig(calibrator="max")
    qat = QATConfig(epochs=3, lr=0.1, batch_size=64, seed=7)
    results, outputs = [], []
    for _ in range(2):
        qmodel = quantize_model(base, config)
        calibrate(qmodel, [x[:256]], config)
        before = nn.functional.cross_entropy(torch.from_numpy(_predict(qmodel, x)),
                                             torch.from_numpy(y)).item()
        rng_state = torch.get_rng_state()
        results.append(finetune(qmodel, _batches(x, y), qat))
        assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
        assert not qmodel.training
        after = nn.functional.cross_entropy(torch.from_numpy(_predict(qmodel, x)),
                                            torch.from_numpy(y)).item()
        assert after < before * 0.9
        outputs.append(_predict(qmodel, x))
    result = results[0]
    assert result["epochs"] == 3 and len(result["losses"]) == 3
    assert result["losses"][-1] < result["losses"][0]
    assert result["final_loss"] == result["losses"][-1]
    assert results[0]["losses"] == results[1]["losses"]
    assert np.array_equal(outputs[0], outputs[1])


def test_finetune_errors(calibrated, digits):
    with pytest.raises(ConfigError):
        QATConfig(optimizer="lamb")
    with pytest.raises(DataError, match="no batches"):
        finetune(calibrated["max"], lambda: iter(()), QATConfig())


def test_broken_range_collapses_accuracy(calibrated, fp32_model, digits, tmp_path):
    """The planted regression the harness's accuracy and parity checks must catch."""
    config = TorchQuantConfig(calibrator="max")
    good = calibrated["max"]
    path = tmp_path / "good.pt"
    save_quantized(good, path, config)
    broken = load_quantized(fp32_model, config, path)
    for q in _input_quantizers(broken).values():
        q.amax = 1e-3
    ref = _predict(fp32_model, digits["x_test"])
    good_out, broken_out = _predict(good, digits["x_test"]), _predict(broken, digits["x_test"])
    fp32_acc = _accuracy(ref, digits["y_test"])
    assert _accuracy(good_out, digits["y_test"]) > fp32_acc - 0.03
    assert _accuracy(broken_out, digits["y_test"]) < fp32_acc - 0.5
    assert _cosine(ref, broken_out) < 0.9
