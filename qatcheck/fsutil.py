"""Atomic file writes: an interrupted run never leaves a half-written baseline, report or artifact."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


#: a writer's temp file next to its target: ``.<name>.<8 random characters of mkstemp>.tmp``
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
#: a temp file younger than this is never taken for an orphan (its writer may not hold its lock yet)
ORPHAN_GRACE_S = 60.0


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    The writer holds an ``flock`` on its temp file until it is done: the kernel drops it when the
    writer dies, so a temp file nobody holds is the orphan of a killed writer (``kill -9``), which
    :func:`remove_orphans` may delete, while a live writer's is never touched."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # mkstemp makes the file private (0600); baselines and reports are shared files, so give
        # the result the permissions a plain open() would (0666 minus the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


def remove_orphans(root: str | Path, grace_s: float = ORPHAN_GRACE_S) -> list[Path]:
    """Delete the temp files under ``root`` whose writer died (see :func:`atomic_path`): those no
    process holds a lock on, untouched for ``grace_s`` seconds. Returns what was removed."""
    import fcntl
    import time

    gone = []
    now = time.time()
    for tmp in sorted(Path(root).rglob(".*.tmp")) if Path(root).is_dir() else ():
        if not TEMP_NAME.fullmatch(tmp.name):
            continue  # not a name atomic_path gives: not ours
        try:
            if now - tmp.stat().st_mtime < grace_s:
                continue
            with open(tmp, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's
                tmp.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        gone.append(tmp)
    return gone


@contextlib.contextmanager
def locked(lock_file: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``lock_file`` for the ``with`` block: processes
    sharing a cache or a reports directory take turns; the kernel drops it if a holder dies."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_digest(path: str | Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


#: the qatcheck package: source_digest's relative items are inside it
PACKAGE = Path(__file__).resolve().parent


def source_digest(items: Iterable[str | Path]) -> str:
    """Digest of source files: ``items`` are paths inside the qatcheck package (a folder means
    every ``.py`` under it) or absolute paths. What cached artifacts and results depend on when
    code computed them (a local edit changes it; a version number would not)."""
    files: set[Path] = set()
    for item in items:
        p = PACKAGE / item
        files.update(p.rglob("*.py") if p.is_dir() else [p])
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(PACKAGE) if f.is_relative_to(PACKAGE) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def outside_code_digest(obj: object) -> str | None:
    """The digest of the file that defines ``obj`` (a function, a class, or an instance's class)
    when that file lies outside qatcheck - a user's quantizer, task or decoder, whose edit must
    invalidate what it made; None for qatcheck's own code (keyed by its source elsewhere) and
    for objects without a file (a REPL's, a builtin)."""
    import inspect

    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj) else type(obj)
    try:
        src = Path(inspect.getsourcefile(target) or "").resolve()
    except TypeError:
        return None
    if not src.is_file() or src.is_relative_to(PACKAGE):
        return None
    return source_digest([src])


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system: glibc keeps them, so a process that freed
    a recipe's arrays, or a build's temporaries, would still hold them when its next peak comes
    (malloc_trim; nothing where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
