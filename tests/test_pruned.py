"""Pruned models: zeroed channels through every int8 path, and the pruned detector variants.

A mask-pruned checkpoint has whole output channels at zero, so per-channel calibration gives
amax 0 and, unguarded, a Q/DQ scale of 0. ONNX Runtime still runs such a graph (0/0 saturates and
is multiplied back by 0), so finite outputs alone prove little: TensorRT's ONNX parser refuses any
scale that is not positive ("Scale coefficients must all be positive", NVIDIA/TensorRT#1826,
#2498), and a float32 subnormal scale is flushed to zero on the GPU. So every test here also
asserts that each Q/DQ scale in the graph is a positive, normal float32.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from pytorch_quantization import calib
from torch import nn

from qatcheck.quantize.onnx_ptq import OnnxPTQConfig, quantize_onnx
from qatcheck.quantize.qat import QATConfig, finetune
from qatcheck.quantize.torch_quant import (TorchQuantConfig, _quiet_quantization_logs, calibrate,
                                           export_qdq_onnx, quantize_model)
from qatcheck.zoo import pruning
from qatcheck.zoo.digit_detector import OUTPUT_NAMES, load_digit_detector

TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32


@pytest.fixture(scope="module", autouse=True)
def _single_thread(single_thread_module):
    """Tiny models: intra-op threads only add overhead (see tests/conftest.py)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _export(model: nn.Module, x: torch.Tensor, path: Path, outputs: tuple[str, ...]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=list(outputs),
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return path


def _qdq_scales(path: Path) -> dict[str, np.ndarray]:
    """Every QuantizeLinear / DequantizeLinear scale, from initializers or Constant nodes (the
    pytorch-quantization export writes Constants), by node name."""
    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    scales = {n.name: consts[n.input[1]] for n in model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert scales, f"{path} has no Q/DQ"
    return scales


def _assert_scales_valid(path: Path) -> None:
    bad = {name: s[~(np.isfinite(s) & (s >= TINY))].tolist()
           for name, s in _qdq_scales(path).items() if not (np.isfinite(s) & (s >= TINY)).all()}
    assert not bad, f"{path.name}: Q/DQ scales that are not positive normal float32: {bad}"


def _ort(path: Path, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------------------------
# a tiny conv model with fully zeroed output channels
# --------------------------------------------------------------------------------------------

A_ZERO = [1, 5]         # conv a: weight and bias zeroed
B_ZERO = [0, 3]         # conv b + BN: weight, BN weight and bias zeroed
C_BIAS = 0.25           # conv c: every weight zero (a fully pruned layer), bias kept


class ZeroChannelNet(nn.Module):
    """conv (bias) -> ReLU -> conv + BN -> ReLU -> 1x1 conv whose weights are all zero; outputs
    ``a`` (conv a: its zeroed channels must stay exactly 0) and ``c`` (exactly its bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a(x)
        return a, self.c(torch.relu(self.bn(self.b(torch.relu(a)))))


def _zero_channel_net(near_zero: float = 0.0) -> nn.Module:
    """``near_zero`` > 0 fills conv a's channel 5 with that value instead of 0: a channel a soft
    pruner (L1 decay) drove to subnormal magnitudes, whose amax / 127 underflows in float32."""
    torch.manual_seed(0)
    model = ZeroChannelNet().eval()
    pruning.zero_channels(model, "a", None, A_ZERO)
    pruning.zero_channels(model, "b", "bn", B_ZERO)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)   # BN folding must still give weight 0, bias 0
        model.bn.running_var.uniform_(0.5, 2)
        model.c.weight.zero_()
        model.c.bias.fill_(C_BIAS)
        if near_zero:
            model.a.weight[5] = near_zero
    return model


def _calib(n: int = 4) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32) for i in range(n)]


X = np.random.default_rng(99).standard_normal((4, 3, 8, 8)).astype(np.float32)


def _assert_zero_channels(a: np.ndarray, c: np.ndarray, where: str) -> None:
    assert np.isfinite(a).all() and np.isfinite(c).all(), f"{where}: NaN/inf in the outputs"
    assert np.array_equal(a[:, A_ZERO], np.zeros_like(a[:, A_ZERO])), \
        f"{where}: zeroed channels of conv a are not exactly 0: max {np.abs(a[:, A_ZERO]).max()}"
    np.testing.assert_allclose(c, C_BIAS, rtol=0, atol=1e-7, err_msg=f"{where}: zeroed layer != its bias")
    live = [i for i in range(a.shape[1]) if i not in A_ZERO]
    assert np.abs(a[:, live]).max() > 0.1, f"{where}: the live channels died too"


@pytest.mark.parametrize("calibrator", ["minmax", "entropy", "percentile"])
def test_zero_channels_trt_ptq(tmp_path, calibrator):
    """ONNX PTQ (trt_ptq): exactly-zero channels, a zero-weight layer and a BN-zeroed channel (weight 0
    and bias 0 after BN folding) get positive scales and exact zeros in ONNX Runtime."""
    model = _zero_channel_net()
    fp32 = _export(model, torch.from_numpy(X), tmp_path / "fp32.onnx", ("a", "c"))
    out = tmp_path / "ptq.onnx"
    quantize_onnx(fp32, out, _calib(), OnnxPTQConfig(calibrator=calibrator, num_bins=256))
    _assert_scales_valid(out)
    a, c = _ort(out, X)
    _assert_zero_channels(a, c, f"trt_ptq {calibrator}")
    with torch.no_grad():
        ref = model(torch.from_numpy(X))[0].numpy()
    assert _cosine(a, ref) > 0.99


def test_near_zero_channel_gets_a_positive_scale_trt_ptq(tmp_path):
    """A channel whose weights are 1e-44 (amax > 0, but amax / 127 underflows to 0 in float32).
    Before the fix this wrote a scale of exactly 0 for it (only exact zeros were replaced):
    ``a.weight_quantized`` scale [..., 0.0, ...]; ONNX Runtime still ran it, TensorRT would not."""
    model = _zero_channel_net(near_zero=1e-44)
    fp32 = _export(model, torch.from_numpy(X), tmp_path / "fp32.onnx", ("a", "c"))
    out = tmp_path / "ptq.onnx"
    quantize_onnx(fp32, out, _calib(), OnnxPTQConfig(calibrator="minmax"))
    _assert_scales_valid(out)
    a, c = _ort(out, X)
    _assert_zero_channels(a, c, "trt_ptq, near-zero channel")


@pytest.mark.parametrize("calibrator", ["max", "percentile", "mse"])
def test_zero_channels_torch_ptq_and_qat(tmp_path, calibrator):
    """pytorch-quantization (torch_ptq): amax 0 per channel is floored when calibrating, so the fake-quant
    model, its Q/DQ export in ONNX Runtime and a short QAT all keep exact zeros and finite outputs."""
    model = _zero_channel_net()
    config = TorchQuantConfig(calibrator=calibrator, num_bins=256)
    qmodel = quantize_model(model, config)
    calibrate(qmodel, _calib(), config)
    amax = qmodel.a._weight_quantizer.amax.flatten()
    assert (amax > 0).all() and torch.isfinite(amax).all()
    with torch.no_grad():
        ta, tc = (t.numpy() for t in qmodel(torch.from_numpy(X)))
    _assert_zero_channels(ta, tc, f"torch_ptq {calibrator} (PyTorch fake-quant)")
    out = tmp_path / "torch_ptq.onnx"
    export_qdq_onnx(qmodel, torch.from_numpy(X), out, "input", ("a", "c"))
    _assert_scales_valid(out)
    a, c = _ort(out, X)
    _assert_zero_channels(a, c, f"torch_ptq {calibrator} (ONNX Runtime)")
    if calibrator != "max":
        return
    # QAT: the straight-through gradient reaches the zero weights, but their amax (the floor)
    # holds them at <= 2**-23 after quantization; the outputs stay finite and the channels ~0
    batches = [(b, np.zeros(len(b), np.int64)) for b in _calib()]
    finetune(qmodel, lambda: iter(batches), QATConfig(epochs=1, lr=1e-2),
             loss_fn=lambda outs, _: outs[0].pow(2).mean() + (outs[1] - 1).pow(2).mean())
    out = tmp_path / "qat.onnx"
    export_qdq_onnx(qmodel, torch.from_numpy(X), out, "input", ("a", "c"))
    _assert_scales_valid(out)
    a, c = _ort(out, X)
    assert np.isfinite(a).all() and np.isfinite(c).all()
    assert np.abs(a[:, A_ZERO]).max() < 1e-4


def test_pytorch_quantization_zero_amax_exports_positive_scales(tmp_path):
    """A model calibrated with pytorch-quantization's own API (``load_calib_amax``, as its examples
    do) keeps amax 0 for dead channels. Before the fix ``export_qdq_onnx`` wrote those as Q/DQ
    scales of 0 (``/a/_weight_quantizer/QuantizeLinear`` scale [..., 0.0, ...]: the
    NVIDIA/TensorRT#1826 failure); now they are exported at the floor, and the model's own amax
    is left as it was."""
    model = _zero_channel_net()
    qmodel = quantize_model(model, TorchQuantConfig(calibrator="max"))
    quantizers = [m for m in qmodel.modules() if m.__class__.__name__ == "TensorQuantizer"]
    with _quiet_quantization_logs():
        for q in quantizers:
            q.disable_quant()
            q.enable_calib()
        with torch.no_grad():
            for b in _calib():
                qmodel(torch.from_numpy(b))
        for q in quantizers:
            assert isinstance(q._calibrator, calib.MaxCalibrator)
            q.load_calib_amax()
            q.disable_calib()
            q.enable_quant()
    before = {id(q): q.amax.clone() for q in quantizers}
    assert (qmodel.a._weight_quantizer.amax.flatten()[A_ZERO] == 0).all()
    with torch.no_grad():
        ta, tc = (t.numpy() for t in qmodel(torch.from_numpy(X)))
    _assert_zero_channels(ta, tc, "pytorch-quantization amax 0 (PyTorch)")
    out = tmp_path / "pq.onnx"
    export_qdq_onnx(qmodel, torch.from_numpy(X), out, "input", ("a", "c"))
    assert all(torch.equal(before[id(q)], q.amax) for q in quantizers), "export changed the model's amax"
    _assert_scales_valid(out)
    a, c = _ort(out, X)
    _assert_zero_channels(a, c, "pytorch-quantization amax 0 (ONNX Runtime)")


# --------------------------------------------------------------------------------------------
# the pruned detector
# --------------------------------------------------------------------------------------------

ODD_PRUNED = {"stem.conv": 7, "expand.conv": 13, "block1.conv1.conv": 27, "down2.a.conv": 51,
              "down2.b.conv": 45, "fuse.conv": 27, "heatmap.conv.conv": 19, "size.conv.conv": 13,
              "offset.conv.conv": 13}


def _detector_batches(n: int = 2, batch: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, 1, 64, 64)).astype(np.float32) for _ in range(n)]


def test_structural_pruning_odd_channels_export_and_trt_ptq(tmp_path):
    """Structural pruning of the shipped detector: odd channel counts, the BN and readers cut to
    match (a Concat reader included), forward, ONNX export and a trt_ptq Q/DQ graph in ONNX Runtime
    with per-channel scales of the odd lengths."""
    base = load_digit_detector()
    model = pruning.prune_structural(copy.deepcopy(base))
    counts = pruning.channel_counts(model)
    assert {k: counts[k] for k in ODD_PRUNED} == ODD_PRUNED
    assert all(v % 2 for v in ODD_PRUNED.values())
    assert model.fuse.conv.in_channels == 32 + 45 and model.heatmap.out.in_channels == 19
    assert model.down2.b.bn.num_features == 45 and model.down2.b.bn.running_var.shape == (45,)
    x = _detector_batches(1)[0]
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(x))]
    assert [r.shape for r in ref] == [(4, 10, 16, 16), (4, 2, 16, 16), (4, 2, 16, 16)]
    fp32 = _export(model, torch.from_numpy(x), tmp_path / "pruned.onnx", OUTPUT_NAMES)
    np.testing.assert_allclose(_ort(fp32, x)[0], ref[0], atol=1e-4)
    out = tmp_path / "pruned_ptq.onnx"
    quantize_onnx(fp32, out, _detector_batches(), OnnxPTQConfig(calibrator="minmax"))
    _assert_scales_valid(out)
    lengths = {s.size for s in _qdq_scales(out).values()}
    assert {7, 13, 27, 51, 45, 19} <= lengths
    for got, want in zip(_ort(out, x), ref):
        assert np.isfinite(got).all() and _cosine(got, want) > 0.98


def test_mask_pruning_is_the_structural_function():
    """The mask variant zeros exactly the channels the structural variant removes (the channels
    torch.nn.utils.prune.ln_structured would mask too), shapes unchanged, same outputs."""
    base = load_digit_detector()
    kept = pruning.select_channels(base)
    assert kept == pruning.select_channels(base), "channel selection is not deterministic"
    structural = pruning.remove_channels(copy.deepcopy(base), kept)
    masked = pruning.mask_channels(copy.deepcopy(base), kept)
    assert pruning.channel_counts(masked) == pruning.channel_counts(base)
    for group, channels in kept.items():
        conv_name = pruning.detector_groups(base)[group].conv
        conv = copy.deepcopy(base.get_submodule(conv_name))
        amount = conv.out_channels - len(channels)
        nn.utils.prune.ln_structured(conv, "weight", amount=amount, n=1, dim=0)
        ln_kept = torch.nonzero(conv.weight_mask.flatten(1).sum(1)).flatten().tolist()
        assert ln_kept == channels, f"{group}: ln_structured keeps {ln_kept}, L1 ranking {channels}"
        w = masked.get_submodule(conv_name).weight.flatten(1)
        dead = [i for i in range(w.shape[0]) if i not in channels]
        assert (w[dead] == 0).all() and (w[channels].abs().sum(1) > 0).all()
    assert not any(n.endswith(("_orig", "_mask")) for n in masked.state_dict()), "prune masks left behind"
    x = torch.from_numpy(_detector_batches(1)[0])
    with torch.no_grad():
        for s, m in zip(structural(x), masked(x)):
            torch.testing.assert_close(s, m, rtol=0, atol=1e-4)


def test_shipped_pruned_checkpoint_variants_agree_in_int8(tmp_path):
    """The shipped pruned checkpoint: its kept channels are the L1 ranking of the shipped detector
    (reproducible), both variants load, compute the same function in fp32, and with minmax
    calibration (the zero channels change no tensor's max) their trt_ptq graphs agree in ONNX
    Runtime, the mask graph with positive scales for every dead channel."""
    ckpt = torch.load(pruning.PRUNED_CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["kept"] == pruning.select_channels(load_digit_detector(), ckpt["meta"]["plan"])
    structural = pruning.load_pruned_detector("structural")
    masked = pruning.load_pruned_detector("mask")
    assert {k: v for k, v in pruning.channel_counts(structural).items() if k in ODD_PRUNED} == ODD_PRUNED
    x = _detector_batches(1)[0]
    outs = {}
    for kind, model in (("structural", structural), ("mask", masked)):
        fp32 = _export(model, torch.from_numpy(x), tmp_path / f"{kind}.onnx", OUTPUT_NAMES)
        out = tmp_path / f"{kind}_ptq.onnx"
        quantize_onnx(fp32, out, _detector_batches(), OnnxPTQConfig(calibrator="minmax"))
        _assert_scales_valid(out)
        outs[kind] = _ort(out, x)
    for s, m in zip(outs["structural"], outs["mask"]):
        assert np.isfinite(m).all()
        assert _cosine(s, m) > 0.9999
    with pytest.raises(ValueError, match="kind"):
        pruning.load_pruned_detector("sparse")


def test_pruned_recipes_reuse_the_detection_recipe():
    from qatcheck.errors import ConfigError
    from qatcheck.zoo.recipes import detection_pruned_recipe, detection_recipe

    base = detection_recipe()
    for kind in pruning.KINDS:
        recipe = detection_pruned_recipe(kind)
        assert recipe.name == f"digitdet_pruned_{kind}"
        assert recipe.modes == base.modes and recipe.decoder == base.decoder and recipe.loss is base.loss
        assert recipe.quant == base.quant and recipe.input == base.input
        assert kind in recipe.weights_id
    with pytest.raises(ConfigError, match="sparse"):
        detection_pruned_recipe("sparse")
