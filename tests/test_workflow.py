"""The example GPU workflow (.github/workflows/gpu.yml) is linted by a real workflow linter,
actionlint (the test extra installs it), so a typo in a key or an expression fails CI here rather
than the first run on a GPU runner. Planted: a broken copy is rejected, the message naming it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
#: the venv's own (pip install -e '.[test]'), else one on PATH
ACTIONLINT = shutil.which("actionlint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                              os.environ.get("PATH", "")]))
pytestmark = pytest.mark.skipif(ACTIONLINT is None, reason="actionlint not installed (pip install -e '.[test]')")


def actionlint(root: Path, *files: Path) -> subprocess.CompletedProcess:
    """actionlint on ``files`` with ``root``'s .github/actionlint.yaml (the runner's labels).
    Its shellcheck and pyflakes passes are off: they run only where those tools happen to be
    installed, and the verdict must be the same on every machine."""
    return subprocess.run([ACTIONLINT, "-no-color", "-oneline", "-shellcheck=", "-pyflakes=",
                           "-config-file", str(root / ".github" / "actionlint.yaml"), *map(str, files)],
                          cwd=root, capture_output=True, text=True, timeout=120)


def test_the_workflows_pass_actionlint():
    assert WORKFLOWS, "no workflow in .github/workflows"
    result = actionlint(ROOT, *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("good, bad, named", [
    ("timeout-minutes: 60", "timeout-minute: 60", 'unexpected key "timeout-minute" for "job" section'),
    ("${{ inputs.update_baselines }}", "${{ inputs.update_baseline }}", 'property "update_baseline" is not defined'),
    ("gpu-${{ github.ref }}", "gpu-${{ github.ref == }}", "unexpected end of input while parsing"),
])
def test_a_broken_workflow_is_rejected_naming_what_is_wrong(tmp_path, good, bad, named):
    shutil.copytree(ROOT / ".github", tmp_path / ".github")
    workflow = tmp_path / ".github" / "workflows" / "gpu.yml"
    text = workflow.read_text()
    assert good in text  # planted into the real workflow
    workflow.write_text(text.replace(good, bad, 1))
    result = actionlint(tmp_path, workflow)
    assert result.returncode == 1, result.stdout + result.stderr
    assert named in result.stdout and "gpu.yml:" in result.stdout, result.stdout
