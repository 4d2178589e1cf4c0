"""The import contract in pyproject.toml ([tool.importlinter]) holds, and it is a real check: an
import planted from a lower layer up, or a cycle planted between two modules of one layer, breaks it
with import-linter's message naming the import."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on ``root``'s pyproject.toml, importing ``root``'s qatcheck (a subprocess: grimp
    reads the package from sys.path, and the planted copy must shadow the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
                           "sys.exit(c(['--no-cache', '--no-logo', 'pyproject.toml']))"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "qatcheck", tmp_path / "qatcheck", ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    return tmp_path


def test_the_import_contract_holds():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout


def test_an_upward_import_breaks_the_layers(copy):
    """Plant: the foundation's timing module imports the session (run layer), inside a function -
    a deferred import is still a dependency."""
    timing = copy / "qatcheck" / "timing.py"
    timing.write_text(timing.read_text() + "\n\ndef _planted():\n    from qatcheck import session  # noqa\n")
    out = lint(copy)
    assert out.returncode != 0
    assert "qatcheck's layers: imports run only downward BROKEN" in out.stdout, out.stdout
    assert "qatcheck.timing -> qatcheck.session" in out.stdout, out.stdout


def test_a_cycle_within_a_layer_breaks_the_contract(copy):
    """Plant: two foundation modules import each other (layers allow siblings of one layer to
    import each other; the acyclic contract does not allow a loop)."""
    for name, other in (("errors", "fsutil"), ("fsutil", "errors")):
        path = copy / "qatcheck" / f"{name}.py"
        path.write_text(path.read_text() + f"\n\ndef _planted():\n    from qatcheck import {other}  # noqa\n")
    out = lint(copy)
    assert out.returncode != 0
    assert "no import cycles among qatcheck's modules, at any depth BROKEN" in out.stdout, out.stdout
    assert "No cycles are allowed in qatcheck." in out.stdout and ".fsutil" in out.stdout, out.stdout


def test_naming_a_quantizing_library_outside_its_implementation_breaks_the_contract(copy):
    """Plant: an analysis imports ModelOpt itself instead of asking the quantizer table."""
    sens = copy / "qatcheck" / "analysis" / "sensitivity.py"
    sens.write_text(sens.read_text() + "\n\ndef _planted():\n    import modelopt.torch.quantization  # noqa\n")
    out = lint(copy)
    assert out.returncode != 0
    assert "quantizing libraries are imported only by their implementations BROKEN" in out.stdout, out.stdout
    assert "qatcheck.analysis.sensitivity -> modelopt" in out.stdout, out.stdout
