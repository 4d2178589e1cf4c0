"""Latency measured like trtexec: warm up by time, then many timed iterations; report median, p90,
p99, mean and the coefficient of variation. Device-side times (CUDA events) win over wall-clock
when a runner provides them.

The timed loop can stop early: once the median's 95% interval is as tight as the judge needs
(``target_ci_rel``: a fraction of the case's tolerance), more samples would not change a verdict -
they only cost time. Its samples go to pytest-benchmark's fixture so ``--benchmark-json``,
``--benchmark-save`` and ``--benchmark-disable`` keep working.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np



@dataclass
class TimedCall:
    """A prepared inference for the latency loop.

    ``run`` executes once and returns when the result is ready (synchronized). ``device_times`` is
    filled with device-side milliseconds by runners that have them (CUDA events); wall-clock is the
    fallback.
    """

    run: Callable[[], None]
    device_times_ms: list[float] | None = None
    #: which clock ``device_times_ms`` come from (``cuda-events``, ``cuda-graph``); baselines are
    #: only compared under the same clock (it is part of the runner's fingerprint)
    clock: str = ""
    #: why timing deviates from what was asked (e.g. CUDA-graph capture failed); shown in the report
    note: str = ""
    #: why the figure is the host's kernel-launch rate rather than the device's work ("" when it is
    #: the device's): a slowdown measured so is inconclusive, never red (qatcheck.judges.judge_latency)
    host_bound: str = ""


CV_WARNING = 0.025
#: fewest timed iterations when a duration caps the loop (p90 needs a few samples to mean anything)
MIN_ITERATIONS = 20
#: the timed loop is cut into this many consecutive blocks for the median's confidence interval
CI_BLOCKS = 10
#: an adaptive loop looks at its interval first after this many samples (ten blocks of five: fewer,
#: and a block's median is one or two runs), then each time the samples grew by ADAPTIVE_GROWTH -
#: looking rarely keeps the chance of stopping at a lucky moment small
ADAPTIVE_MIN_ITERATIONS = 50
ADAPTIVE_GROWTH = 1.5


def _t95(dof: int) -> float:
    """Two-sided 95% Student t quantile (the medians' and the paired rounds' intervals)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, dof))


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    cv: float
    iterations: int
    batch_size: int
    clock: str  # "cuda-events" | "cuda-graph" | "wall"
    #: relative half-width of the median's 95% confidence interval (see median_ci_rel)
    ci_rel: float = 0.0
    #: the machine-speed probe timed next to the case (Runner.probe), and its CI; see judges
    probe_ms: float | None = None
    probe_ci_rel: float = 0.0
    #: CPU cores' worth of work other processes did while the loop ran (None: not measurable)
    foreign_load: float | None = None
    #: CPUs of the machine the load was measured over (the contention threshold scales with it)
    cpus: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def noisy(self) -> bool:
        return self.cv > CV_WARNING


class CpuLoad:
    """How busy *other* processes kept the CPUs during a block: (all CPUs' busy time - this
    process's CPU time) / wall time, in cores. Why: a busy core slows a model by 1x..14x
    depending on how its runtime waits for threads (PyTorch's OpenMP spins), so no fixed reference
    workload can tell contention from a regression - but the contention itself can be measured."""

    MIN_SECONDS = 0.25

    def __enter__(self) -> "CpuLoad":
        self.load: float | None = None
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, t0 = self._start
        busy1, wall = _busy_seconds(), time.perf_counter() - t0
        # /proc/stat counts in clock ticks (10 ms): a shorter block cannot be measured
        if busy0 is None or busy1 is None or wall < self.MIN_SECONDS:
            return
        self.load = max(0.0, ((busy1 - busy0) - (_own_seconds() - own0)) / wall)


def _busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (/proc/stat; None where there is none)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _HZ


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def median_ci_rel(samples_ms: Sequence[float], blocks: int = CI_BLOCKS) -> float:
    """Relative half-width of a 95% confidence interval for the median latency.

    Why blocks: consecutive iterations are not independent (clocks ramp, caches and other
    processes come and go), so an i.i.d. formula would promise far too much. The loop is cut into
    ``blocks`` consecutive blocks; the spread of the block medians, with Student's t, bounds the
    median - drift within the run widens the interval as it should.
    """
    a = np.asarray(samples_ms, dtype=np.float64)
    k = min(blocks, a.size // 2)
    if k < 2:
        return float("inf")
    meds = np.array([np.median(b) for b in np.array_split(a, k)])
    center = float(np.median(a))
    if center <= 0:
        return float("inf")
    return float(_t95(k - 1) * meds.std(ddof=1) / np.sqrt(k) / center)


def stats_from_samples(samples_ms: Sequence[float], batch_size: int, clock: str) -> LatencyStats:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    mean = float(a.mean())
    return LatencyStats(
        median_ms=float(np.median(a)), mean_ms=mean,
        p90_ms=float(np.percentile(a, 90)), p99_ms=float(np.percentile(a, 99)),
        min_ms=float(a.min()), cv=float(a.std() / mean) if mean > 0 else 0.0,
        iterations=int(a.size), batch_size=batch_size, clock=clock, ci_rel=median_ci_rel(a))


def warm_up(run: Callable[[], None], seconds: float, min_runs: int = 3) -> int:
    """Run until ``seconds`` have passed (and at least ``min_runs`` times): caches, allocators,
    lazy initialisation and clocks settle before anything is timed."""
    n, t0 = 0, time.perf_counter()
    while n < min_runs or time.perf_counter() - t0 < seconds:
        run()
        n += 1
    return n


def rounds_for(iterations: int, duration_s: float | None, seconds_per_call: float,
               min_iterations: int = MIN_ITERATIONS) -> int:
    """How many timed iterations: ``iterations``, or - with ``duration_s`` - as many as fit in that
    time (trtexec's ``--duration``), at least ``min_iterations`` and at most ``iterations``. A
    200 ms model then costs seconds, not minutes, while a 1 ms model still gets all 200 samples."""
    if duration_s is None or seconds_per_call <= 0:
        return iterations
    fit = int(duration_s / seconds_per_call)
    return max(min(iterations, min_iterations), min(iterations, fit))


def measure(call: TimedCall, batch_size: int, iterations: int, warmup_s: float,
            benchmark=None, duration_s: float | None = None,
            target_ci_rel: float | None = None) -> LatencyStats | None:
    """Time ``call``. Returns None when pytest-benchmark is disabled (``--benchmark-disable``).
    ``duration_s`` caps the timed loop's length (see :func:`rounds_for`); ``iterations`` is then the
    maximum. ``target_ci_rel``: stop as soon as the median's 95% interval is that tight (relative
    half-width, :func:`median_ci_rel`; see :func:`collect`)."""
    got = collect(call, iterations, warmup_s, benchmark, duration_s, target_ci_rel)
    return None if got is None else stats_from_samples(got[0], batch_size, got[1])


@contextlib.contextmanager
def gc_paused():
    """No garbage collection inside a timed loop (timeit's rule): a collection is the harness's
    time, not the model's, and it grows with the objects the process holds - a session that has
    just built its artifacts collects slower, and its baselines came out slow."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect(call: TimedCall, iterations: int, warmup_s: float, benchmark=None,
            duration_s: float | None = None, target_ci_rel: float | None = None) -> tuple[list[float], str] | None:
    """The timed loop of :func:`measure`: (per-iteration milliseconds, clock), or None when
    pytest-benchmark is disabled. Device times (CUDA events) win over wall-clock.

    Without ``target_ci_rel`` every one of the ``iterations`` (capped by ``duration_s``) is timed.
    With it the loop stops early once the median's interval is within it - after at least
    ADAPTIVE_MIN_ITERATIONS samples, looking again each time they grew by ADAPTIVE_GROWTH - and
    runs to the same maximum where it never gets there (a noisy machine gets every sample it would
    have had)."""
    with gc_paused():
        return _collect(call, iterations, warmup_s, benchmark, duration_s, target_ci_rel)


def _collect(call: TimedCall, iterations: int, warmup_s: float, benchmark=None,
             duration_s: float | None = None, target_ci_rel: float | None = None) -> tuple[list[float], str] | None:
    t0 = time.perf_counter()
    n = warm_up(call.run, warmup_s)
    iterations = rounds_for(iterations, duration_s, (time.perf_counter() - t0) / n)
    if call.device_times_ms is not None:
        call.device_times_ms.clear()
    if benchmark is not None and getattr(benchmark, "disabled", False):
        benchmark(call.run)
        return None
    if target_ci_rel:
        wall_ms = _until_tight(call, iterations, target_ci_rel)
        if benchmark is not None:
            _hand_to(benchmark, wall_ms)
    elif benchmark is not None:
        benchmark.pedantic(call.run, rounds=iterations, iterations=1, warmup_rounds=0)
        wall_ms = [t * 1e3 for t in benchmark.stats.stats.data]
    else:
        wall_ms = _runs(call, iterations)
    return _times(call, wall_ms)


def _until_tight(call: TimedCall, most: int, target_ci_rel: float) -> list[float]:
    """Wall-clock milliseconds of runs until the median's interval (on the clock the loop reports)
    is within ``target_ci_rel``, or of ``most`` runs."""
    wall: list[float] = []
    look = min(most, ADAPTIVE_MIN_ITERATIONS)
    while True:
        wall += _runs(call, look - len(wall))
        if len(wall) >= most or median_ci_rel(_times(call, wall)[0]) <= target_ci_rel:
            return wall
        look = min(most, max(look + 1, int(look * ADAPTIVE_GROWTH)))


def _hand_to(benchmark, wall_ms: list[float]) -> None:
    """The adaptive loop's samples as pytest-benchmark's rounds (what ``pedantic(rounds=len(wall_ms))``
    would have stored). The fixture's public API times a number of rounds fixed up front, which an
    adaptive loop does not know, so its statistics object is filled directly (``_make_stats``, in
    pytest-benchmark 4 and 5; tests/test_core.py reads the JSON it writes)."""
    stats = benchmark._make_stats(1)
    for ms in wall_ms:
        stats.update(ms / 1e3)
    benchmark._mode = "benchmark.pedantic(...)"  # used: pytest-benchmark warns about an unused fixture


def _runs(call: TimedCall, count: int, seconds: float = 0.0) -> list[float]:
    """Wall-clock milliseconds of ``count`` runs, or of as many as fit in ``seconds`` (at least
    ``count``)."""
    wall, t_end = [], time.perf_counter() + seconds
    while len(wall) < count or time.perf_counter() < t_end:
        t = time.perf_counter()
        call.run()
        wall.append((time.perf_counter() - t) * 1e3)
    return wall


def _times(call: TimedCall, wall_ms: list[float]) -> tuple[list[float], str]:
    """The loop's per-run times and their clock: device times (CUDA events, eager or around a
    CUDA-graph replay) win over wall-clock."""
    if call.device_times_ms:
        return list(call.device_times_ms[-len(wall_ms):]), getattr(call, "clock", None) or "cuda-events"
    return wall_ms, "wall"


#: interleaved rounds of a paired measurement (each: one block of each artifact)
PAIRED_ROUNDS = 10


@dataclass(frozen=True)
class PairedStats:
    """The case's artifact timed against the recorded one, interleaved in one process: ``ratio``
    > 1 means the case is slower. ``half_width`` is the ratio's 95% half-width on the log scale
    (Student's t over the rounds' ratios)."""

    ratio: float
    half_width: float
    rounds: int
    reference: str  # the recorded artifact's digest
    median_ms: float  # the case's artifact, over all rounds
    reference_median_ms: float
    round_ratios: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def extended(self, more: "PairedStats") -> "PairedStats":
        """Both measurements' rounds as one (a re-measurement adds rounds, it does not replace)."""
        return paired_stats(self.round_ratios + more.round_ratios, self.reference,
                            (self.median_ms + more.median_ms) / 2,
                            (self.reference_median_ms + more.reference_median_ms) / 2)


def paired_stats(ratios: Sequence[float], reference: str, median_ms: float,
                 reference_median_ms: float) -> PairedStats:
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    k = logs.size
    half = float(_t95(k - 1) * logs.std(ddof=1) / np.sqrt(k)) if k > 1 else float("inf")
    return PairedStats(float(np.exp(logs.mean())), half, k, reference, median_ms, reference_median_ms,
                       tuple(float(r) for r in ratios))


def paired(call: TimedCall, reference: TimedCall, reference_digest: str, duration_s: float,
           warmup_s: float, rounds: int = PAIRED_ROUNDS) -> PairedStats:
    """Duet timing: ``rounds`` rounds, each a short block of ``call`` and one of ``reference``
    (order alternating, ABBA, so a drift within a round hits both alike); each round gives the
    ratio of the two blocks' medians. Whatever slows the machine during a round - another process,
    a clock change, a noisy neighbour on the host - slows both sides of it, so the ratio keeps only
    what differs between the artifacts."""
    with gc_paused():
        return _paired(call, reference, reference_digest, duration_s, warmup_s, rounds)


def _paired(call: TimedCall, reference: TimedCall, reference_digest: str, duration_s: float,
            warmup_s: float, rounds: int) -> PairedStats:
    warm_up(call.run, warmup_s)
    warm_up(reference.run, warmup_s)
    block = max(duration_s / (2 * rounds), 0.01)
    ratios, mine, theirs = [], [], []
    for r in range(rounds):
        order = (call, reference) if r % 2 == 0 else (reference, call)
        got = {id(c): float(np.median(_block(c, block))) for c in order}
        mine.append(got[id(call)])
        theirs.append(got[id(reference)])
        ratios.append(mine[-1] / theirs[-1])
    return paired_stats(ratios, reference_digest, float(np.median(mine)), float(np.median(theirs)))


def _block(call: TimedCall, seconds: float, min_runs: int = 5) -> list[float]:
    """Per-run milliseconds of ``call`` for about ``seconds`` (device times when it has them)."""
    if call.device_times_ms is not None:
        call.device_times_ms.clear()
    return _times(call, _runs(call, min_runs, seconds))[0]
