"""The measurement record and the case it belongs to.

One record per (recipe, mode, backend, shape). Assertions, baselines, the report and the JSON all
read these records; nothing downstream recomputes a number.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qatcheck.timing import LatencyStats


@dataclass(frozen=True, order=True)
class Case:
    recipe: str
    mode: str
    backend: str
    shape: str = "opt"  # "min" | "opt" | "max" (only the dynamic mode has other than opt)

    @property
    def key(self) -> str:
        """Baseline key within the recipe's file, e.g. ``torch_ptq-onnxruntime``."""
        mode = self.mode if self.shape == "opt" and self.mode != "dynamic" else f"{self.mode}_{self.shape}"
        return f"{mode}-{self.backend}"

    @property
    def id(self) -> str:
        """Test id, e.g. ``digits-torch_ptq-onnxruntime``."""
        return f"{self.recipe}-{self.key}"

    def with_mode(self, mode: str, backend: str | None = None) -> "Case":
        shape = self.shape if mode == "dynamic" else "opt"
        return Case(self.recipe, mode, backend or self.backend, shape)


@dataclass
class Measurement:
    case: Case
    calibrator: str = ""
    device: str = ""
    shape: tuple[int, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] | None = None
    parity_reference: str = ""
    latency: LatencyStats | None = None
    fingerprint: dict[str, str] | None = None
    fingerprint_id: str = ""
    artifact: str = ""
    eval_samples: int = 0
    eval_seconds: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)
    #: what a reader of the table should know (timing fell back to eager events, fake-quant
    #: latency on a CPU provider, a noisy machine); printed under the table and kept in the JSON
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        vals = set(self.outcomes.values())
        if "failed" in vals:
            return "FAIL"
        if "passed" in vals:
            return "pass"
        return "skip" if vals else "-"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["case"] = {**asdict(self.case), "id": self.case.id, "key": self.case.key}
        d["latency"] = self.latency.to_dict() if self.latency else None
        d["verdict"] = self.verdict
        return d
