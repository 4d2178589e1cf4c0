"""Core building blocks: streaming metrics and parity, latency statistics, fingerprints, the
artifact cache, batching helpers, the mode table and the report table."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qatcheck import timing
from qatcheck.backends.base import TimedCall
from qatcheck.cache import ArtifactCache
from qatcheck.data.base import ArrayDataset
from qatcheck.data.batching import fixed_batches, pad_batch
from qatcheck.errors import ConfigError, DataError
from qatcheck.fingerprint import fingerprint_id
from qatcheck.measurement import Case
from qatcheck.modes import BACKENDS, MODES, parity_reference, unsupported_reason
from qatcheck.parity import ParityAccumulator
from qatcheck.recipe import InputSpec
from qatcheck.report_files import markdown_table
from qatcheck.tasks.classification import Top1Agreement, TopKAccuracy


def splits(n: int):
    """Strategy: a list of batch boundaries cutting range(n) into consecutive chunks."""
    return st.lists(st.integers(0, n), max_size=6).map(lambda cuts: [0, *sorted(cuts), n])


# ------------------------------------------------------------------------------------------------
# TopKAccuracy / Top1Agreement
# ------------------------------------------------------------------------------------------------
@st.composite
def classification(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 12))
    # distinct logits per row: top-k is then unambiguous
    logits = np.stack([np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(c)
                       for _ in range(n)]).astype(np.float32) * draw(st.sampled_from([1.0, -0.5, 3.0]))
    labels = np.asarray(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    ks = tuple(draw(st.lists(st.integers(1, 15), min_size=1, max_size=3, unique=True)))
    return logits, labels, ks, draw(splits(n))


def one_shot_topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    order = np.argsort(-logits, axis=1)
    return float(np.mean([labels[i] in order[i, :k] for i in range(len(labels))]))


@given(classification())
def test_topk_streaming_equals_one_shot(data):
    logits, labels, ks, cuts = data
    acc = TopKAccuracy(ks)
    for a, b in zip(cuts, cuts[1:]):
        acc.update([logits[a:b]], labels[a:b].tolist())  # targets may be a plain list
    res = acc.result()
    assert set(res) == {f"top{k}" for k in ks}
    for k in ks:
        assert res[f"top{k}"] == pytest.approx(one_shot_topk(logits, labels, k), abs=1e-12)
    if max(ks) >= logits.shape[1]:
        assert res[f"top{max(ks)}"] == 1.0


@given(classification())
def test_top1_agreement_streaming_equals_one_shot(data):
    logits, _, _, cuts = data
    other = logits[:, ::-1].copy()
    agr = Top1Agreement()
    for a, b in zip(cuts, cuts[1:]):
        agr.update([logits[a:b]], [other[a:b]])
    expected = float(np.mean(logits.argmax(1) == other.argmax(1)))
    assert agr.result()["top1_agreement"] == pytest.approx(expected)


def test_topk_rejects_bad_shapes_and_labels():
    acc = TopKAccuracy((1,))
    with pytest.raises(DataError, match=r"\(3,\)"):
        acc.update([np.zeros(3, np.float32)], [0, 1, 2])
    with pytest.raises(DataError, match="label 10 is outside the model's 10 classes"):
        acc.update([np.zeros((2, 10), np.float32)], [1, 10])
    with pytest.raises(DataError, match="no samples"):
        acc.result()


def test_topk_negative_label_is_named():
    with pytest.raises(DataError, match="label -1"):
        TopKAccuracy((1,)).update([np.zeros((2, 10), np.float32)], [-1, 3])


# ------------------------------------------------------------------------------------------------
# ParityAccumulator
# ------------------------------------------------------------------------------------------------
@st.composite
def output_pairs(draw):
    n = draw(st.integers(1, 30))
    shape = (n, draw(st.integers(1, 8)))
    elems = st.floats(-100, 100, allow_nan=False, width=32)
    ref = draw(hnp.arrays(np.float32, shape, elements=elems))
    noise = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    out = (ref + noise * draw(st.sampled_from([0.0, 1e-3, 1.0]))).astype(np.float32)
    return ref, out, draw(splits(n))


@given(output_pairs())
def test_parity_streaming_equals_one_shot(data):
    ref, out, cuts = data
    acc = ParityAccumulator()
    for a, b in zip(cuts, cuts[1:]):
        acc.update(ref[a:b], out[a:b])
    res = acc.result()
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    assume(denom > 1e-6 or (not r.any() and not o.any()))
    cos = float(r @ o / denom) if denom > 0 else 1.0
    assert res["cosine"] == pytest.approx(cos, rel=1e-9, abs=1e-9)
    assert res["max_abs"] == float(np.abs(r - o).max())
    assert res["mean_abs"] == pytest.approx(float(np.abs(r - o).mean()), rel=1e-9, abs=1e-12)
    assert -1 - 1e-9 <= res["cosine"] <= 1 + 1e-9


def test_parity_identical_outputs_and_shape_mismatch():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    acc = ParityAccumulator()
    acc.update(x, x.copy())
    assert acc.result() == {"cosine": pytest.approx(1.0), "max_abs": 0.0, "mean_abs": 0.0}
    assert ParityAccumulator().result()["cosine"] == 1.0  # nothing compared: nothing differs
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        acc.update(x, x[:, :3])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_parity_non_finite_output_is_never_agreement(bad):
    """A NaN must not keep max_abs at 0 (Python's max ignores it); an inf (fp16 overflow) must not
    make the cosine NaN, which every floor comparison would let through."""
    ref = np.ones((2, 3), np.float32)
    out = ref.copy()
    out[1, 1] = bad
    acc = ParityAccumulator()
    acc.update(ref, out)
    result = acc.result()
    assert not result["max_abs"] < 1e-3
    assert not math.isnan(result["cosine"]) and result["cosine"] < 0.98


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def test_stats_from_samples_against_numpy():
    samples = [5.0, 1.0, 2.0, 4.0, 3.0, 10.0, 2.5, 2.5, 3.5, 1.5]
    s = timing.stats_from_samples(samples, batch_size=8, clock="wall")
    a = np.asarray(samples)
    assert s.median_ms == 2.75 == np.median(a)
    assert s.p90_ms == pytest.approx(np.percentile(a, 90)) and s.p99_ms == pytest.approx(np.percentile(a, 99))
    assert s.mean_ms == pytest.approx(3.5) and s.min_ms == 1.0
    assert s.cv == pytest.approx(a.std() / a.mean())
    assert (s.iterations, s.batch_size, s.clock) == (10, 8, "wall")
    assert s.noisy and s.to_dict()["median_ms"] == 2.75
    flat = timing.stats_from_samples([2.0] * 7, 1, "cuda-events")
    assert flat.cv == 0.0 and not flat.noisy and flat.p99_ms == 2.0
    with pytest.raises(ValueError):
        timing.stats_from_samples([], 1, "wall")


@given(st.lists(st.floats(0.001, 1e4, allow_nan=False), min_size=1, max_size=200))
def test_stats_from_samples_property(samples):
    s = timing.stats_from_samples(samples, 1, "wall")
    a = np.asarray(samples)
    assert s.min_ms <= s.median_ms <= s.p90_ms <= s.p99_ms <= a.max()
    assert s.median_ms == pytest.approx(np.median(a))
    assert s.iterations == len(samples)


def test_measure_uses_device_times_when_the_call_records_them():
    calls = []
    times: list[float] = []

    def run():
        calls.append(1)
        times.append(float(len(calls)))  # device time = call index: warm-up ones are distinguishable

    s = timing.measure(TimedCall(run, times), batch_size=4, iterations=25, warmup_s=0.0)
    warm = len(calls) - 25
    assert warm >= 3  # warm-up runs before timing
    assert s.clock == "cuda-events" and s.iterations == 25 and s.batch_size == 4
    assert s.min_ms == warm + 1  # warm-up device times were discarded
    assert s.median_ms == pytest.approx(np.median(np.arange(warm + 1, warm + 26)))


def test_measure_falls_back_to_wall_clock():
    n = []
    s = timing.measure(TimedCall(lambda: n.append(1)), batch_size=2, iterations=17, warmup_s=0.0)
    assert s.clock == "wall" and s.iterations == 17 and len(n) == 17 + 3
    assert s.min_ms >= 0
    # a runner that offers device timing but records nothing: wall clock, not an empty sample set
    s = timing.measure(TimedCall(lambda: None, []), batch_size=2, iterations=5, warmup_s=0.0)
    assert s.clock == "wall" and s.iterations == 5


def test_measure_with_disabled_benchmark_returns_none():
    class Disabled:
        disabled = True
        ran = 0

        def __call__(self, fn):
            self.ran += 1
            fn()

    b = Disabled()
    assert timing.measure(TimedCall(lambda: None), 1, 10, 0.0, benchmark=b) is None
    assert b.ran == 1


# ------------------------------------------------------------------------------------------------
# fingerprint
# ------------------------------------------------------------------------------------------------
fp_dicts = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), min_size=1, max_size=6)


@given(fp_dicts, st.data())
def test_fingerprint_id_stable_and_sensitive_to_every_field(fp, data):
    fid = fingerprint_id(fp)
    assert len(fid) == 12 and fid == fingerprint_id(dict(reversed(list(fp.items()))))
    k = data.draw(st.sampled_from(sorted(fp)))
    changed = dict(fp)
    changed[k] = fp[k] + "x"
    assert fingerprint_id(changed) != fid
    dropped = {kk: v for kk, v in fp.items() if kk != k}
    assert fingerprint_id(dropped) != fid
    extra = data.draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in fp))
    assert fingerprint_id({**fp, extra: ""}) != fid


# ------------------------------------------------------------------------------------------------
# ArtifactCache
# ------------------------------------------------------------------------------------------------
def _builder(log: list):
    def build(path):
        log.append(path)
        path.write_text(f"build {len(log)}")
    return build


def test_cache_builds_once_then_reuses(tmp_path):
    cache, log = ArtifactCache(tmp_path / "c"), []
    parts = {"weights": "abc", "mode": "fp32", "versions": {"torch": "2"}}
    p1 = cache.get_or_build("r-fp32", parts, ".onnx", _builder(log))
    p2 = cache.get_or_build("r-fp32", dict(parts), ".onnx", _builder(log))
    assert p1 == p2 and len(log) == 1 and p1.read_text() == "build 1"
    assert cache.built == {p1.name} and not cache.reused  # built here, not counted again as reused
    # a new session over the same directory reuses too
    other = ArtifactCache(tmp_path / "c")
    assert other.get_or_build("r-fp32", parts, ".onnx", _builder(log)) == p1 and len(log) == 1
    assert not other.built and other.reused == {p1.name}


@pytest.mark.parametrize("change", [
    lambda p: p.update(weights="abd"),
    lambda p: p.update(mode="fp16"),
    lambda p: p["versions"].update(torch="3"),
    lambda p: p.update(calib="new-data"),
    lambda p: p.pop("mode"),
])
def test_cache_rebuilds_when_any_key_part_changes(tmp_path, change):
    cache, log = ArtifactCache(tmp_path), []
    parts = {"weights": "abc", "mode": "fp32", "versions": {"torch": "2"}}
    p1 = cache.get_or_build("r", parts, ".onnx", _builder(log))
    changed = {**parts, "versions": dict(parts["versions"])}
    change(changed)
    p2 = cache.get_or_build("r", changed, ".onnx", _builder(log))
    assert p2 != p1 and len(log) == 2 and p1.read_text() == "build 1"
    assert len(cache.built) == 2 and not cache.reused
    assert cache.get_or_build("r", parts, ".onnx", _builder(log)) == p1 and len(log) == 2


def test_cache_disabled_always_builds(tmp_path):
    cache, log = ArtifactCache(tmp_path, enabled=False), []
    for _ in range(2):
        p = cache.get_or_build("r", {"a": 1}, ".pt", _builder(log))
    assert len(log) == 2 and p.read_text() == "build 2" and not cache.reused


def test_cache_failed_build_leaves_nothing_that_looks_built(tmp_path):
    cache = ArtifactCache(tmp_path)

    def boom(path):
        raise RuntimeError("export failed")
    with pytest.raises(RuntimeError):
        cache.get_or_build("r", {"a": 1}, ".onnx", boom)
    assert not cache.built and [p.name for p in tmp_path.iterdir()] == [".locks"]  # the lock, no entry
    log = []
    cache.get_or_build("r", {"a": 1}, ".onnx", _builder(log))
    assert len(log) == 1


# ------------------------------------------------------------------------------------------------
# batching helpers
# ------------------------------------------------------------------------------------------------
@given(n=st.integers(1, 50), batch=st.integers(1, 70), limit=st.one_of(st.none(), st.integers(0, 5)))
@settings(max_examples=80)
def test_fixed_batches_always_full(n, batch, limit):
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    ds = ArrayDataset("d", images, np.zeros(n, np.int64))
    out = list(fixed_batches(ds, batch, limit))
    expected_count = -(-n // batch) if limit is None else min(limit, -(-n // batch))
    assert len(out) == expected_count
    seen = set()
    for x in out:
        assert x.shape == (batch, 1, 1, 1)
        assert set(x.ravel().tolist()) <= set(range(n))  # only real samples, wrapped around
        seen |= set(x.ravel().tolist())
    if limit is None:
        assert seen == set(range(n))  # every sample is calibrated on


def test_pad_batch():
    x = np.ones((3, 2, 2), np.float16)
    padded, n = pad_batch(x, 5)
    assert n == 3 and padded.shape == (5, 2, 2) and padded.dtype == np.float16
    assert (padded[:3] == 1).all() and (padded[3:] == 0).all()
    full, n = pad_batch(x, 3)
    assert n == 3 and full is x


# ------------------------------------------------------------------------------------------------
# modes, input spec, measurement verdict, report
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, backend, expected", [
    ("fp32", "torch", None),
    ("dynamic", "torch", None),
    ("fp16", "torch", ("fp32", "quantization")),
    ("torch_ptq", "torch", ("fp32", "quantization")),
    ("qat", "torch", ("fp32", "quantization")),
    ("fp32", "onnxruntime", ("fp32", "export")),
    ("fp16", "tensorrt", ("fp16", "export")),
    ("dynamic", "onnxruntime", ("dynamic", "export")),
    ("torch_ptq", "onnxruntime", ("torch_ptq", "export")),
    ("qat", "tensorrt", ("qat", "export")),
    ("trt_ptq", "onnxruntime", ("fp32", "quantization")),
    ("partial", "tensorrt", ("fp32", "quantization")),
])
def test_parity_reference_table(mode, backend, expected):
    assert parity_reference(mode, backend) == expected


def test_every_reference_is_a_runnable_torch_case():
    for mode in MODES:
        for backend in BACKENDS:
            if unsupported_reason(mode, backend):
                assert backend == "torch" and mode in ("trt_ptq", "partial")
                continue
            ref = parity_reference(mode, backend)
            if ref is not None:
                assert ref[1] in ("export", "quantization")
                assert unsupported_reason(ref[0], "torch") is None


def test_input_spec_profile():
    spec = InputSpec(shape=(32, 3, 24, 24), dynamic={0: (1, 32, 64), 3: (16, 24, 48)})
    assert spec.profile() == {"min": (1, 3, 24, 16), "opt": (32, 3, 24, 24), "max": (64, 3, 24, 48)}
    static = InputSpec(shape=(8, 1, 16, 16))
    assert set(static.profile().values()) == {(8, 1, 16, 16)} and static.batch_size == 8


@pytest.mark.parametrize("outcomes, verdict", [
    ({}, "-"),
    ({"accuracy": "skipped"}, "skip"),
    ({"accuracy": "passed", "latency": "skipped"}, "pass"),
    ({"accuracy": "passed", "parity": "failed"}, "FAIL"),
    ({"latency": "failed", "parity": "skipped"}, "FAIL"),
])
def test_measurement_verdict(outcomes, verdict):
    """The table's one word per case, from its tests' outcomes (the plugin records them)."""
    from types import SimpleNamespace

    from qatcheck.measurement import overall
    from qatcheck.report import case_verdict

    case = Case("r", "fp32", "torch")
    assert overall(outcomes.values()) == verdict
    session = SimpleNamespace(outcomes={case: outcomes}, verdicts={})
    assert case_verdict(session, case) == verdict


def test_case_keys():
    assert Case("r", "torch_ptq", "onnxruntime").key == "torch_ptq-onnxruntime"
    assert Case("r", "dynamic", "onnxruntime", "opt").key == "dynamic_opt-onnxruntime"
    assert Case("r", "dynamic", "torch", "min").id == "r-dynamic_min-torch"
    assert Case("r", "dynamic", "torch", "max").with_mode("fp32") == Case("r", "fp32", "torch")


def test_markdown_table():
    text = markdown_table(["Mode", "Backend", "top1"], [["fp32", "torch", "99.26"], ["qat", "onnxruntime", "98.90"]])
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 4
    assert lines[0] == "| Mode | Backend | top1 |"
    assert lines[1] == "|---|---|---|"
    assert lines[3] == "| qat | onnxruntime | 98.90 |"
    assert all(line.count("|") == 4 for line in lines)
    assert markdown_table(["a"], []) == "| a |\n|---|\n"


def test_rounds_for_caps_by_duration_within_bounds():
    assert timing.rounds_for(200, None, 0.5) == 200  # no cap: the iterations asked for
    assert timing.rounds_for(200, 3.0, 0.001) == 200  # fast model: all of them fit
    assert timing.rounds_for(200, 3.0, 0.05) == 60  # 3 s / 50 ms
    assert timing.rounds_for(200, 3.0, 1.0) == timing.MIN_ITERATIONS  # slow: never below the floor
    assert timing.rounds_for(10, 3.0, 1.0) == 10  # ...unless fewer were asked for


def test_measure_with_duration_takes_fewer_rounds_for_a_slow_call():
    import time as _t

    n = []
    s = timing.measure(TimedCall(lambda: (n.append(1), _t.sleep(0.002))), batch_size=1, iterations=500,
                       warmup_s=0.0, duration_s=0.05)
    assert timing.MIN_ITERATIONS <= s.iterations < 500


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Baselines and reports are shared files: not the 0600 of a private temp file."""
    import os
    import stat

    from qatcheck.fsutil import write_text_atomic

    p = tmp_path / "b.json"
    old = os.umask(0o022)
    try:
        write_text_atomic(p, "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_strict_fp32_turns_tf32_off_and_restores_it():
    """fp32 references on CUDA must not run in TF32 (it broke fp32 export parity on the H100:
    max-abs 4.3e-3 > 1e-3); the switch is scoped, so the user's setting survives."""
    import torch

    from qatcheck.backends.torch_backend import strict_fp32

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with strict_fp32(True):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with strict_fp32(False):  # fp16 / non-CUDA runners leave it alone
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_measure_labels_device_times_with_the_calls_clock():
    """Graph-replay and eager-event samples must never share a baseline: the clock label comes from
    the timed call and ends up in the runner's fingerprint."""
    times: list[float] = []
    s = timing.measure(TimedCall(lambda: times.append(1.0), times, clock="cuda-graph"),
                       batch_size=1, iterations=5, warmup_s=0.0)
    assert s.clock == "cuda-graph"
    times2: list[float] = []
    assert timing.measure(TimedCall(lambda: times2.append(1.0), times2), 1, 5, 0.0).clock == "cuda-events"


def test_dynamic_modes_add_min_opt_max_cases_for_any_mode():
    from qatcheck.options import Options
    from qatcheck.session import QatcheckSession
    from qatcheck.zoo.recipes import digits_recipe

    recipe = digits_recipe(modes=("fp32", "trt_ptq", "torch_ptq", "dynamic"), dynamic_modes=("trt_ptq", "torch_ptq", "qat"),
                           backends=("torch", "onnxruntime"))  # qat is not a mode here: not measured
    keys = [c.key for c in QatcheckSession(Options()).cases(recipe)]
    assert keys == ["fp32-torch", "fp32-onnxruntime",
                    "trt_ptq-onnxruntime", "trt_ptq_min-onnxruntime", "trt_ptq_opt-onnxruntime",
                    "trt_ptq_max-onnxruntime",
                    "torch_ptq-torch", "torch_ptq_min-torch", "torch_ptq_opt-torch", "torch_ptq_max-torch",
                    "torch_ptq-onnxruntime", "torch_ptq_min-onnxruntime", "torch_ptq_opt-onnxruntime",
                    "torch_ptq_max-onnxruntime",
                    "dynamic_min-torch", "dynamic_opt-torch", "dynamic_max-torch",
                    "dynamic_min-onnxruntime", "dynamic_opt-onnxruntime", "dynamic_max-onnxruntime"]
    # a dynamic case's reference is PyTorch at the same shape
    session = QatcheckSession(Options())
    session.register(recipe)
    assert session.reference_case(Case("digits", "trt_ptq", "onnxruntime", "max")) == Case("digits", "fp32", "torch", "max")
    assert session.shape(Case("digits", "trt_ptq", "onnxruntime", "max")) == (128, 1, 16, 16)
    assert session.shape(Case("digits", "trt_ptq", "onnxruntime")) == (32, 1, 16, 16)


@pytest.mark.parametrize("fields, match", [
    (dict(modes=("fp32",), dynamic_modes=("int4",)), "unknown mode 'int4'"),
    (dict(modes=("fp32", "dynamic"), dynamic_modes=("dynamic",)), "already measured at min / opt / max"),
    (dict(modes=("fp32", "fp16"), dynamic_modes=("fp16",), input=InputSpec(shape=(32, 1, 16, 16))),
     "needs InputSpec.dynamic"),
    (dict(modes=("dynamic",), dynamic_modes=(), input=InputSpec(shape=(32, 1, 16, 16))),
     "lists mode 'dynamic' but InputSpec.dynamic declares no dynamic axis"),
])
def test_dynamic_modes_are_validated(fields, match):
    from qatcheck.zoo.recipes import digits_recipe

    with pytest.raises(ConfigError, match=match):
        digits_recipe(**fields)


def test_coco_root_comes_from_the_running_sessions_options(tmp_path, monkeypatch):
    """--qatcheck-coco-root reaches recipe factories through qatcheck.options.active(), not through
    the process environment."""
    from qatcheck.data.coco import COCO_ROOT_ENV, coco_val2017
    from qatcheck.errors import DataError
    from qatcheck.options import Options, activate, active, deactivate

    monkeypatch.delenv(COCO_ROOT_ENV, raising=False)
    options = Options(coco_root=tmp_path / "coco")
    activate(options)
    try:
        assert active() is options
        with pytest.raises(DataError, match=str(tmp_path / "coco")):
            coco_val2017()
    finally:
        deactivate(options)
    assert active() is not options  # back to the outer pytest run's options (no COCO root)
    with pytest.raises(DataError, match="no COCO root given"):
        coco_val2017()


def _steady_then_noisy(noisy_after: int | None = None):
    """A call whose device times are a steady 1 ms (+/- 0.1%), or noisy (1..3 ms) from run
    ``noisy_after`` on."""
    rng, times = np.random.default_rng(0), []

    def run():
        noisy = noisy_after is not None and len(times) >= noisy_after
        times.append(float(rng.uniform(1.0, 3.0) if noisy else 1.0 + rng.uniform(-1e-3, 1e-3)))
    return TimedCall(run, times)


def test_an_adaptive_loop_stops_once_the_median_is_known_well_enough():
    """Steady times: the interval is tight at the first look (ADAPTIVE_MIN_ITERATIONS samples), so
    the loop stops there; noisy ones never get within 1%, so it runs to the same maximum as a
    loop without a target; no target: always the maximum."""
    steady = timing.measure(_steady_then_noisy(), 1, 500, 0.0, target_ci_rel=0.01)
    assert steady.iterations == timing.ADAPTIVE_MIN_ITERATIONS and steady.ci_rel <= 0.01
    noisy = timing.measure(_steady_then_noisy(0), 1, 500, 0.0, target_ci_rel=0.01)
    assert noisy.iterations == 500 and noisy.ci_rel > 0.01
    assert timing.measure(_steady_then_noisy(), 1, 500, 0.0).iterations == 500
    # the maximum is the duration's too: a cap below the first look is the whole loop
    assert timing.measure(_steady_then_noisy(), 1, 30, 0.0, target_ci_rel=0.01).iterations == 30


def test_an_adaptive_loop_looks_again_as_it_grows():
    """Noisy at first, then steady: not tight at the first look, tight at a later one - stops
    between the minimum and the maximum, at one of the looks (x1.5 each)."""
    looks, n = [], timing.ADAPTIVE_MIN_ITERATIONS
    while n < 2000:
        looks.append(n)
        n = int(n * timing.ADAPTIVE_GROWTH)
    call = TimedCall(None, [])
    rng = np.random.default_rng(1)
    call.run = lambda: call.device_times_ms.append(float(rng.uniform(1, 3) if len(call.device_times_ms) < 60
                                                         else 2.0 + rng.uniform(-1e-3, 1e-3)))
    s = timing.measure(call, 1, 2000, 0.0, target_ci_rel=0.05)
    assert s.iterations in looks[1:] and s.ci_rel <= 0.05


def test_an_adaptive_loop_hands_its_samples_to_pytest_benchmark(pytester):
    """--benchmark-json keeps working: the fixture's rounds are the adaptive loop's samples."""
    pytester.makepyfile(test_b='''
        from qatcheck import timing
        from qatcheck.timing import TimedCall

        def test_it(benchmark):
            s = timing.measure(TimedCall(lambda: None), 1, 400, 0.0, benchmark, target_ci_rel=10.0)
            assert s.iterations == timing.ADAPTIVE_MIN_ITERATIONS
    ''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--benchmark-json", "b.json")
    result.assert_outcomes(passed=1)
    import json

    bench, = json.loads((pytester.path / "b.json").read_text())["benchmarks"]
    assert bench["stats"]["rounds"] == timing.ADAPTIVE_MIN_ITERATIONS and bench["stats"]["iterations"] == 1
