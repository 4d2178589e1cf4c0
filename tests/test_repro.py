"""A failing parity case (issue 13) names the layer where the damage enters (localization, run
automatically) and writes reports/repro/<case>/ with one `polygraphy run` command; the command, run
outside pytest, fails on the planted artifact and passes on the clean one."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from qatcheck.quantize import onnx_ptq

pytest.importorskip("polygraphy")

# a per-output floor for another mode (fp16): trt_ptq's floor and Polygraphy's threshold stay 0.98
SUITE = '''
import pytest
from qatcheck.recipe import Tolerances
from qatcheck.standard import test_parity  # noqa: F401
from qatcheck.zoo import recipes
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=(),
    tolerances=Tolerances(output_min_cosine={"fp16": {"logits": 0.5}})))
'''
PLANT = "/layer1/relu1/Relu_output_0"  # layer1.conv2's input quantizer


def _run(pytester, cache, *args):
    return pytester.runpytest("-p", "no:cacheprovider", "--qatcheck-cache", str(cache),
                              "--qatcheck-baselines", str(pytester.path / "baselines"),
                              "--qatcheck-reports", str(pytester.path / "reports"), "--qatcheck-no-progress",
                              "--benchmark-disable", "-k", "trt_ptq", *args)


def _polygraphy(command: str) -> list[str]:
    """The bundle's command, its ``polygraphy`` the one installed beside this Python (the venv's,
    also when it is not activated)."""
    argv = shlex.split(command)
    beside = Path(sys.executable).parent / argv[0]
    return [str(beside) if beside.exists() else argv[0], *argv[1:]]


def test_a_failing_parity_case_leaves_a_polygraphy_command_that_reproduces_it(pytester):
    pytester.makepyfile(test_digits=SUITE)
    assert _run(pytester, pytester.path / "clean-cache", "--update-baselines").ret == 0
    assert not (pytester.path / "reports" / "repro").exists()  # nothing failed: no bundle

    quantize_onnx = onnx_ptq.quantize_onnx

    def planted(model_path, out_path, *args, **kwargs):  # one activation scale x64
        res = quantize_onnx(model_path, out_path, *args, **kwargs)
        onnx_ptq.scale_qdq(out_path, out_path, PLANT, 64.0)
        return res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_ptq, "quantize_onnx", planted)
        result = _run(pytester, pytester.path / "planted-cache")
    assert result.ret == 1
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*digits-trt_ptq-onnxruntime parity check failed:*",
                                 "*localize digits trt_ptq (32 samples, floor cosine 0.98): damage enters at "
                                 "layer1.conv2 *",
                                 "*per-layer table: *digits-localize-trt_ptq.md*",
                                 "*Polygraphy's cosine comparison fails on the bundle: output 'logits' below 0.98 "
                                 "in 1/1 batches (lowest cosine 0.*",
                                 "*reproduce outside pytest: polygraphy run *model.onnx --onnxrt*"])
    command = next(ln.split("reproduce outside pytest: ", 1)[1] for ln in out.splitlines()
                   if "reproduce outside pytest: " in ln)
    bundle = pytester.path / "reports" / "repro" / "digits-trt_ptq-onnxruntime"
    settings = json.loads((bundle / "settings.json").read_text())
    # one batch of the worst samples (digits' batch is 32), not four whole eval batches
    assert settings["reference"] == "digits-fp32-torch" and len(settings["samples"]) == 32
    assert min(settings["sample_cosines"]) < settings["cosine_threshold"]
    assert settings["model_copied"]  # the cache is under the temp directory: copied, not referenced
    assert settings["polygraphy_reproduces"] and settings["backend_args"] == ["--onnxrt"]
    assert settings["output_cosine_thresholds"] == {"": 0.98} and command.endswith("--cosine-similarity-threshold 0.98")

    replay = subprocess.run(_polygraphy(command), capture_output=True, text=True, timeout=300)
    assert replay.returncode != 0, replay.stdout + replay.stderr
    assert "FAILED" in replay.stdout + replay.stderr

    # the report says why the row is red, with where the damage enters and the command
    md = (pytester.path / "reports" / "digits.md").read_text()
    failures = md.split("## Failures", 1)[1]
    assert "- **digits-trt_ptq-onnxruntime** parity: " in failures
    assert "damage enters at layer1.conv2" in failures and f"reproduce outside pytest: `{command}`" in failures

    # the same command on the clean artifact passes: the bundle reproduces the failure, not noise
    [clean] = (pytester.path / "clean-cache").glob("digits-trt_ptq-*.onnx")
    shutil.copyfile(clean, bundle / "model.onnx")
    assert onnx.load(str(bundle / "model.onnx"))
    replay = subprocess.run(_polygraphy(command), capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def test_polygraphy_comparator_verdict_per_output_floor():
    """The in-process check runs Polygraphy's own comparator with the case's per-output floors:
    it names the output below its floor, and says so when the bundle's batches would pass."""
    import numpy as np

    from qatcheck import repro

    names = ["boxes", "scores"]
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)]
           for _ in range(3)]
    drift = [[b, s + 0.9 * rng.standard_normal(s.shape).astype(np.float32)] for b, s in ref]
    thresholds = repro.cosine_thresholds(0.98, {"scores": 0.5, "unused": 0.1}, names)
    assert thresholds == {"": 0.98, "scores": 0.5}
    passed, line = repro.polygraphy_compare(names, ref, drift, thresholds)
    assert passed and "will not reproduce" in line  # 'scores' drifts but stays above its own floor
    passed, line = repro.polygraphy_compare(names, ref, drift, {"": 0.98})
    assert not passed and "output 'scores' below 0.98 in 3/3 batches" in line and "'boxes'" not in line


def test_a_bundle_references_a_kept_cache_entry_by_digest_and_says_so_when_it_is_gone(tmp_path, monkeypatch):
    """Where the artifact cache is kept (not under the temp directory), the bundle records the
    artifact's cache path and digest instead of a copy, its command runs that file, and repro.sh
    stops with the path and digest once the entry is pruned."""
    from qatcheck import repro
    from qatcheck.measurement import Case
    from qatcheck.options import Options
    from qatcheck.session import QatcheckSession
    from qatcheck.zoo.recipes import digits_recipe

    session = QatcheckSession(Options(cache_dir=tmp_path / "cache", reports_dir=tmp_path / "reports", progress=False))
    session.register(digits_recipe(modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=()))
    view = session.case_view(Case("digits", "trt_ptq", "onnxruntime"))
    assert repro.cached_artifact(view, view.runner.artifact_path) is None  # tmp_path is temporary: a copy
    monkeypatch.setattr(repro, "temporary_roots", lambda: [])  # as if the cache were kept
    bundle = repro.write(view, "parity")
    settings = json.loads((bundle.path / "settings.json").read_text())
    entry = Path(settings["model"])
    assert not (bundle.path / "model.onnx").exists() and not settings["model_copied"]
    assert entry.parent == (tmp_path / "cache").resolve() and len(settings["model_digest"]) == 32
    assert shlex.split(bundle.command)[2] == str(entry) and bundle.referenced
    assert "its model is the artifact cache entry, not a copy" in bundle.message_lines()[-1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its polygraphy
    replay = subprocess.run(["sh", str(bundle.path / "repro.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert replay.returncode == 0 and "PASSED" in replay.stdout + replay.stderr, replay.stdout + replay.stderr

    session.cache.prune(everything=True)  # `python -m qatcheck cache prune --all`
    replay = subprocess.run(["sh", str(bundle.path / "repro.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert replay.returncode == 2
    assert f"the model {entry} (sha256 {settings['model_digest']}...) is gone" in replay.stderr
