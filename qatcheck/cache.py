"""Artifact cache: exports, calibrated models, Q/DQ ONNX files and QAT checkpoints are built once.

The key is a hash of everything that determines the artifact (weights digest, the model's code,
qatcheck's build code, the settings the mode uses, data fingerprints, library versions); a second
run with nothing changed builds nothing. Each entry is a file plus a manifest
(``<name>-<key>.json``: what went into the key, the file's size and digest). A file is used only
when it matches its manifest: a truncated or replaced file is rebuilt, with a note. Building holds
a per-key lock, so two processes never build one artifact at once (the second reuses the first's);
a rebuild replaces an entry only once the new file is complete.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from qatcheck.fsutil import file_digest, locked, remove_orphans, trim_heap, write_text_atomic

DIGEST_LENGTH = 32


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact (qatcheck's own code is keyed by its
    source: qatcheck.artifacts.build_code_digest)."""
    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "pytorch-quantization"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class Entry:
    """One cached artifact as ``python -m qatcheck cache list`` shows it."""

    path: Path
    manifest: Path
    size: int
    age_days: float
    problem: str | None  # None: intact


class ArtifactCache:
    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        #: False (--qatcheck-no-cache): build every artifact afresh (the new file replaces the entry)
        self.enabled = enabled
        self.built: set[str] = set()
        self.reused: set[str] = set()
        #: seconds spent building, this session (the per-case cost accounting reads it)
        self.build_seconds = 0.0
        #: what was wrong with entries that had to be rebuilt (shown under the table)
        self.notes: list[str] = []
        #: file -> its manifest, for every entry this cache handed out (ArtifactCache.info)
        self._manifests: dict[Path, Path] = {}
        #: temp files of writers that died (kill -9) mid-write, removed on opening and by prune
        self.orphans: list[Path] = remove_orphans(self.root)
        if self.orphans:
            self.notes.append(f"removed {len(self.orphans)} temp file(s) under {self.root} left by writers "
                              "that died mid-write")

    def get_or_build(self, name: str, parts: dict[str, Any], suffix: str,
                     build: Callable[[Path], None]) -> Path:
        """Return the cached file for (name, parts), building it with ``build(path)`` if absent or
        damaged. ``build`` must write ``path`` atomically (qatcheck's builders do): the old entry
        stays until the new file is complete. What ``build`` returns (a JSON-able dict: what was
        kept, folded...) is kept in the manifest and read back by :meth:`info`, built or reused."""
        key = cache_key({"artifact": name, **parts})
        path = self.root / f"{name}-{key}{suffix}"
        manifest = self.root / f"{name}-{key}.json"
        self._manifests[path] = manifest
        with self._lock(f"{name}-{key}"):
            problem = verify(path, manifest)
            if self.enabled and problem is None:
                if path.name not in self.built:
                    self.reused.add(path.name)
                return path
            if self.enabled and problem != "absent":
                self.notes.append(f"cache entry {path} {problem}: rebuilt")
            trim_heap()  # a build (calibration, QAT) allocates most: start it from the smallest heap
            start = time.perf_counter()
            try:
                info = build(path)
            finally:
                self.build_seconds += time.perf_counter() - start
            if not path.is_file():
                raise RuntimeError(f"the builder of {name} wrote no {path}")
            write_text_atomic(manifest, json.dumps(
                {"artifact": name, "file": path.name, "size": path.stat().st_size,
                 "digest": file_digest(path, DIGEST_LENGTH), "parts": parts,
                 "info": info if isinstance(info, dict) else {}},
                sort_keys=True, indent=1, default=str))
            self.built.add(path.name)
            self.reused.discard(path.name)
        return path

    def recorded_digest(self, name: str, parts: dict[str, Any], suffix: str) -> str | None:
        """The digest of the intact entry :meth:`get_or_build` would return for (name, parts),
        without building it; None when there is none (never built, or damaged: it is rebuilt on
        its next use)."""
        key = cache_key({"artifact": name, **parts})
        path, manifest = self.root / f"{name}-{key}{suffix}", self.root / f"{name}-{key}.json"
        if not self.enabled or verify(path, manifest) is not None:
            return None
        return json.loads(manifest.read_text(encoding="utf-8"))["digest"]

    def entry_digest(self, path: Path) -> str | None:
        """The recorded digest of ``path`` when it is an intact entry of this cache (a reproduction
        bundle references it by path and digest instead of copying it); None otherwise."""
        path = Path(path)
        manifest = self._manifests.get(path, path.parent / f"{path.name.split('.')[0]}.json")
        if path.parent.resolve() != self.root.resolve() or verify(path, manifest) is not None:
            return None
        return json.loads(manifest.read_text(encoding="utf-8"))["digest"]

    def info(self, path: Path) -> dict:
        """What the builder of ``path`` (a file :meth:`get_or_build` returned) said about it, from
        its manifest ({} when it said nothing)."""
        try:
            info = json.loads(self._manifests[Path(path)].read_text(encoding="utf-8")).get("info")
        except (KeyError, OSError, ValueError, AttributeError):
            return {}
        return info if isinstance(info, dict) else {}

    def _lock(self, key: str):
        return locked(self.root / ".locks" / f"{key}.lock")

    def entries(self) -> list[Entry]:
        out = []
        now = time.time()
        for manifest in sorted(self.root.glob("*.json")):
            try:
                file = json.loads(manifest.read_text(encoding="utf-8")).get("file")
            except (OSError, ValueError, AttributeError):
                file = None
            if not isinstance(file, str):
                continue  # not a manifest (a sensitivity profile is a .profile.json artifact)
            path = self.root / file
            size = path.stat().st_size if path.is_file() else 0
            out.append(Entry(path, manifest, size, (now - manifest.stat().st_mtime) / 86400,
                             verify(path, manifest)))
        return out

    def prune(self, *, everything: bool = False, older_than_days: float | None = None) -> list[Entry]:
        """Remove damaged entries, and with ``everything`` or ``older_than_days`` intact ones too;
        and the temp files of writers that died (added to ``orphans``)."""
        self.orphans += remove_orphans(self.root)
        gone = []
        for e in self.entries():
            if everything or e.problem or (older_than_days is not None and e.age_days > older_than_days):
                with self._lock(e.manifest.stem):
                    e.path.unlink(missing_ok=True)
                    e.manifest.unlink(missing_ok=True)
                gone.append(e)
        return gone


def verify(path: Path, manifest: Path) -> str | None:
    """None when ``path`` is the file its manifest describes; otherwise what is wrong ("absent"
    when there is no entry at all)."""
    if not path.exists():
        return "absent" if not manifest.exists() else "lost its file"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "has no readable manifest"
    if not isinstance(info, dict) or "digest" not in info:
        return "has no recorded digest (written by an older qatcheck)"
    size = path.stat().st_size
    if size != info.get("size"):
        return f"is {size} bytes, its manifest says {info.get('size')} (truncated or replaced)"
    if file_digest(path, DIGEST_LENGTH) != info["digest"]:
        return "does not match its recorded digest (changed since it was built)"
    return None


def adopt(path: Path) -> None:
    """Accept ``path``'s current content as the entry (a deliberate hand edit of a cached artifact,
    or a test planting a broken one): its manifest records the new size and digest. A file changed
    without this is rebuilt on its next use."""
    manifest = path.parent / f"{path.name.split('.')[0]}.json"
    info = json.loads(manifest.read_text(encoding="utf-8"))
    info.update(size=path.stat().st_size, digest=file_digest(path, DIGEST_LENGTH))
    write_text_atomic(manifest, json.dumps(info, sort_keys=True, indent=1, default=str))
