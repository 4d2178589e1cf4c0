"""Import the heavy stack once, up front: pytester's in-process runs restore ``sys.modules``
afterwards, and C extensions (numpy.fft, torch, onnxruntime) cannot be imported twice.

Under pytest-xdist (the test command runs ``-n auto``) each worker gets cores of its own, and a
test marked ``quiet`` (it times latency and reads the verdict) runs on every core with no
other test beside it."""
import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

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
    summary when ``CI`` or ``BUILD_NUMBER`` is set, so a failure message would appear twice there.
    On GitHub Actions, inner runs would also append their summaries to the job's (GITHUB_STEP_SUMMARY)
    and print annotations (GITHUB_ACTIONS) that GitHub reads from a failed test's captured output."""
    for name in ("CI", "BUILD_NUMBER", "GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS"):
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


def pytest_configure(config):
    """An xdist worker keeps to its share of the cores, and so do its threads, its inner pytester
    runs and their subprocesses: OpenMP threads sharing a core with another worker spin, and run
    up to 14x slower."""
    wid, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not wid or not count:
        return
    # the tests' own (pytester) runs are no xdist workers: pytest-benchmark, which reads these,
    # would switch itself off in them
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        os.environ.pop(name, None)
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus, n = sorted(os.sched_getaffinity(0)), int(count)
    if n <= len(cpus):
        mine = set(cpus[int(wid[2:]) % n::n])
        _CORES.update(all=set(cpus), mine=mine)
        _use(mine)


#: under xdist: every core of the run ("all") and this worker's share ("mine")
_CORES: dict[str, set[int]] = {}


def _use(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))


@contextlib.contextmanager
def _flock(path: Path, mode: int):
    with open(path, "a+b") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _turn(config, quiet: bool):
    """Every test of an xdist run holds the run's lock shared, a ``quiet`` one exclusively (it
    waits for the running tests to end, and the others wait for it). The turnstile keeps a waiting
    quiet test from starving: a test takes its turn through it before taking the lock."""
    uid = getattr(config, "workerinput", {}).get("testrunuid")
    if uid is None:  # not a worker: nothing runs beside it
        yield
        return
    base = Path(tempfile.gettempdir()) / f"qatcheck-tests-{uid}"
    with contextlib.ExitStack() as held:
        with _flock(base.with_suffix(".turnstile"), fcntl.LOCK_EX):
            held.enter_context(_flock(base.with_suffix(".lock"), fcntl.LOCK_EX if quiet else fcntl.LOCK_SH))
        if quiet and _CORES:  # alone: every core, as in a serial run
            _use(_CORES["all"])
            held.callback(_use, _CORES["mine"])
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with _turn(item.config, item.get_closest_marker("quiet") is not None):
        yield
