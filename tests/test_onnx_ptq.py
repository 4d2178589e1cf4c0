"""Tests of ONNX-level PTQ (``trt_ptq`` / ``partial``): placement, calibration, exclusion, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qatcheck.quantize.onnx_ptq import (OnnxPTQConfig, _AbsStats, module_name_of, quantize_onnx,
                                     resolve_layers, scale_qdq)
from qatcheck.errors import ArtifactError, ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")

SHARED = "/stem/stem.1/Relu_output_0"  # the stem output both branches read


class SmallCNN(nn.Module):
    """stem -> two convs reading the same tensor -> add -> deconv -> fc.

    No global pooling: with random weights and data a pooled network's logits are nearly the
    biases, whatever the input, and a parity check on them could not tell a broken model apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.branch_a = nn.Conv2d(8, 8, 3, padding=1)
        self.branch_b = nn.Conv2d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.branch_a(y)) + self.branch_b(y)
        y = torch.relu(self.up(y))
        return self.fc(torch.flatten(y, 1))


def _export(module: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), torch.randn(*shape), str(path), opset_version=17,
                      dynamo=False, input_names=["input"], output_names=["logits"])
    return path


def _batches(n: int = 8, shape=(2, 3, 8, 8), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _dq_fed_inputs(model: onnx.ModelProto, node_name: str) -> list[int]:
    """Indices of the node's inputs that come from a DequantizeLinear."""
    prod = _producers(model)
    node = next(n for n in model.graph.node if n.name == node_name)
    return [i for i, t in enumerate(node.input) if t in prod and prod[t].op_type == "DequantizeLinear"]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _export(SmallCNN(), (2, 3, 8, 8), tmp_path_factory.mktemp("cnn") / "cnn.onnx")


@pytest.fixture(scope="module")
def quantized(cnn, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "cnn_q.onnx"
    result = quantize_onnx(cnn, out, _batches(), OnnxPTQConfig(calibrator="entropy", num_bins=512))
    return out, result


def test_placement_and_shared_pair(quantized):
    out, result = quantized
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert result.quantized_nodes == ["/stem/stem.0/Conv", "/branch_a/Conv", "/branch_b/Conv",
                                      "/up/ConvTranspose", "/fc/Gemm"]
    ops = [n.op_type for n in model.graph.node]
    # 5 weights + 4 distinct activations (input, shared stem output, add output, flatten output)
    assert result.qdq_pairs == 9
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 9
    assert set(result.activation_amax) == {"input", SHARED, "/Add_output_0", "/Flatten_output_0"}
    for name in result.quantized_nodes:
        assert _dq_fed_inputs(model, name) == [0, 1], name  # activation and weight, bias float
    # the tensor read by both branches is quantized once and both read the same DQ output
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == SHARED]
    assert len(quantizers) == 1
    branch_inputs = {n.input[0] for n in model.graph.node if n.name in ("/branch_a/Conv", "/branch_b/Conv")}
    assert len(branch_inputs) == 1
    # activation pairs are symmetric int8 with the calibrated scale
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    q = quantizers[0]
    assert inits[q.input[2]].dtype == np.int8 and inits[q.input[2]] == 0
    assert inits[q.input[1]] == pytest.approx(result.activation_amax[SHARED] / 127, rel=1e-6)


def test_per_channel_weight_scales(quantized):
    out, _ = quantized
    model = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_q = {n.input[0]: n for n in model.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    axes = {name: next(a.i for a in n.attribute if a.name == "axis") for name, n in weight_q.items()}
    assert axes == {"stem.0.weight": 0, "branch_a.weight": 0, "branch_b.weight": 0,
                    "up.weight": 1, "fc.weight": 0}  # deconv: [C_in, C_out, k, k]; Gemm transB=1
    assert inits[weight_q["stem.0.weight"].input[1]].shape == (8,)
    assert inits[weight_q["up.weight"].input[1]].shape == (4,)
    w = inits["fc.weight"]
    np.testing.assert_allclose(inits[weight_q["fc.weight"].input[1]], np.abs(w).max(axis=1) / 127, rtol=1e-6)


def test_per_tensor_weights_and_matmul(tmp_path):
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 5, bias=False)

        def forward(self, x):
            return self.proj(x)

    src = _export(Proj(), (2, 4, 6), tmp_path / "proj.onnx")
    batches = [np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)]
    out = tmp_path / "q.onnx"
    for per_channel, scale_shape in ((True, (5,)), (False, ())):
        result = quantize_onnx(src, out, batches, OnnxPTQConfig("minmax", per_channel=per_channel))
        model = onnx.load(str(out))
        assert [n for n in model.graph.node if n.name in result.quantized_nodes][0].op_type == "MatMul"
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        wq = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits)
        assert inits[wq.input[1]].shape == scale_shape  # MatMul B is [K, N]: channels on axis 1
    np.testing.assert_allclose(result.activation_amax["input"], np.abs(batches[0]).max())


def test_outputs_close_to_fp32(cnn, quantized):
    out, _ = quantized
    x = _batches(1, seed=7)[0]
    assert _cosine(_run(out, x), _run(cnn, x)) > 0.99


def test_planted_scale_regression_is_visible(cnn, quantized, tmp_path):
    out, _ = quantized
    broken = tmp_path / "broken.onnx"
    changed = scale_qdq(out, broken, SHARED, 100.0)
    assert len(changed) == 1  # Q and DQ share one scale initializer
    x, other = _batches(2, seed=7)
    assert _cosine(_run(cnn, other), _run(cnn, x)) < 0.9  # the cosine does depend on the input
    assert _cosine(_run(out, x), _run(cnn, x)) > 0.99
    assert _cosine(_run(broken, x), _run(cnn, x)) < 0.9
    with pytest.raises(ConfigError, match="no_such_tensor"):
        scale_qdq(out, broken, "no_such_tensor", 2.0)


def _identity_conv_model(tmp_path: Path) -> Path:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return _export(conv, (4, 1, 32, 32), tmp_path / "conv.onnx")


def test_entropy_clips_heavy_tails_and_percentile(tmp_path):
    src = _identity_conv_model(tmp_path)
    rng = np.random.default_rng(0)
    batches = [rng.standard_t(df=2, size=(4, 1, 32, 32)).astype(np.float32) for _ in range(8)]
    absx = np.abs(np.concatenate(batches)).ravel()
    amax = {c: quantize_onnx(src, tmp_path / f"{c}.onnx", batches,
                             OnnxPTQConfig(calibrator=c, num_bins=512, percentile=99.0)
                             ).activation_amax["input"]
            for c in ("minmax", "entropy", "percentile")}
    assert amax["minmax"] == pytest.approx(absx.max())
    assert amax["entropy"] < 0.5 * amax["minmax"]
    # histogram resolution after range doubling is at most 2 * max / num_bins
    assert amax["percentile"] == pytest.approx(np.percentile(absx, 99.0), abs=2 * float(absx.max()) / 512)


def test_histogram_amax_never_exceeds_observed_max(tmp_path):
    """Later, larger batches double the histogram range past the data; amax must not follow."""
    src = _identity_conv_model(tmp_path)
    rng = np.random.default_rng(5)
    batches = [scale * rng.standard_normal((4, 1, 32, 32)).astype(np.float32) for scale in (1, 3)]
    observed = max(float(np.abs(b).max()) for b in batches)
    for calibrator, pct in (("entropy", 99.99), ("percentile", 100.0)):
        result = quantize_onnx(src, tmp_path / "q.onnx", batches,
                               OnnxPTQConfig(calibrator=calibrator, num_bins=256, percentile=pct))
        assert 0 < result.activation_amax["input"] <= observed
    # percentile 100 lands in the last bin, whose width is at most 2 * max / num_bins
    assert result.activation_amax["input"] == pytest.approx(observed, abs=2 * observed / 256)


def test_streaming_histogram_grows_exactly():
    """Range doubling keeps the bin count fixed and loses no counts."""
    rng = np.random.default_rng(3)
    stats = _AbsStats(num_bins=256, histogram=True)
    parts = [rng.standard_normal(5000), 7 * rng.standard_normal(5000), np.zeros(10)]
    for part in parts:
        stats.add(part)
    assert stats.counts.shape == (256,) and stats.counts.sum() == 10010
    assert stats.range >= stats.amax == pytest.approx(np.abs(np.concatenate(parts)).max())
    expected, _ = np.histogram(np.abs(np.concatenate(parts)), bins=256, range=(0, stats.range))
    # merged bins equal a direct histogram up to values sitting exactly on an edge
    assert np.abs(stats.counts - expected).sum() <= 2


def test_entropy_matches_pytorch_quantization_calibrator():
    from pytorch_quantization.calib import HistogramCalibrator

    from qatcheck.quantize.onnx_ptq import _compute_amax

    x = np.abs(np.random.default_rng(4).standard_t(df=3, size=20000)).astype(np.float32)
    reference = HistogramCalibrator(num_bits=8, axis=None, unsigned=False, num_bins=512)
    reference.collect(torch.from_numpy(x))
    stats = _AbsStats(num_bins=512, histogram=True)
    stats.add(x)
    ours = _compute_amax(stats, OnnxPTQConfig(calibrator="entropy", num_bins=512))
    assert ours == pytest.approx(float(reference.compute_amax("entropy")), rel=0.02)


@pytest.mark.parametrize("entry, excluded", [
    ("branch_a", ["/branch_a/Conv"]),            # PyTorch module name
    ("stem.0", ["/stem/stem.0/Conv"]),           # module inside a Sequential
    ("/fc/Gemm", ["/fc/Gemm"]),                  # ONNX node name
])
def test_exclusion(cnn, tmp_path, entry, excluded):
    out = tmp_path / "partial.onnx"
    result = quantize_onnx(cnn, out, _batches(2), OnnxPTQConfig("minmax", exclude=(entry,)))
    model = onnx.load(str(out))
    assert result.excluded_nodes == excluded
    assert excluded[0] not in result.quantized_nodes and len(result.quantized_nodes) == 4
    assert _dq_fed_inputs(model, excluded[0]) == []
    x = _batches(1, seed=9)[0]
    assert _cosine(_run(out, x), _run(cnn, x)) > 0.99


def test_resolve_layers_and_module_names(cnn):
    model = onnx.load(str(cnn))
    assert module_name_of("/layer1/layer1.0/inner/inner.0/inner.0.0/Conv") == "layer1.0.inner.0.0"
    assert module_name_of("/stem/0/Conv") == "stem.0"
    assert module_name_of("/Relu") == ""
    assert resolve_layers(model, ["stem", "fc"]) == {"stem": ["/stem/stem.0/Conv"], "fc": ["/fc/Gemm"]}
    with pytest.raises(ConfigError) as err:
        resolve_layers(model, ["branch_c", "fc", "stem.1"])  # stem.1 is a ReLU: not quantizable
    message = str(err.value)
    assert "'branch_c'" in message and "'stem.1'" in message and "'fc'" not in message.split("available")[0]
    assert "/branch_a/Conv" in message  # shows what is available


def test_unknown_exclude_is_config_error(cnn, tmp_path):
    with pytest.raises(ConfigError, match="layer9.conv"):
        quantize_onnx(cnn, tmp_path / "x.onnx", _batches(1), OnnxPTQConfig(exclude=("layer9.conv",)))
    assert not (tmp_path / "x.onnx").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="kl"):
        OnnxPTQConfig(calibrator="kl")
    with pytest.raises(ConfigError, match="num_bins"):
        OnnxPTQConfig(num_bins=64)
    assert OnnxPTQConfig(exclude="fc").exclude == ("fc",)


def test_corrupt_onnx_is_artifact_error(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not an onnx model")
    with pytest.raises(ArtifactError, match="corrupt.onnx"):
        quantize_onnx(bad, tmp_path / "out.onnx", _batches(1), OnnxPTQConfig())
    with pytest.raises(ArtifactError, match="missing.onnx"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx", _batches(1), OnnxPTQConfig())


def test_calibration_data_errors(cnn, tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(DataError, match="no calibration batches"):
        quantize_onnx(cnn, out, iter(()), OnnxPTQConfig())
    with pytest.raises(DataError, match=r"\(2, 3, 9, 9\).*'input'.*\(2, 3, 8, 8\)"):
        quantize_onnx(cnn, out, _batches(1, shape=(2, 3, 9, 9)), OnnxPTQConfig())
    with pytest.raises(ConfigError, match="images"):
        quantize_onnx(cnn, out, _batches(1), OnnxPTQConfig(), input_name="images")
    assert not out.exists()


def test_low_opset_is_upgraded(tmp_path):
    src = tmp_path / "old.onnx"
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(2, 3, 8, 8), str(src),
                      opset_version=11, dynamo=False, input_names=["input"])
    out = tmp_path / "q.onnx"
    result = quantize_onnx(src, out, _batches(1, shape=(2, 3, 8, 8)), OnnxPTQConfig("minmax"))
    model = onnx.load(str(out))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert result.qdq_pairs == 2
    _run(out, _batches(1, shape=(2, 3, 8, 8))[0])
