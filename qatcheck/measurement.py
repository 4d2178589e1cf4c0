"""The records that flow through a session: the case, its measurement, and the verdicts on it.

One :class:`Measurement` per (recipe, mode, backend, shape). Judges, the recorder, the report and
the JSON all read these records; nothing downstream recomputes or mutates a number (they are
frozen: a later part of a measurement - latency after accuracy - makes a new record).

This module is imported by the pytest plugin, so it imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from qatcheck.baselines import Update
    from qatcheck.timing import LatencyStats

#: the parts a measurement can hold: ``eval`` (metrics over the eval set and parity against the
#: case's reference), ``latency`` and ``structure`` (an int8 artifact's quantizers and scales); a
#: run measures only the parts its selected checks need
PARTS = ("eval", "latency", "structure")


@dataclass(frozen=True, order=True)
class Case:
    recipe: str
    mode: str
    backend: str
    #: "" = the mode's static build at the recipe's shape; "min" / "opt" / "max" = its dynamic-axes
    #: build measured at that point of InputSpec.dynamic's profile
    shape: str = ""

    @property
    def dynamic(self) -> bool:
        return bool(self.shape)

    @property
    def key(self) -> str:
        """Baseline key within the recipe's file, e.g. ``torch_ptq-onnxruntime``, ``trt_ptq_max-tensorrt``."""
        mode = f"{self.mode}_{self.shape}" if self.shape else self.mode
        return f"{mode}-{self.backend}"

    @property
    def id(self) -> str:
        """Test id, e.g. ``digits-torch_ptq-onnxruntime``."""
        return f"{self.recipe}-{self.key}"

    @property
    def point(self) -> str:
        """The profile point whose input shape the case runs at (static builds run at opt)."""
        return self.shape or "opt"

    def with_mode(self, mode: str, backend: str | None = None, keep_shape: bool = False) -> "Case":
        """The same recipe in another mode (and backend). The shape is kept with ``keep_shape`` (a
        dynamic case's reference runs at the same shape); otherwise the other mode's static case."""
        return Case(self.recipe, mode, backend or self.backend, self.shape if keep_shape else "")


@dataclass(frozen=True)
class Measurement:
    case: Case
    calibrator: str = ""
    device: str = ""
    shape: tuple[int, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] | None = None
    #: per output name: cosine / max_abs / mean_abs against the reference
    output_parity: dict[str, dict[str, float]] | None = None
    #: per output name: its per-sample shape (the batch dimension dropped)
    output_shapes: dict[str, list[int]] | None = None
    parity_reference: str = ""
    latency: "LatencyStats | None" = None
    fingerprint: dict[str, str] | None = None
    fingerprint_id: str = ""
    artifact: str = ""
    eval_samples: int = 0
    eval_seconds: float = 0.0
    #: the eval data's fingerprint (a baseline recorded on other data says so)
    eval_fingerprint: str = ""
    #: ... of its inputs alone (data.base.inputs_fingerprint), and the digest of the targets the
    #: metric read (data.base.TargetsDigest): the baseline's message says which of them changed
    eval_inputs: str = ""
    eval_targets: str = ""
    #: what shaped the case's artifact (ArtifactBuilder.settings: its mode row's key_fields,
    #: readable); a baseline keeps them so a failure names the setting that changed
    settings: dict[str, Any] | None = None
    #: NaN / inf values among this case's outputs (inputs are checked before any model runs)
    nonfinite_outputs: int = 0
    #: eval samples with at least one NaN / inf output value
    nonfinite_samples: int = 0
    #: int8 cases: qatcheck.quantize.structure.QuantStructure of what was measured
    structure: Any = None
    #: how many times the latency loop ran (re-measured when the first looked slower), and each
    #: attempt's median (relative to its probe, when timed); the judge uses the fastest attempt
    #: and counts the spread between them as noise
    latency_attempts: int = 0
    #: why nothing was timed, when nothing was (pytest-xdist workers sharing a device)
    latency_skipped: str = ""
    #: why the timed figure is the host's launch rate (cuda_timing.HOST_BOUND); "" when it is not
    latency_host_bound: str = ""
    latency_attempt_medians: tuple[float, ...] = ()
    #: the digest of the artifact that was timed, where a later run can time it again beside its
    #: own (qatcheck.reference_store); "" for backends that cannot
    latency_artifact: str = ""
    #: this run's artifact timed against the baseline's recorded artifact, interleaved (a
    #: timing.PairedStats), when the artifact changed since the baseline and the recorded one is kept
    latency_paired: Any = None
    #: which PARTS this record holds
    parts: frozenset = frozenset()
    #: the PARTS reused from the result cache (qatcheck.results): measured by an earlier run on
    #: the same inputs
    reused: frozenset = frozenset()
    #: seconds this session spent on the case: per part measured (``eval``, ``latency``,
    #: ``structure``; a reused part's lookup) and ``build`` (artifacts built while measuring it)
    seconds: dict[str, float] = field(default_factory=dict)
    #: what a reader of the table should know (timing fell back to eager events, fake-quant
    #: latency on a CPU provider, a noisy machine); printed under the table and kept in the JSON
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["case"] = {**asdict(self.case), "id": self.case.id, "key": self.case.key}
        d["latency"] = self.latency.to_dict() if self.latency else None
        d["latency_paired"] = self.latency_paired.to_dict() if self.latency_paired else None
        d["parts"] = sorted(self.parts)
        d["reused"] = sorted(self.reused)
        d["notes"] = list(self.notes)
        if self.structure is not None:
            from qatcheck.quantize.structure import to_entries

            d["structure"] = to_entries(self.structure)
        return d


@dataclass(frozen=True)
class Verdict:
    """A judge's finding on one check of one case: pass, fail or skip, with the messages that say
    why, and the values the recorder may store (``--update-baselines``)."""

    check: str
    case: Case
    #: pass | fail | skip | improved (passes, with a note) | inconclusive (noise larger than the
    #: tolerance: reported, not red) | retry (the session re-measures before a final verdict)
    status: str = "pass"
    failures: tuple[str, ...] = ()
    reason: str = ""  # why skipped
    notes: tuple[str, ...] = ()
    updates: "tuple[Update, ...]" = ()
    #: what changed since the baseline was recorded that explains the failures (the eval data, a
    #: recipe setting): the first lines of ``failures``, which the plugin prints in full once per
    #: session (the other failures they explain point to that one)
    causes: tuple[str, ...] = ()
    #: the eval data changed since the baseline: the failure is the data's as much as the model's,
    #: and replaying the model on its inputs (a reproduction bundle) would show nothing
    data_changed: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def skipped(self) -> str | None:
        return self.reason if self.status == "skip" else None


def overall(statuses: Any) -> str:
    """One word for a case in the table, from its tests' outcomes and its verdicts."""
    vals = set(statuses)
    if {"failed", "fail"} & vals:
        return "FAIL"
    for word in ("inconclusive", "improved"):
        if word in vals:
            return word
    if {"passed", "pass"} & vals:
        return "pass"
    return "skip" if vals else "-"
