"""The size of a reproduction bundle (qatcheck/repro.py) of the built-in detector, the figures in
docs/analysis.md: ``python benchmarks/repro_bundle_size.py CACHE REPORTS [recipe]``.

Writes the bundle of ``<recipe>-trt_ptq-onnxruntime`` (default recipe: detection_recipe, digitdet)
without a failure (``repro.write`` is what a failing parity check calls) and lists its files. A
CACHE under the system's temp directory gives the copied form (the model in the bundle); one
elsewhere (``~/.cache/...``) the referenced form (the model named by path and digest)."""
from __future__ import annotations

import sys
from pathlib import Path

from qatcheck import repro
from qatcheck.measurement import Case
from qatcheck.options import Options
from qatcheck.session import QatcheckSession
from qatcheck.zoo import recipes


def main(cache: str, reports: str, recipe: str = "detection_recipe") -> None:
    session = QatcheckSession(Options(cache_dir=Path(cache), reports_dir=Path(reports), progress=False))
    r = getattr(recipes, recipe)(modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=())
    session.register(r)
    bundle = repro.write(session.case_view(Case(r.name, "trt_ptq", "onnxruntime")), "parity")
    print(bundle.command)
    print(bundle.polygraphy_verdict)
    total = 0
    for f in sorted(p for p in bundle.path.rglob("*") if p.is_file()):
        print(f"{f.stat().st_size:>10}  {f.name}")
        total += f.stat().st_size
    print(f"{total:>10}  total ({'model referenced' if bundle.referenced else 'model copied'})")


if __name__ == "__main__":
    main(*sys.argv[1:])
