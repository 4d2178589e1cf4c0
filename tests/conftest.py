"""Import the heavy stack once, up front: pytester's in-process runs restore ``sys.modules``
afterwards, and C extensions (numpy.fft, torch, onnxruntime) cannot be imported twice."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import numpy.fft  # noqa: E402,F401
import onnxruntime  # noqa: E402,F401
import onnxruntime.transformers.float16  # noqa: E402,F401
import rich.console  # noqa: E402,F401
import sklearn.datasets  # noqa: E402,F401
import sklearn.model_selection  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402

import qatcheck.artifacts  # noqa: E402,F401
import qatcheck.quantize.onnx_ptq  # noqa: E402,F401
import qatcheck.quantize.qat  # noqa: E402,F401
import qatcheck.quantize.torch_quant  # noqa: E402,F401
import qatcheck.report  # noqa: E402,F401
import qatcheck.zoo.recipes  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _outside_ci(monkeypatch):
    """Inner pytester runs print the same here and in CI: pytest does not truncate its short test
    summary when ``CI`` or ``BUILD_NUMBER`` is set, so a failure message would appear twice there."""
    for name in ("CI", "BUILD_NUMBER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def single_thread_module():
    """One intra-op thread for a module of tiny-model tests: on a busy 2-core box PyTorch's two
    OpenMP threads are up to 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
import qatcheck.backends.onnxruntime_backend  # noqa: E402,F401
import qatcheck.backends.torch_backend  # noqa: E402,F401
import qatcheck.session  # noqa: E402,F401


def _warm_polygraphy() -> None:
    """Polygraphy imports what a runner needs on first use (its dtype tables, its checks): run one
    tiny graph through the runner path now, so an in-process pytester run does not import a second
    copy of those modules whose DataType compares unequal to the first's."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from polygraphy.comparator import CompareFunc, Comparator, IterationResult, RunResults  # noqa: F401
    from polygraphy.json import save_json  # noqa: F401

    from qatcheck.backends.onnxruntime_backend import OrtRunner

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("x", "y")]
    # an IR version every onnxruntime reads (a newer onnx package writes one an older runtime refuses)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm",
                                                io[:1], io[1:]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 13)])
    OrtRunner(model, "CPUExecutionProvider").infer(np.zeros((1, 2), np.float32))
    assert onnx


_warm_polygraphy()
