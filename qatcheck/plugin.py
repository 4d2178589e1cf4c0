"""The pytest plugin (entry point ``pytest11: qatcheck``).

A suite is an ordinary test module marked with its recipe::

    pytestmark = pytest.mark.qatcheck_recipe(make_recipe())

    def test_accuracy(qcase): qcase.check_accuracy()
    def test_parity(qcase): qcase.check_parity()
    def test_latency(qcase, benchmark): qcase.check_latency(benchmark)

``qcase`` is parametrized over the recipe's modes x backends (x shapes for dynamic builds) with ids
like ``digits-torch_ptq-onnxruntime``, and every case carries markers named after its mode and
backend, so ``-k``, ``-m "qat and onnxruntime"`` and ``--lf`` work as usual.

The plugin is loaded by every pytest run of the environment, in any project, so this module
imports only pytest and qatcheck's plain-data modules: torch, onnx and onnxruntime load when a
qatcheck suite is collected (the session is created then), never in an unrelated run.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path

import pytest

from qatcheck import parallel, run_record
from qatcheck.registry import backend_names
from qatcheck.errors import QatcheckError
from qatcheck.measurement import Case, Verdict
from qatcheck.modes import modes
from qatcheck.options import (CUDA_GRAPH_CHOICES, LATENCY_CHOICES, LOCALIZE_CHOICES, Options, activate, deactivate,
                              physical_cores)

OPTIONS_KEY = pytest.StashKey[Options]()
SESSION_KEY = pytest.StashKey["object"]()
MISSING_KEY = pytest.StashKey[list]()
#: the session's automatic localizations (qatcheck.analysis.localize.AutoLocalization)
LOCALIZE_KEY = pytest.StashKey["object"]()
#: test node id -> the recipes whose last collected test it is (the session lets them go after it)
RELEASE_KEY = pytest.StashKey[dict]()
#: what the run measured and concluded (qatcheck.run_record.RunRecord), made by the process that
#: ends it, and what its publishers could not write
RUN_KEY = pytest.StashKey[run_record.RunRecord]()
PUBLISHED_KEY = pytest.StashKey[tuple]()  # (what was written, why something was not)


def requirable() -> tuple[str, ...]:
    """``--qatcheck-require`` also accepts ``cuda`` (torch must see a GPU)."""
    return (*backend_names(), "cuda")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("qatcheck", "qatcheck: quantization regression checks")
    g.addoption("--update-baselines", action="store_true", default=False,
                help="record this run's measurements as the new baselines (merged into baselines/; "
                     "untouched entries and hand-set tolerances are kept; failing cases are not recorded)")
    g.addoption("--qatcheck-force-update", action="store_true", default=False,
                help="with --update-baselines, record failing cases too")
    g.addoption("--qatcheck-require", default="", metavar="LIST",
                help="comma-separated backends that must be available (torch, onnxruntime, tensorrt, "
                     "cuda); a missing one fails the session instead of skipping")
    g.addoption("--qatcheck-modes", default="", metavar="LIST", help="only these modes")
    g.addoption("--qatcheck-backends", default="", metavar="LIST", help="only these backends")
    g.addoption("--qatcheck-baselines", default=None, metavar="DIR",
                help="baseline directory (default: <rootdir>/baselines)")
    g.addoption("--qatcheck-reports", default=None, metavar="DIR",
                help="report directory (default: <rootdir>/reports)")
    g.addoption("--qatcheck-cache", default=None, metavar="DIR",
                help="artifact cache directory (default: <rootdir>/.qatcheck_cache)")
    g.addoption("--qatcheck-latency-reference", default=None, metavar="DIR",
                help="where the artifacts latency baselines were recorded from are kept, to be timed "
                     "beside a changed artifact (default: <cache>/latency-reference; keep it between CI runs)")
    g.addoption("--qatcheck-no-cache", action="store_true", default=False,
                help="rebuild every artifact and measure every case again (the cache is still written)")
    g.addoption("--qatcheck-remeasure", action="store_true", default=False,
                help="measure every case again, reusing no stored result (artifacts are still reused)")
    g.addoption("--qatcheck-device", default="auto", metavar="DEV",
                help="torch device: auto (cuda if available), cpu, cuda, cuda:N")
    g.addoption("--qatcheck-ort-provider", default="auto", metavar="EP",
                help="onnxruntime execution provider (auto: CUDA if present, else CPU)")
    g.addoption("--qatcheck-iterations", type=int, default=200, metavar="N",
                help="timed iterations per latency case (default 200; fewer when --qatcheck-duration "
                     "runs out first, at least 20)")
    g.addoption("--qatcheck-duration", type=float, default=3.0, metavar="SECONDS",
                help="cap on each case's timed loop, like trtexec --duration (default 3 s; 0 = no cap)")
    g.addoption("--qatcheck-latency-precision", type=float, default=0.25, metavar="FRACTION",
                help="stop a case's timed loop once its median is known within this fraction of the "
                     "latency tolerance (95%% interval; default 0.25: ±3.75%% at a 15%% tolerance), "
                     "after at least 50 samples; 0 = always time the whole loop")
    g.addoption("--qatcheck-warmup", type=float, default=0.2, metavar="SECONDS",
                help="warm-up time before timing (default 0.2 s, like trtexec)")
    g.addoption("--qatcheck-no-progress", action="store_true", default=False,
                help="no progress bars")
    g.addoption("--qatcheck-coco-root", default=None, metavar="DIR",
                help="COCO folder (val2017/ + annotations/) for recipes that use "
                     "qatcheck.data.coco.coco_val2017()")
    g.addoption("--qatcheck-cuda-graph", default="auto", choices=CUDA_GRAPH_CHOICES,
                help="CUDA latency: time CUDA-graph replays (trtexec's GPU compute time); auto falls "
                     "back to eager CUDA events when capture fails, off always uses eager events")
    g.addoption("--qatcheck-threads", default="auto", metavar="N",
                help="CPU intra-op threads for ONNX Runtime and PyTorch (default auto: the physical "
                     "cores); part of the latency fingerprint")
    g.addoption("--qatcheck-latency", default="judged", choices=LATENCY_CHOICES,
                help="which cases are timed: judged = only those whose latency a verdict or a "
                     "recording reads (a latency baseline for this device's fingerprint, "
                     "--update-baselines, a speedup floor); always; never")
    g.addoption("--qatcheck-latency-retries", type=int, default=2, metavar="N",
                help="re-measure a latency case that looks slower up to N times before judging it "
                     "(default 2)")
    g.addoption("--qatcheck-latency-strict", action="store_true", default=False,
                help="an inconclusive latency verdict (noise larger than the tolerance) fails")
    g.addoption("--qatcheck-strict", action="store_true", default=False,
                help="a metric or parity value better than its baseline beyond the tolerance fails "
                     "(the baseline is stale: --update-baselines keeps the new value)")
    g.addoption("--qatcheck-benchmark-table", action="store_true", default=False,
                help="also print pytest-benchmark's own table of the raw timings")
    g.addoption("--qatcheck-trt-ptq", default="auto", metavar="FORM",
                help="TensorRT trt_ptq/partial: native = TensorRT's own calibrator and per-layer "
                     "precision (TensorRT <= 10 only), qdq = build qatcheck's explicit Q/DQ ONNX, "
                     "auto = native where TensorRT still has it, else qdq; the name of a registered "
                     "ONNX quantizer has it write the trt_ptq/partial Q/DQ ONNX (for ONNX Runtime "
                     "too) and TensorRT builds it like qdq: modelopt = NVIDIA ModelOpt's ONNX PTQ "
                     "(minmax/entropy; pip install -e '.[modelopt]'), or one a suite registers")
    g.addoption("--qatcheck-localize", default="auto", choices=LOCALIZE_CHOICES,
                help="a failed parity check of a quantized case names the layer where the damage "
                     "enters (auto, the default), or not (off)")
    g.addoption("--qatcheck-localize-budget", type=float, default=60.0, metavar="SECONDS",
                help="seconds the automatic localizations of a run (of each xdist worker) may take "
                     "together (default 60; each distinct artifact is localized once); past it a "
                     "failure prints the `python -m qatcheck localize` command instead")


    g.addoption("--qatcheck-summary", default=None, metavar="FILE",
                help="append the run's verdicts and tables as Markdown to FILE, failures first "
                     "(default: $GITHUB_STEP_SUMMARY when set, so a GitHub job shows them)")
    g.addoption("--qatcheck-history", default=None, metavar="PATH",
                help="append one JSON line per case of this run to PATH, for `python -m qatcheck "
                     "history` and `compare` (default: <reports>/history.jsonl; off: none)")
    g.addoption("--qatcheck-html", default=None, metavar="PATH",
                help="the run's self-contained HTML report (default: <reports>/qatcheck.html; off: none)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qatcheck_recipe(recipe): parametrize the module's `qcase` "
                                       "fixture over the recipe's modes x backends")
    for name in modes():
        config.addinivalue_line("markers", f"{name}: qatcheck case in mode {name}")
    for name in backend_names():
        config.addinivalue_line("markers", f"{name}: qatcheck case on backend {name}")
    root = Path(config.rootpath)

    def opt_path(name: str, default: str) -> Path:
        value = config.getoption(name)
        return Path(value) if value else root / default

    unknown = [r for r in _csv(config.getoption("--qatcheck-require")) if r not in requirable()]
    if unknown:
        raise pytest.UsageError(f"--qatcheck-require: unknown name(s) {', '.join(unknown)}; "
                                f"choose from {', '.join(requirable())}")
    for opt, known in (("--qatcheck-modes", modes()), ("--qatcheck-backends", backend_names())):
        bad = [v for v in _csv(config.getoption(opt)) if v not in known]
        if bad:
            raise pytest.UsageError(f"{opt}: unknown name(s) {', '.join(bad)}; choose from {', '.join(known)}")
    coco_root = config.getoption("--qatcheck-coco-root")
    threads = config.getoption("--qatcheck-threads")
    if threads != "auto" and not (threads.isdigit() and int(threads) > 0):
        raise pytest.UsageError(f"--qatcheck-threads: expected auto or a positive number, got {threads!r}")
    localize_budget = config.getoption("--qatcheck-localize-budget")
    if not localize_budget >= 0:
        raise pytest.UsageError(f"--qatcheck-localize-budget: expected seconds >= 0, got {localize_budget!r}")
    if not config.getoption("--qatcheck-latency-precision") >= 0:
        raise pytest.UsageError("--qatcheck-latency-precision: expected a fraction of the tolerance >= 0 "
                                f"(0: no early stop), got {config.getoption('--qatcheck-latency-precision')!r}")
    options = Options(
        baselines_dir=opt_path("--qatcheck-baselines", "baselines"),
        reports_dir=opt_path("--qatcheck-reports", "reports"),
        cache_dir=opt_path("--qatcheck-cache", ".qatcheck_cache"),
        latency_reference_dir=(opt_path("--qatcheck-latency-reference", "")
                               if config.getoption("--qatcheck-latency-reference") else None),
        use_cache=not config.getoption("--qatcheck-no-cache"),
        remeasure=config.getoption("--qatcheck-remeasure"),
        update_baselines=config.getoption("--update-baselines"),
        force_update=config.getoption("--qatcheck-force-update"),
        require=_csv(config.getoption("--qatcheck-require")),
        device=config.getoption("--qatcheck-device"),
        ort_provider=config.getoption("--qatcheck-ort-provider"),
        latency_iterations=config.getoption("--qatcheck-iterations"),
        warmup_s=config.getoption("--qatcheck-warmup"),
        latency_duration_s=config.getoption("--qatcheck-duration") or None,
        latency_precision=config.getoption("--qatcheck-latency-precision"),
        progress=not config.getoption("--qatcheck-no-progress"),
        cuda_graph=config.getoption("--qatcheck-cuda-graph"),
        trt_ptq=config.getoption("--qatcheck-trt-ptq"),
        coco_root=Path(coco_root).resolve() if coco_root else None,
        threads=physical_cores() if threads == "auto" else int(threads),
        latency=config.getoption("--qatcheck-latency"),
        latency_retries=max(0, config.getoption("--qatcheck-latency-retries")),
        latency_strict=config.getoption("--qatcheck-latency-strict"),
        strict=config.getoption("--qatcheck-strict"),
        benchmark_table=config.getoption("--qatcheck-benchmark-table"),
        localize=config.getoption("--qatcheck-localize"),
        localize_budget_s=localize_budget,
        summary_path=_summary_path(config),
        annotations=os.environ.get("GITHUB_ACTIONS") == "true",
        history_path=_off_or(config.getoption("--qatcheck-history"), opt_path("--qatcheck-reports", "reports") / "history.jsonl"),
        html_path=_off_or(config.getoption("--qatcheck-html"), opt_path("--qatcheck-reports", "reports") / "qatcheck.html"),
    )
    w = parallel.worker(config)
    if w is not None:
        options.xdist_worker = (w.index, w.count)
        if threads == "auto":  # workers share the cores: oversubscribed OpenMP threads crawl
            options.threads = max(1, options.threads // w.count)
    elif parallel.is_controller(config):
        if config.option.dist == "load":  # a suite's tests on one worker: see qatcheck.parallel
            config.option.dist = "loadscope"
        config.pluginmanager.register(_Controller(), "qatcheck-xdist-controller")
    if w is None:  # the process that ends the run: it sees every test's report
        config.pluginmanager.register(_RunLog(), "qatcheck-run-log")
    config.stash[OPTIONS_KEY] = options
    activate(options)  # recipe factories run lazily, inside this session: qatcheck.options.active()
    config.stash[MISSING_KEY] = []
    if options.require:  # asked for explicitly: worth loading the backends now
        config.stash[MISSING_KEY] = _missing_required(_session(config), options.require)


def _summary_path(config: pytest.Config) -> Path | None:
    value = config.getoption("--qatcheck-summary") or os.environ.get("GITHUB_STEP_SUMMARY", "")
    return Path(value) if value else None


def _off_or(value: str | None, default: Path) -> Path | None:
    """An output path option: unset gives ``default``, ``off`` none."""
    return None if value == "off" else Path(value) if value else default


def pytest_unconfigure(config: pytest.Config) -> None:
    options = config.stash.get(OPTIONS_KEY, None)
    if options is not None:
        deactivate(options)


def _session(config: pytest.Config, create: bool = True):
    """The qatcheck session, created (and torch & co. imported) when a suite first needs it."""
    qs = config.stash.get(SESSION_KEY, None)
    if qs is None and create:
        from qatcheck.session import QatcheckSession

        options = config.stash[OPTIONS_KEY]
        if options.xdist_worker:  # each worker times on its own GPU, or not at all
            device, options.latency_off = parallel.latency_placement(parallel.Worker(*options.xdist_worker),
                                                                     options.device)
            if device:
                options.device = device
        qs = config.stash[SESSION_KEY] = QatcheckSession(options)
    return qs


def _missing_required(session, required) -> list[str]:
    missing = []
    for name in required:
        if name == "cuda":
            import torch

            if not torch.cuda.is_available():
                missing.append("cuda: torch sees no CUDA device")
            continue
        reason = session.unavailable_reason(name)
        if reason:
            missing.append(f"{name}: {reason}")
    return missing


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "qcase" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("qatcheck_recipe")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{metafunc.definition.nodeid} uses `qcase` but its module has no "
                                "pytest.mark.qatcheck_recipe(recipe) marker")
    config = metafunc.config
    session = _session(config)
    modes_ = _csv(config.getoption("--qatcheck-modes")) or None
    backends = _csv(config.getoption("--qatcheck-backends")) or None
    params = []
    for recipe in marker.args:
        for case in session.cases(recipe, modes_, backends):
            marks = [getattr(pytest.mark, case.mode), getattr(pytest.mark, case.backend)]
            params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("qcase", params, indirect=True)


class BoundCase:
    """What a test receives as ``qcase``: the case plus the checks, which fail the test with one
    readable message (no traceback through qatcheck)."""

    def __init__(self, case: Case, session, nodeid: str = "", stash: pytest.Stash | None = None) -> None:
        self.case = case
        self.session = session
        self.nodeid = nodeid or case.id
        self.stash = stash if stash is not None else pytest.Stash()  # the run's (config.stash)

    @property
    def id(self) -> str:
        return self.case.id

    @property
    def recipe(self):
        return self.session.recipes[self.case.recipe]

    def measure(self, parts=("eval",)):
        return self._call(self.session.measure, self.case, parts)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except QatcheckError as exc:
            message = f"{type(exc).__name__}: {exc}"
        # outside the except block, so the report shows one line, not a chained traceback
        pytest.fail(self._once(message, "error"), pytrace=False)

    def _once(self, message: str, what: str) -> str:
        """One message per root cause: an error every case hits (a data factory that raises, a
        malformed baseline) or a cause of many failures (the eval data changed) is printed in full
        once; the other tests point to that one."""
        first = self.session.errors.setdefault(message, self.nodeid)
        if first == self.nodeid:
            return message
        head = message.splitlines()[0]
        if what == "cause":  # its lead clause names it; the figures are in the full message
            head = head.split(" (")[0]
        return f"same {what} as {first} (reported there in full): {head[:160]}"

    def _conclude(self, verdict: Verdict, what: str) -> Verdict:
        if verdict.failures:
            lines = [self._once(f, "cause") if f in verdict.causes else f for f in verdict.failures]
            if what == "parity":
                lines += self._localize()
            # a failure the data explains: replaying the model on its inputs reproduces nothing
            if what in ("parity", "accuracy") and not verdict.data_changed:
                lines += self._repro(what)
            # the report's Failures section repeats what this message adds to the verdict
            self.session.failure_details[(verdict.case, verdict.check)] = lines[len(verdict.failures):]
            pytest.fail(f"{self.case.id} {what} check failed:\n  " + "\n  ".join(lines), pytrace=False)
        if verdict.skipped:
            pytest.skip(verdict.skipped)
        return verdict  # pass, improved or inconclusive: the table and its notes say which

    def _localize(self) -> list[str]:
        """Where the damage enters (qatcheck.analysis.localize), for a failed parity check of a
        low-precision case at its static shape - which modes, and on which path, comes from the mode
        table (qatcheck.modes.localization_paths): fp16 / trt_ptq / partial on their graph, the
        modes with a PyTorch form on the torch backend in PyTorch (the exports of torch_ptq / qat /
        fp8 on other backends get a line pointing to the torch case); never a second failure on top
        of the first. Off with --qatcheck-localize off; once per distinct artifact, within
        --qatcheck-localize-budget."""
        options = self.session.options
        if options.localize == "off":
            return []
        try:
            from qatcheck.analysis.localize import AutoLocalization, for_failed_case

            if LOCALIZE_KEY not in self.stash:
                self.stash[LOCALIZE_KEY] = AutoLocalization(options.localize_budget_s)
            return for_failed_case(self.session.case_view(self.case), auto=self.stash[LOCALIZE_KEY])
        except Exception as exc:
            return [f"(no localization: {type(exc).__name__}: {exc})"]

    def _repro(self, what: str) -> list[str]:
        """The reproduction bundle's command (qatcheck.repro) and whether Polygraphy's comparator
        reproduces the failure on it, or why there is none; never a second failure on top of the
        first."""
        from qatcheck import repro

        try:
            bundle = repro.write(self.session.case_view(self.case), what)
        except Exception as exc:  # the verdict stands; the bundle is a help
            return [f"(no reproduction bundle: {type(exc).__name__}: {exc})"]
        if bundle is None:
            return []
        return bundle.message_lines()

    def check_accuracy(self) -> Verdict:
        return self._conclude(self._call(self.session.check_accuracy, self.case), "accuracy")

    def check_parity(self) -> Verdict:
        return self._conclude(self._call(self.session.check_parity, self.case), "parity")

    def check_latency(self, benchmark=None) -> Verdict:
        return self._conclude(self._call(self.session.check_latency, self.case, benchmark), "latency")

    def check_structure(self) -> Verdict:
        """The int8 artifact's quantizers and scales vs the baseline (skips for float modes)."""
        return self._conclude(self._call(self.session.check_structure, self.case), "structure")

    def check_precision(self, **expect) -> Verdict:
        """TensorRT precision audit, e.g. ``qcase.check_precision(conv="int8", max_reformats=4)``;
        skips on other backends (they have no engine to inspect)."""
        return self._conclude(self._call(self.session.check_precision, self.case, expect), "precision")


@pytest.fixture
def qcase(request: pytest.FixtureRequest) -> BoundCase:
    case: Case = request.param
    session = _session(request.config)
    nature = session.skip_reason(case)
    if nature:
        pytest.skip(nature)
    reason = session.unavailable_reason(case.backend)
    if reason:
        if case.backend in session.options.require:
            pytest.fail(f"backend {case.backend} is required (--qatcheck-require) but not available: "
                        f"{reason}", pytrace=False)
        pytest.skip(f"backend {case.backend} unavailable: {reason}")
    if "cuda" in session.options.require and case.backend == "torch":
        import torch

        if not torch.cuda.is_available():
            pytest.fail("cuda is required (--qatcheck-require cuda) but torch sees no GPU", pytrace=False)
    return BoundCase(case, session, request.node.nodeid, request.config.stash)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("qcase") if callspec else None
    if isinstance(case, Case) and (report.when == "call" or report.outcome != "passed"):
        session = _session(item.config, create=False)
        if session is not None:
            session.outcomes.setdefault(case, {})[item.originalname] = report.outcome
            if report.when == "call":  # junitxml writes the teardown report's, i.e. the item's
                item.user_properties += _junit_properties(session, case, item.originalname.removeprefix("test_"),
                                                          report.outcome)
        if report.failed:  # which case and check, for the run's failures (wherever the report goes)
            report.user_properties = [*report.user_properties, ("qatcheck_case", case.id),
                                      ("qatcheck_check", item.originalname.removeprefix("test_"))]
    return report


def _junit_properties(session, case: Case, check: str, outcome: str) -> list[tuple[str, object]]:
    """The case's figures as JUnit ``<property>``s of its test (``--junitxml``), so a CI's test
    view shows what was measured: the check's verdict, each metric, p50 latency, parity cosine,
    which parts were reused from an earlier run's results."""
    verdict = session.verdicts.get((case, check))
    props = [("qatcheck.case", case.id), ("qatcheck.check", check),
             ("qatcheck.verdict", verdict.status if verdict is not None else outcome)]
    m = session.measurements.get(case)
    if m is None:
        return props
    props += [(f"qatcheck.metric.{name}", value) for name, value in m.metrics.items()]
    if m.latency is not None:
        props.append(("qatcheck.p50_ms", m.latency.median_ms))
    if m.parity and "cosine" in m.parity:
        props.append(("qatcheck.parity.cosine", m.parity["cosine"]))
    return props + [("qatcheck.reused", ",".join(sorted(m.reused)) or "no")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A module marked with several recipes runs one recipe's tests, then the next's (each in its
    collected order). pytest's own order goes test function by test function, alternating the
    recipes, which kept every recipe's model, data and runners alive to the module's end; now each
    is let go after its last test before the next is built (the pruned suite's peak memory)."""
    ordered = []
    for _, run in itertools.groupby(items, key=lambda item: item.nodeid.split("::")[0]):
        run = list(run)
        recipes = list(dict.fromkeys(case.recipe for item in run if (case := _qcase(item)) is not None))
        ranks, rank = [], 0
        for item in run:  # a test without a case stays with the recipe tested before it
            rank = recipes.index(case.recipe) if (case := _qcase(item)) is not None else rank
            ranks.append(rank)
        ordered += [item for _, _, item in sorted(zip(ranks, range(len(run)), run))]
    items[:] = ordered


def pytest_collection_finish(session: pytest.Session) -> None:
    """The cases this run measures (the session keeps a parity reference's outputs only where two
    of them read it). One table: qatcheck prints its own; pytest-benchmark's table of the same timings only with
    --qatcheck-benchmark-table (its --benchmark-json / --benchmark-save keep working)."""
    qs = _session(session.config, create=False)
    if qs is not None:  # what the run measures: a parity reference read twice is run once
        measured = [(item, case) for item in session.items if (case := _qcase(item)) is not None]
        qs.selected = {case for _, case in measured}
        last = {case.recipe: item.nodeid for item, case in measured}  # a recipe's last test
        session.config.stash[RELEASE_KEY] = {n: [r for r, m in last.items() if m == n] for n in set(last.values())}
    bs = getattr(session.config, "_benchmarksession", None)
    if qs is not None and bs is not None and not qs.options.benchmark_table:
        bs.quiet = True


def _qcase(item: pytest.Item):
    return getattr(getattr(item, "callspec", None), "params", {}).get("qcase")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem) -> None:
    """After a recipe's last collected test, the session lets its model, data and runners go."""
    done = item.config.stash.get(RELEASE_KEY, {}).get(item.nodeid)
    qs = _session(item.config, create=False) if done else None
    for recipe in done if qs is not None else ():
        qs.release(recipe)


class _Controller:
    """pytest-xdist's controller: collects each worker's qatcheck summary (tables, baseline
    changes, notes) and prints them once, at the end."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        #: each worker's recipe tables (qatcheck.run_record.RecipeTable)
        self.tables: list = []
        #: a worker's --update-baselines wrote nothing (report.Summary.baselines_not_written)
        self.baselines_not_written = False

    def pytest_testnodedown(self, node, error) -> None:
        output = getattr(node, "workeroutput", {})
        text = output.get("qatcheck_summary")
        if text:
            self.texts.append(text)
        self.baselines_not_written |= bool(output.get("qatcheck_baselines_not_written"))
        self.tables += [run_record.RecipeTable(**t) for t in output.get("qatcheck_tables", ())]


class _RunLog:
    """The run's failed tests, as the process that ends the run receives their reports (an xdist
    controller receives every worker's)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.failures: list[run_record.Failure] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            props = dict(report.user_properties)
            check = props.get("qatcheck_check") or report.nodeid.split("::")[-1].split("[")[0]
            path, line, _ = report.location  # line: 0-based, of the test's function (None: unknown)
            self.failures.append(run_record.Failure(report.nodeid, props.get("qatcheck_case", ""), check,
                                                    report.longreprtext,
                                                    (path, line + 1) if line is not None else None))


def _publish(config: pytest.Config, session: pytest.Session, tables: list) -> None:
    """The run's record, and its publishers, each on its own: one that cannot write says why in
    the summary, and the others still write. Only a run that measured a qatcheck case publishes."""
    log = config.pluginmanager.get_plugin("qatcheck-run-log")
    if log is None or not tables:
        return
    options = config.stash[OPTIONS_KEY]
    record = run_record.record(run_record.run_id(), log.started, session.exitstatus, options.reports_dir,
                               Path(config.rootpath), tables, log.failures)
    config.stash[RUN_KEY] = record
    written, notes = config.stash[PUBLISHED_KEY] = ([], [])
    for what, publish in _publishers(options):
        try:
            publish(record)
            written.append(what)
        except Exception as exc:  # a report is a help; never fail the run over one
            notes.append(f"{what} not written: {type(exc).__name__}: {exc}")


def _publishers(options: Options) -> list:
    """(what, write(record)) for each of the run's publishers."""
    from qatcheck import ci_summary, history, html_report  # cheap: loaded only by a run that publishes

    publishers = [*ci_summary.publishers(options)]
    if options.history_path is not None:
        publishers.append((f"history {options.history_path}",
                           lambda record: history.append(record, options.history_path)))
    if options.html_path is not None:  # after the history: the page's trend then holds this run
        publishers.append((f"HTML report {options.html_path}",
                           lambda record: html_report.write(record, options.html_path, options.history_path)))
    return publishers


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    qs = _session(config, create=False)
    if qs is not None:
        qs.finish()
        if hasattr(config, "workeroutput"):
            config.workeroutput["qatcheck_summary"] = qs.summary.text
            config.workeroutput["qatcheck_baselines_not_written"] = qs.summary.baselines_not_written
            config.workeroutput["qatcheck_tables"] = [dataclasses.asdict(t) for t in qs.summary.tables]
    controller = config.pluginmanager.get_plugin("qatcheck-xdist-controller")
    # a required backend missing, or baselines asked for and not written: the run fails, even
    # with every test green (the summary says why)
    failed = (config.stash.get(MISSING_KEY, []) or (qs is not None and qs.summary.baselines_not_written)
              or (controller is not None and controller.baselines_not_written))
    if failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _publish(config, session, (qs.summary.tables if qs is not None else []) + (controller.tables if controller else []))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    controller = config.pluginmanager.get_plugin("qatcheck-xdist-controller")
    if controller is not None and controller.texts:
        terminalreporter.section("qatcheck")
        for text in sorted(controller.texts):
            terminalreporter.write(text)
    record = config.stash.get(RUN_KEY, None)
    if record is not None and config.stash[OPTIONS_KEY].annotations:  # on stdout, where GitHub reads them
        from qatcheck import ci_summary

        for line in ci_summary.annotations(record, config.rootpath, os.environ.get("GITHUB_WORKSPACE")):
            terminalreporter.write_line(line)
    qs = _session(config, create=False)
    summary = getattr(qs, "summary", None)
    tr = terminalreporter
    if summary is not None and summary.text:
        tr.section("qatcheck")
        tr.write(summary.text)
    for line in config.stash.get(MISSING_KEY, []):
        tr.write_line(f"qatcheck: required backend missing - {line}", red=True, bold=True)
    written, notes = config.stash.get(PUBLISHED_KEY, ([], []))
    if written:  # where the run's page, history and job summary are
        tr.write_line("qatcheck: wrote " + ", ".join(written))
    for note in notes:
        tr.write_line(f"qatcheck: {note}", yellow=True)
