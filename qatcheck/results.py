"""The result cache: a case's measured parts are reused when nothing that determines them changed.

A part (``eval``: metrics, parity and output shapes over the eval set; ``structure``: an int8
artifact's quantizers) is a pure function of its inputs - Bazel's premise for test results. Its key
(:func:`result_key`) holds every one of them:

- the case (recipe, mode, backend, profile point) and the input shape it runs at;
- what the backend executes and on what (``Backend.identity``): the artifact's content digest
  (a torch module: its artifact's cache key and file digest), the runtime's versions, provider and
  device - and the same for the parity reference;
- the eval data's fingerprint (inputs and targets), the task's settings (:func:`task_identity`);
- qatcheck's measuring code (:func:`measuring_code`) and the libraries the metrics run on.

Anything else changes -> another key -> measured again. Latency is never cached (it is a property
of the moment as much as of the inputs). A backend that cannot name what it executes without
building it (``identity`` None: TensorRT, whose engine is the build) is always measured.

Entries are JSON files under ``<cache>/results/``, written atomically (pytest-xdist workers may
write the same key at once: identical content, last one wins); an unreadable entry is a miss.
"""
from __future__ import annotations

import dataclasses
import json
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from qatcheck.cache import cache_key
from qatcheck.fsutil import outside_code_digest, source_digest, write_text_atomic

#: the parts a result may be reused for (qatcheck.measurement.PARTS minus latency)
CACHED_PARTS = ("eval", "structure")

#: qatcheck's modules that judge, record, report or explain, but measure nothing: an edit there
#: keeps every stored result (everything else in the package is measuring code). The built-in
#: recipes (zoo) are keyed by what they build: their model in the artifact, their data's fingerprint.
NOT_MEASURING = ("judges.py", "baselines.py", "report.py", "report_files.py", "plugin.py", "__main__.py",
                 "analysis", "reference_doc.py", "standard.py", "repro.py", "reference_store.py", "zoo",
                 "results.py", "run_record.py", "ci_summary.py", "history.py", "html_report.py", "baselines_diff.py")

#: libraries the metrics are computed with (the runtimes are in each backend's identity)
METRIC_LIBRARIES = ("numpy", "pycocotools")


@lru_cache(maxsize=None)
def measuring_code() -> str:
    """Digest of qatcheck's measuring code: every module of the package but :data:`NOT_MEASURING`
    (a module added later counts as measuring until listed there)."""
    from qatcheck.fsutil import PACKAGE

    skip = {PACKAGE / n for n in NOT_MEASURING}
    files = [p for p in PACKAGE.rglob("*.py")
             if not any(p == s or p.is_relative_to(s) for s in skip)]
    return source_digest(files)


@lru_cache(maxsize=None)
def metric_libraries() -> dict[str, str]:
    out = {}
    for dist in METRIC_LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def code_identity(obj: Any) -> str:
    """A task factory, decoder or other recipe object as a key part: a name string as it is; code
    by its qualified name, plus its file's digest when it is defined outside qatcheck."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return repr(obj)
    target = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
    outside = outside_code_digest(obj)
    state = "" if target is obj else f" {_settings_repr(obj)}"
    return f"{name}{state}" + (f" {outside}" if outside else "")


def _settings_repr(obj: Any) -> str:
    """A configuration object's settings (a dataclass decoder's fields); nothing for other objects
    (their repr may hold an address, or arrays)."""
    if dataclasses.is_dataclass(obj):
        return repr({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    return ""


def task_identity(recipe: Any) -> dict[str, Any]:
    """What of a recipe shapes its task's metrics and parity (qatcheck.tasks.make_task reads these)."""
    from qatcheck.tasks import TASK_FACTORIES

    def factory(name: str) -> str:
        return code_identity(TASK_FACTORIES.get(name))

    return {"task": recipe.task, "factory": factory(recipe.task), "task_output": recipe.task_output,
            "heads": {out: [t, factory(t)] for out, t in sorted(recipe.heads.items())},
            "top_k": list(recipe.top_k), "decoder": code_identity(recipe.decoder),
            "outputs": list(recipe.output_names),
            "input": [recipe.input.name, recipe.input.dtype]}


def result_key(parts: dict[str, Any]) -> str:
    return cache_key({"result": 1, **parts, "code": measuring_code(), "libraries": metric_libraries()})


# ---- (de)serialising a measured part ------------------------------------------------------------

def encode(values: dict[str, Any]) -> dict[str, Any]:
    """A part's measured values (the dict QatcheckSession._measure_* returns) as JSON; a symmetric
    pair with :func:`decode` (notes as a list, the quantization structure as plain objects)."""
    out = dict(values)
    if "notes" in out:
        out["notes"] = list(out["notes"])
    if out.get("structure") is not None:
        s = out["structure"]
        out["structure"] = {"qdq_pairs": s.qdq_pairs,
                            "quantizers": {n: dataclasses.asdict(e) for n, e in s.quantizers.items()}}
    return out


def decode(stored: dict[str, Any]) -> dict[str, Any]:
    out = dict(stored)
    if "notes" in out:
        out["notes"] = tuple(out["notes"])
    if out.get("structure") is not None:
        from qatcheck.quantize.structure import QuantEntry, QuantStructure

        s = out["structure"]
        out["structure"] = QuantStructure({n: QuantEntry(**e) for n, e in s["quantizers"].items()},
                                          int(s["qdq_pairs"]))
    return out


class ResultCache:
    """Stored results under ``root``. ``read=False`` (--qatcheck-remeasure, --qatcheck-no-cache):
    nothing is reused, every result measured is still stored for the next run."""

    def __init__(self, root: str | Path, read: bool = True) -> None:
        self.root = Path(root)
        self.read = read

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str, part: str) -> dict[str, Any] | None:
        if not self.read:
            return None
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
            return decode(entry["values"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, or unreadable: measured again
            return None

    def entries(self) -> list[Path]:
        return sorted(self.root.glob("*.json")) if self.root.is_dir() else []

    def prune(self, *, everything: bool = False, older_than_days: float | None = None) -> list[Path]:
        """Remove stored results: all of them, or those written more than ``older_than_days`` ago
        (an entry is only ever measured again, never wrong: pruning costs time, not correctness)."""
        now, gone = time.time(), []
        for path in self.entries():
            if everything or (older_than_days is not None and (now - path.stat().st_mtime) / 86400 > older_than_days):
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone

    def put(self, key: str, part: str, inputs: dict[str, Any], values: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path(key), json.dumps(
            {"part": part, "inputs": inputs, "values": encode(values)}, sort_keys=True, indent=1,
            default=_plain))


def _plain(value: Any) -> Any:
    """numpy scalars as the Python numbers they hold (a float32 round-trips exactly as a float)."""
    return value.item() if hasattr(value, "item") else str(value)
