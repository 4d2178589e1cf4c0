"""Artifact cache: exports, calibrated models, Q/DQ ONNX files and QAT checkpoints are built once.

The key is a hash of everything that determines the artifact (weights digest, recipe settings,
mode, data fingerprints, library versions); a second run with nothing changed builds nothing.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("qatcheck", "torch", "onnx", "onnxruntime", "pytorch-quantization"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class ArtifactCache:
    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self.built: list[str] = []
        self.reused: list[str] = []

    def get_or_build(self, name: str, parts: dict[str, Any], suffix: str,
                     build: Callable[[Path], None]) -> Path:
        """Return the cached file for (name, parts), building it with ``build(path)`` if absent.

        ``build`` must write ``path`` atomically (qatcheck's builders do), so an interrupted build
        never leaves a file that looks complete.
        """
        key = cache_key({"artifact": name, **parts})
        path = self.root / f"{name}-{key}{suffix}"
        if self.enabled and path.exists():
            self.reused.append(path.name)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        build(path)
        (self.root / f"{name}-{key}.json").write_text(
            json.dumps({"artifact": name, **parts}, sort_keys=True, indent=1, default=str))
        self.built.append(path.name)
        return path

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
