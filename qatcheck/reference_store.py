"""Artifacts a latency baseline was recorded from, kept so a later run can time them again.

Why: a latency baseline is a number measured by another process, maybe hours ago, and on a
shared machine the same model moves 10-50% from one process to the next (measured on the GPU
machine's 16 vCPUs: ``benchmarks/LATENCY_GATE.md``) - more than any useful tolerance. When a merge
changes the artifact, the honest question is "is the new artifact slower than the recorded one on
this machine, now?", and it is answered by timing both in the same process, interleaved
(duet benchmarking). That needs the recorded artifact: this store keeps it.

Files are content-addressed (``<digest><suffix>``) and written once; a file whose content no longer
matches its name is never used (and never overwritten in place: it is replaced atomically by the
next recording of that digest). Keep the directory between CI runs (it holds a few ONNX files).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from qatcheck.fsutil import atomic_path, file_digest


class ReferenceStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, digest: str, suffix: str = ".onnx") -> Path:
        return self.root / f"{digest}{suffix}"

    def put(self, src: str | Path, digest: str) -> Path:
        """Keep ``src`` (whose content has ``digest``) unless an intact copy is already there."""
        dst = self.path(digest, Path(src).suffix)
        if self.get(digest, Path(src).suffix) is None:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        return dst

    def get(self, digest: str, suffix: str = ".onnx") -> Path | None:
        """The stored artifact, or None when it is absent or its content is not ``digest``."""
        p = self.path(digest, suffix)
        try:
            return p if file_digest(p, len(digest)) == digest else None
        except OSError:
            return None
