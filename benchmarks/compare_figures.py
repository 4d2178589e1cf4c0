"""Are two runs' figures identical? Compares the per-case figures of two reports directories (the
JSON each suite writes): metrics, parity (overall and per output), quantization structure, artifact
digests, eval fingerprints, the checks' statuses. Latency is not compared (it is a measurement of the machine).

    python benchmarks/compare_figures.py BEFORE_REPORTS AFTER_REPORTS

Exits 1 and lists every difference when any figure differs; prints the count of compared cases."""
from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = ("metrics", "parity", "output_parity", "structure", "artifact", "eval_fingerprint",
          "eval_samples", "calibrator", "parity_reference", "checks")
#: checks whose status is compared (latency's is the machine's)
CHECKS = ("accuracy", "parity", "structure", "precision")


def figures(reports: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(reports.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "cases" not in data:
            continue  # a localize / sensitivity report
        for rec in data["cases"]:
            figs = {f: rec.get(f) for f in FIELDS}
            figs["checks"] = {c: (v or {}).get("status") for c, v in (rec.get("checks") or {}).items() if c in CHECKS}
            out[rec["case"]["id"]] = figs
    return out


def main(before: str, after: str) -> int:
    a, b = figures(Path(before)), figures(Path(after))
    diffs = [f"{case}: only in {before if case in a else after}" for case in sorted(set(a) ^ set(b))]
    for case in sorted(set(a) & set(b)):
        diffs += [f"{case} {f}: {a[case][f]!r} -> {b[case][f]!r}" for f in FIELDS if a[case][f] != b[case][f]]
    print(f"{len(set(a) & set(b))} cases compared ({len(a)} before, {len(b)} after); "
          f"{len(diffs)} differences")
    print("\n".join(diffs))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
