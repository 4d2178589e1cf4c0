"""The TensorRT adapter. Tests that need TensorRT and a GPU skip here with the reason; the
availability and interface tests run everywhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qatcheck.backends.base import BuildContext
from qatcheck.backends.tensorrt_backend import TensorRTBackend
from qatcheck.errors import ConfigError

NO_TRT = "TensorRT is not installed here (its PyPI package is a stub); these tests run on a GPU machine with TensorRT"


def test_unavailable_reason_names_the_cause():
    reason = TensorRTBackend().unavailable_reason()
    try:
        import tensorrt  # noqa: F401
    except Exception:
        assert reason and reason.startswith("TensorRT is not installed here")
        return
    if not torch.cuda.is_available():
        assert "no CUDA device" in reason
    else:
        assert reason is None


def test_runner_without_context_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a BuildContext"):
        TensorRTBackend().runner(None)


# ---- with TensorRT ------------------------------------------------------------------------------
def _need_trt():
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but torch sees no CUDA device")
    return trt


def _context(tmp_path: Path, mode: str) -> tuple[BuildContext, object]:
    """The build context the session gives every backend (see QatcheckSession.context)."""
    from qatcheck.artifacts import ArtifactBuilder, RecipeState
    from qatcheck.cache import ArtifactCache
    from qatcheck.zoo.recipes import digits_recipe

    recipe = digits_recipe()
    b = ArtifactBuilder(RecipeState(recipe), ArtifactCache(tmp_path / "cache"))
    dynamic = mode == "dynamic"
    ctx = BuildContext(recipe=recipe, mode=mode, dynamic=dynamic, torch_artifact=b.torch_artifact,
                       onnx_artifact=lambda m: b.onnx_artifact(m, dynamic), cache_dir=tmp_path / "cache",
                       calib_batches=b.calib_batches, calib_id=b.calib_id())
    return ctx, b


def _backend(ptq_form: str = "auto") -> TensorRTBackend:
    from qatcheck.options import Options

    return TensorRTBackend(Options(trt_ptq=ptq_form))


@pytest.mark.tensorrt
@pytest.mark.parametrize("mode", ["fp32", "fp16", "torch_ptq", "trt_ptq", "partial", "dynamic"])
def test_engine_builds_runs_and_matches_onnxruntime(tmp_path, mode):
    _need_trt()
    from qatcheck.backends.onnxruntime_backend import OrtRunner

    ctx, b = _context(tmp_path, mode)
    backend = _backend()
    runner = backend.runner(ctx)
    x, _ = next(iter(b.state.eval_data.batches(32)))
    ref = OrtRunner(b.onnx_artifact("fp32").path, "CPUExecutionProvider").infer(x)[0]
    out = runner.infer(x)[0]
    cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert out.shape == ref.shape and cos > (0.9999 if mode in ("fp32", "dynamic") else 0.98)
    if mode == "dynamic":
        for n in (1, 128):
            xs = np.resize(x, (n, *x.shape[1:])).astype(np.float32)
            assert runner.infer(xs)[0].shape[0] == n
    # the engine cache: a second runner reuses the file
    backend.runner(ctx)
    assert backend.built and backend.reused == backend.built[:1]
    stats = runner.audit.summary()
    assert stats["layers"] > 0
    if runner.plan.precision == "int8":
        runner.audit.assert_all("conv", "int8", except_layers=ctx.recipe.quant.keep_precision
                                if mode == "partial" else ())


@pytest.mark.tensorrt
def test_partial_keeps_the_pinned_layers_out_of_int8(tmp_path):
    _need_trt()
    ctx, b = _context(tmp_path, "partial")
    runner = _backend().runner(ctx)
    convs = runner.audit.of_kind("conv")
    stem = [c for c in convs if any("stem" in n for n in (c.name, *c.onnx_nodes))]
    assert stem and all(c.precision != "int8" for c in stem)


@pytest.mark.tensorrt
def test_timed_call_gives_device_times(tmp_path):
    _need_trt()
    from qatcheck import timing

    ctx, b = _context(tmp_path, "fp16")
    runner = _backend().runner(ctx)
    x, _ = next(iter(b.state.eval_data.batches(32)))
    call = runner.timed_call(x)
    stats = timing.measure(call, 32, 50, 0.05)
    assert stats.clock == "cuda-events" and stats.median_ms > 0 and stats.iterations == 50


@pytest.mark.tensorrt
def test_native_calibration_on_11_is_refused(tmp_path):
    trt = _need_trt()
    if int(trt.__version__.split(".")[0]) < 11:
        pytest.skip(f"TensorRT {trt.__version__} still has its calibrators")
    ctx, b = _context(tmp_path, "trt_ptq")
    with pytest.raises(ConfigError, match="no longer has"):
        _backend("native").runner(ctx)
