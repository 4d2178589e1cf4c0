"""The frozen twin of a ModelOpt model (qatcheck.quantize.frozen_modelopt.freeze_model,
ModelOpt's TorchQuantizer.freeze) computes what the original computes, bit for bit, without reading
device values on the host - so the torch backend can time it in a CUDA graph.

Levels: each INT quantizer configuration against a ModelOpt ``TensorQuantizer`` on inputs at
rounding ties; the digits ModelOpt torch_ptq and qat models on the eval set (per-channel weights
included), with a planted amax change the twin must follow; the refusals; the forward's host
reads, recorded below the dispatcher; the torch backend's choice of what to time. Skipped without
nvidia-modelopt (pip install -e '.[modelopt]')."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qatcheck.quantize import modelopt_quant

pytestmark = pytest.mark.modelopt
_missing = modelopt_quant.missing_reason("tests/test_frozen_modelopt.py")
if _missing:
    pytest.skip(_missing, allow_module_level=True)

modelopt_quant._mtq()
from modelopt.torch.quantization.config import QuantizerAttributeConfig  # noqa: E402
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

from qatcheck.artifacts import ArtifactBuilder, RecipeState  # noqa: E402
from qatcheck.timing import TimedCall  # noqa: E402
from qatcheck.cache import ArtifactCache  # noqa: E402
from qatcheck.quantize.frozen_modelopt import (FreezeRefused, FrozenModelOptQuant,  # noqa: E402
                                               ModelOptPassthrough, freeze_model, needs_freeze)
from qatcheck.recipe import QATSettings  # noqa: E402
from qatcheck.zoo.recipes import digits_modelopt_recipe  # noqa: E402

#: test_modelopt.py's recipe: digits_modelopt, QAT over one short epoch (cheap, same code)
OVERRIDES = dict(modes=("fp32", "torch_ptq", "qat", "fp8"), dynamic_modes=(),
                 qat=QATSettings(epochs=1, lr=1e-4, batch_size=64, max_batches_per_epoch=12))


# ---- the host-read recorder ----------------------------------------------------------------------
class HostReads(TorchDispatchMode):
    """Counts the ATen calls of a forward that need a device value on the host: ``.item()`` /
    ``bool(tensor)`` (``_local_scalar_dense``, ``is_nonzero`` under inference mode), data-dependent
    shapes (``nonzero``, boolean-mask indexing), and tensors built from Python data (``lift_fresh``:
    ``torch.tensor(x, device=...)``, a host -> device copy on a GPU)."""

    OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "lift_fresh",
           "lift_fresh_copy"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            self.seen[name] += 1
        elif name in self.INDEXING and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.seen[f"{name}[bool mask]"] += 1
        return func(*args, **(kwargs or {}))


def host_reads(module, x: torch.Tensor) -> Counter:
    with torch.inference_mode(), HostReads() as rec:
        module(x)
    return rec.seen


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bits (NaNs and the sign of zero included)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(ints[a.dtype]),
                                                                     b.contiguous().view(ints[b.dtype]))


# ---- each configuration, against a TensorQuantizer -----------------------------------------------
def _quantizer(amax=2.5, **cfg) -> TensorQuantizer:
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=cfg.pop("num_bits", 8), **cfg))
    if amax is not None:
        q.amax = torch.tensor(amax, dtype=torch.float32)
    return q.eval()


def _inputs(amax: float = 2.5, channels: int = 6, nonneg: bool = False) -> torch.Tensor:
    """Random values plus values at (or an ulp from) the ties k + 0.5 of 8-bit and 4-bit grids,
    beyond the range too, and signed zeros; shape (channels, 4, 5, 5)."""
    g = torch.Generator().manual_seed(0)
    n = channels * 100
    ties = torch.cat([(torch.arange(-140, 140) + 0.5) * amax / 127, (torch.arange(-9, 9) + 0.5) * amax / 7])
    ties = torch.cat([ties, torch.nextafter(ties, torch.full_like(ties, 100.0))])
    x = torch.cat([ties, torch.randn(n - ties.numel(), generator=g) * amax])[:n]
    x = x[torch.randperm(n, generator=g)].reshape(channels, 4, 5, 5)
    x = x.abs() if nonneg else x
    x[:, 0, 0, :2] = torch.tensor([0.0, -0.0])  # 0 * inf is NaN: where a zero amax is masked, or not
    return x


CHANNEL_AMAX = [[[[a]]] for a in (0.5, 1.0, 2.5, 3.0, 0.1, 7.0)]
CASES = {
    "per_tensor": lambda: _quantizer(),
    "per_channel": lambda: _quantizer(axis=0, amax=CHANNEL_AMAX),
    "per_channel_axis1": lambda: _quantizer(axis=1, amax=[[[[0.5]], [[1.0]], [[2.0]], [[4.0]]]]),
    "unsigned": lambda: _quantizer(unsigned=True),
    "narrow_range": lambda: _quantizer(narrow_range=True),
    "4_bits": lambda: _quantizer(num_bits=4),
    "zero_amax": lambda: _quantizer(amax=0.0),
    "zero_amax_channel": lambda: _quantizer(axis=0, amax=[[[[0.0]]], [[[1e-9]]]] + CHANNEL_AMAX[2:]),
    # NaN makes amax.min() NaN: the original then masks nothing (the zero channel divides by inf)
    "nan_and_zero_amax": lambda: _quantizer(axis=0, amax=[[[[float("nan")]]], [[[0.0]]]] + CHANNEL_AMAX[2:]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_configuration_is_bit_identical(case):
    q = CASES[case]()
    x = _inputs(nonneg=case == "unsigned")
    twin = freeze_model(q)
    assert isinstance(twin, FrozenModelOptQuant)
    with torch.inference_mode():
        assert bits_equal(twin(x), q(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_are_quantized_and_divided_in_fp32(dtype):
    q = _quantizer(axis=0, amax=CHANNEL_AMAX)
    x = _inputs().to(dtype)
    with torch.inference_mode():
        out = freeze_model(q)(x)
        assert out.dtype == dtype and bits_equal(out, q(x))


def test_non_contiguous_inputs_are_made_contiguous_as_the_original():
    q = _quantizer(axis=1, amax=[[[[0.5]], [[1.0]], [[2.0]], [[4.0]]]])
    x = _inputs().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out, ref = freeze_model(q)(x), q(x)
    assert bits_equal(out, ref) and out.is_contiguous() and ref.is_contiguous()


def test_disabled_and_quant_off_are_identities():
    disabled, quant_off, calibrating = _quantizer(), _quantizer(), _quantizer()
    disabled.disable()
    quant_off.disable_quant()
    calibrating.enable_calib()  # statistics collection is dropped; the output is unchanged
    x = _inputs()
    assert isinstance(freeze_model(disabled), ModelOptPassthrough)
    assert isinstance(freeze_model(quant_off), ModelOptPassthrough)
    with torch.inference_mode():
        assert bits_equal(freeze_model(disabled)(x), disabled(x))
        assert bits_equal(freeze_model(calibrating)(x), calibrating(x))


def test_fp8_quantizers_are_kept_they_capture_as_they_are():
    fp8 = _quantizer(num_bits=(4, 3))
    model = nn.Sequential(fp8, _quantizer())
    twin = freeze_model(model)
    assert isinstance(twin[0], TensorQuantizer) and isinstance(twin[1], FrozenModelOptQuant)
    assert not needs_freeze(nn.Sequential(_quantizer(num_bits=(4, 3))))
    assert host_reads(fp8, _inputs()) == Counter()  # fp8_eager: no host read (it captures on a GPU)


def _with_pre_quant_scale():
    q = _quantizer()
    q.pre_quant_scale = torch.ones(5)
    return q


def _without_amax():
    return _quantizer(amax=None)


REFUSED = {
    "block quantization": lambda: _quantizer(block_sizes={-1: 16}),
    "dynamic quantization": lambda: _quantizer(type="dynamic"),
    "pre_quant_scale": _with_pre_quant_scale,
    "rotate": lambda: _quantizer(rotate=True),
    "real quantization": lambda: _quantizer(fake_quant=False),
    "no calibrated amax": _without_amax,
}


@pytest.mark.parametrize("why", sorted(REFUSED))
def test_refused_configurations_name_the_quantizer(why):
    model = nn.Sequential()
    model.add_module("head", nn.Sequential(_quantizer(), REFUSED[why]()))
    with pytest.raises(FreezeRefused, match=rf"ModelOpt quantizer 'head\.1' \(TensorQuantizer\): {why}"):
        freeze_model(model)
    assert needs_freeze(model)


# ---- the digits ModelOpt models --------------------------------------------------------------------
@pytest.fixture(scope="module")
def builder(tmp_path_factory, single_thread_module) -> ArtifactBuilder:
    return ArtifactBuilder(RecipeState(digits_modelopt_recipe(**OVERRIDES)),
                           ArtifactCache(tmp_path_factory.mktemp("frozen-modelopt-cache")))


@pytest.fixture(scope="module")
def batches(builder):
    return [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            for x, _ in builder.state.eval_data.batches(128, limit=4)]


@pytest.fixture(scope="module")
def ptq(builder):
    return builder.torch_artifact("torch_ptq").module


def _outputs(module, batches) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [module(x) for x in batches]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(bits_equal(x, y) for x, y in zip(a, b, strict=True))


def _frozen(twin) -> list[FrozenModelOptQuant]:
    return [m for m in twin.modules() if isinstance(m, FrozenModelOptQuant)]


@pytest.mark.parametrize("mode", ["torch_ptq", "qat"])
def test_digits_twin_is_bit_identical(builder, batches, ptq, mode):
    module = ptq if mode == "torch_ptq" else builder.torch_artifact(mode).module
    assert modelopt_quant.is_modelopt_model(module) and needs_freeze(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    twin = freeze_model(module)
    assert _same(_outputs(twin, batches), _outputs(module, batches)), mode
    # every quantizer replaced: 15 enabled (8 activation per-tensor, 7 weight per-channel)
    assert not modelopt_quant.is_modelopt_model(twin) and not needs_freeze(twin)
    frozen = _frozen(twin)
    per_channel = [f for f in frozen if f.mul.numel() > 1]
    assert len(frozen) == len(modelopt_quant.quantizer_names(module)) == 15 and len(per_channel) == 7
    assert isinstance(twin.fc.output_quantizer, ModelOptPassthrough)
    # the original is untouched: still ModelOpt, same state
    assert isinstance(module.fc.weight_quantizer, TensorQuantizer)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_a_planted_amax_change_changes_the_twin(batches, ptq):
    clean = _outputs(freeze_model(ptq), batches)
    for name in ("layer1.conv1.input_quantizer", "layer2.conv2.weight_quantizer"):  # per tensor, per channel
        planted = copy.deepcopy(ptq)
        q = planted.get_submodule(name)
        q.amax = q.amax * 2
        twin = _outputs(freeze_model(planted), batches)
        assert not _same(twin, clean), name
        assert _same(twin, _outputs(planted, batches)), name


def test_a_refused_quantizer_in_the_model_is_named(ptq):
    model = copy.deepcopy(ptq)
    model.layer1.conv1.input_quantizer.pre_quant_scale = torch.ones(16, 1, 1)
    with pytest.raises(FreezeRefused, match=r"'layer1\.conv1\.input_quantizer' \(TensorQuantizer\): pre_quant_scale"):
        freeze_model(model)


def test_the_twin_reads_nothing_on_the_host(batches, ptq):
    x = batches[0]
    original = host_reads(ptq, x)
    enabled = len(modelopt_quant.quantizer_names(ptq))
    # the recorder sees the original's reads (so the check can fail): per enabled quantizer,
    # _tensor_quant's three `if min_amax ...` tests and one torch.tensor(max_bound)
    assert original["is_nonzero"] + original["_local_scalar_dense"] >= 3 * enabled, original
    assert original["lift_fresh"] >= enabled, original
    assert host_reads(freeze_model(ptq), x) == Counter()


# ---- the torch backend's choice -------------------------------------------------------------------
def test_the_torch_backend_times_the_twin_and_a_refused_model_as_before(monkeypatch, builder, ptq, batches):
    """The CUDA branch of TorchRunner._timed on the CPU: cuda_timing.timed_call is replaced by a
    stand-in whose "capture" fails exactly when the forward reads on the host (what happens on a
    GPU), and .to("cuda") is a no-op."""
    from qatcheck.backends import cuda_timing
    from qatcheck.backends.torch_backend import TorchRunner

    def fake_timed_call(fn, cuda_graph="auto"):
        with torch.inference_mode(), HostReads() as rec:
            fn()
        call = TimedCall(lambda: None, clock="cuda-graph")
        if rec.seen:
            call.note = f"CUDA graph capture failed ({dict(rec.seen)}); timed with eager CUDA events"
        return call

    monkeypatch.setattr(cuda_timing, "timed_call", fake_timed_call)
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)
    refused = copy.deepcopy(ptq)
    refused.layer1.conv1.input_quantizer.pre_quant_scale = torch.ones(16, 1, 1)
    fp8 = builder.torch_artifact("fp8").module
    notes = {}
    for name, module in (("torch_ptq", ptq), ("refused", refused), ("fp8", fp8)):
        runner = TorchRunner(module, "int8", "cpu")
        runner._device = "cuda"
        notes[name] = runner._timed(runner.module, batches[0], False).note
    assert notes["torch_ptq"] == "fake-quant timed through its frozen twin (identical outputs, capture-safe)"
    assert notes["refused"].startswith("CUDA graph capture failed")
    assert "(no frozen twin: ModelOpt quantizer 'layer1.conv1.input_quantizer'" in notes["refused"]
    assert notes["fp8"] == ""  # not frozen: its quantizers capture as they are


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_twin_is_captured_in_a_cuda_graph(ptq, batches):
    from qatcheck.backends.cuda_timing import capture_graph
    from qatcheck.backends.torch_backend import strict_fp32

    twin = freeze_model(ptq).cuda().eval()
    original = copy.deepcopy(ptq).cuda().eval()
    static = batches[0].cuda()
    with strict_fp32(True):
        graph, out = capture_graph(lambda: twin(static))
        for x in batches[1:]:
            static.copy_(x.cuda())
            graph.replay()
            torch.cuda.synchronize()
            with torch.inference_mode():
                assert bits_equal(out, original(x.cuda()))
