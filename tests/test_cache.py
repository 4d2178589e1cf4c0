"""The artifact cache never serves a stale or damaged artifact (issue 11): keys hold everything that
shapes an artifact and nothing else, entries are verified on use, builds are locked and replace an
entry only once complete."""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from qatcheck.__main__ import main as cli
from qatcheck.artifacts import ArtifactBuilder, RecipeState
from qatcheck.cache import ArtifactCache
from qatcheck.modes import MODE_SPECS, spec
from qatcheck.zoo.digits_net import DIGITS_CHECKPOINT, DigitsNet, load_digits_net
from qatcheck.zoo.recipes import digits_recipe

BUILT_MODES = ("fp32", "fp16", "trt_ptq", "partial", "torch_ptq", "qat")


class DoubledDigitsNet(DigitsNet):
    """Same weights, another forward(): what a refactor that changes the model's output does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def doubled() -> DigitsNet:
    m = DoubledDigitsNet()
    m.load_state_dict(load_digits_net(DIGITS_CHECKPOINT).state_dict())
    return m.eval()


def keys(recipe, tmp_path: Path) -> dict[str, str]:
    from qatcheck.cache import cache_key

    b = ArtifactBuilder(RecipeState(recipe), ArtifactCache(tmp_path))
    return {m: cache_key(b.key_parts(spec(m))) for m in BUILT_MODES}


def changed(a: dict, b: dict) -> set[str]:
    return {m for m in a if a[m] != b[m]}


def test_changing_forward_with_the_same_weights_rebuilds_every_artifact(tmp_path):
    before = keys(digits_recipe(), tmp_path)
    after = keys(digits_recipe(model=doubled), tmp_path)
    assert changed(before, after) == set(BUILT_MODES)


def test_each_setting_rebuilds_only_the_modes_that_use_it(tmp_path):
    import dataclasses

    base = digits_recipe()
    before = keys(base, tmp_path)
    q = base.quant
    assert changed(before, keys(digits_recipe(quant=dataclasses.replace(q, calibrator="minmax")), tmp_path)) \
        == {"trt_ptq", "partial"}
    assert changed(before, keys(digits_recipe(quant=dataclasses.replace(q, torch_calibrator="max")), tmp_path)) \
        == {"torch_ptq", "qat"}
    assert changed(before, keys(digits_recipe(loss=lambda out, y: out.sum()), tmp_path)) == {"qat"}
    assert changed(before, keys(digits_recipe(quant=dataclasses.replace(q, keep_precision=())), tmp_path)) \
        == {"partial"}


class SameConv(torch.nn.Conv2d):
    """Computes what Conv2d computes, but pytorch-quantization quantizes only an exact Conv2d."""


def _same_conv_stem() -> DigitsNet:
    m = load_digits_net(DIGITS_CHECKPOINT)
    m.stem.conv.__class__ = SameConv
    return m


def _halved_in_training() -> DigitsNet:
    m = load_digits_net(DIGITS_CHECKPOINT)
    m.register_forward_hook(lambda mod, args, out: out * 0.5 if mod.training else out)
    return m


def test_what_the_eval_graph_does_not_show_rebuilds_the_torch_modes_that_read_it(tmp_path):
    before = keys(digits_recipe(), tmp_path)
    # the same graph from another class: torch quantizers are placed by class
    assert changed(before, keys(digits_recipe(model=_same_conv_stem), tmp_path)) == {"torch_ptq", "qat"}
    # code only training runs: only QAT runs it
    assert changed(before, keys(digits_recipe(model=_halved_in_training), tmp_path)) == {"qat"}


def relabeled(split: str):
    """The digits split with every 10th label moved to the next class: the same images."""
    from qatcheck.data.base import ArrayDataset
    from qatcheck.data.digits import digits_split

    def factory() -> ArrayDataset:
        ds = digits_split(split)
        targets = ds.targets.copy()
        targets[::10] = (targets[::10] + 1) % 10
        return ArrayDataset(ds.name, ds.images, targets, source=ds.source)
    return factory


def test_new_calibration_labels_rebuild_nothing_new_training_labels_rebuild_qat(tmp_path):
    """Issue 21.11e: calibration reads only the inputs, so calibration data with new targets and
    the same images reuses every calibrated artifact (0 built); QAT trains on the targets, so new
    training labels rebuild it - and only it."""
    cache = ArtifactCache(tmp_path)
    built = ArtifactBuilder(RecipeState(digits_recipe()), cache).onnx_artifact("trt_ptq")
    again = ArtifactCache(tmp_path)
    reused = ArtifactBuilder(RecipeState(digits_recipe(calib_data=relabeled("calib"))), again).onnx_artifact("trt_ptq")
    assert not again.built and reused.digest == built.digest

    before = keys(digits_recipe(), tmp_path)
    assert changed(before, keys(digits_recipe(calib_data=relabeled("calib")), tmp_path)) == set()
    assert changed(before, keys(digits_recipe(train_data=relabeled("train")), tmp_path)) == {"qat"}


def test_qatchecks_own_build_code_is_in_every_key(tmp_path, monkeypatch):
    import qatcheck.artifacts as artifacts

    before = keys(digits_recipe(), tmp_path)
    monkeypatch.setattr(artifacts, "build_code_digest", lambda spec: "edited")
    # the fp32 export is keyed on its own bytes: an edit of the export code changes it through them
    assert changed(before, keys(digits_recipe(), tmp_path)) == set(BUILT_MODES) - {"fp32"}
    assert "qatcheck" not in json.dumps(ArtifactBuilder(RecipeState(digits_recipe()), ArtifactCache(tmp_path))
                                        .key_parts(spec("fp16"))["versions"])


def _writer(text: str):
    def build(path: Path) -> None:
        path.write_text(text)
    return build


def test_a_damaged_entry_is_rebuilt_with_a_note(tmp_path):
    cache = ArtifactCache(tmp_path)
    p = cache.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("good model"))
    p.write_text("good mo")  # truncated
    again = ArtifactCache(tmp_path)
    assert again.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("good model")).read_text() == "good model"
    assert again.built == {p.name} and "truncated or replaced" in again.notes[0] and str(p) in again.notes[0]
    p.write_text("other file")  # same size, other content: an fp32 ONNX copied over an int8 one
    again = ArtifactCache(tmp_path)
    again.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("good model"))
    assert "does not match its recorded digest" in again.notes[0]
    assert ArtifactCache(tmp_path).get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("x")).read_text() == "good model"


def test_reuse_is_counted_once_per_artifact(tmp_path):
    cache = ArtifactCache(tmp_path)
    for _ in range(3):
        cache.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("m"))
    assert len(cache.built) == 1 and not cache.reused
    other = ArtifactCache(tmp_path)
    for _ in range(3):
        other.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("m"))
    assert not other.built and len(other.reused) == 1


def test_no_cache_keeps_the_entry_until_the_new_one_is_complete(tmp_path):
    good = ArtifactCache(tmp_path).get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("good"))

    def dies(path: Path) -> None:  # killed before its atomic rename
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ArtifactCache(tmp_path, enabled=False).get_or_build("r-fp32", {"a": 1}, ".onnx", dies)
    cache = ArtifactCache(tmp_path)
    assert cache.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("other")) == good
    assert good.read_text() == "good" and cache.reused == {good.name}


def _build_slowly(root: str, log: str) -> None:
    def build(path: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        path.write_text("model")
    ArtifactCache(root).get_or_build("r-fp32", {"a": 1}, ".onnx", build)


def test_two_processes_build_one_artifact_once(tmp_path):
    log = tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(tmp_path / "c"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "built\n"


def test_cache_cli_lists_and_prunes_damaged_entries(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    good = cache.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("good"))
    bad = cache.get_or_build("r-fp16", {"a": 1}, ".onnx", _writer("bad!"))
    bad.write_text("b")
    assert cli(["cache", "list", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert good.name in out and "2 entries" in out and "1 damaged" in out and "truncated" in out
    assert cli(["cache", "prune", "--cache", str(tmp_path)]) == 0
    assert "removed " + bad.name in capsys.readouterr().out
    assert good.exists() and not bad.exists()
    assert cli(["cache", "prune", "--all", "--cache", str(tmp_path)]) == 0 and not good.exists()
    assert cli(["cache", "--cache", str(tmp_path / "nope")]) == 2
    assert "no artifact cache at" in capsys.readouterr().err


def test_every_built_in_mode_keys_on_the_models_traced_graph(tmp_path):
    b = ArtifactBuilder(RecipeState(digits_recipe()), ArtifactCache(tmp_path))
    graph = b.onnx_artifact("fp32").digest
    assert b.key_parts(spec("fp32")) == {"recipe": "digits", "mode": "fp32", "content": graph}
    for name, s in MODE_SPECS.items():
        if s.variant_of or s.content_keyed:
            continue
        parts = b.key_parts(s)
        assert parts["model"] == graph and parts["build_code"] and parts["weights"], name


KILLED_BUILD = r'''
import os, signal, sys
from pathlib import Path
import qatcheck.cache as cache_mod
from qatcheck.fsutil import atomic_path
moment, root = sys.argv[1], sys.argv[2]

def build(path):
    with atomic_path(path) as tmp:
        tmp.write_text("new model, half writ")
        if moment == "mid-write":
            os.kill(os.getpid(), signal.SIGKILL)
        tmp.write_text("new model, complete")
if moment == "before-manifest":
    cache_mod.write_text_atomic = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
cache_mod.ArtifactCache(root, enabled=False).get_or_build("r-fp32", {"a": 1}, ".onnx", build)
'''


@pytest.mark.parametrize("moment", ["mid-write", "before-manifest"])
def test_kill_9_during_a_build_never_leaves_a_damaged_entry_in_use(tmp_path, moment):
    import subprocess
    import sys

    root = tmp_path / "c"
    good = ArtifactCache(root).get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("old model"))
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, moment, str(root)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    cache = ArtifactCache(root)
    path = cache.get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("rebuilt model"))
    assert path == good
    if moment == "mid-write":  # the old entry was never touched
        assert path.read_text() == "old model" and cache.reused == {path.name}
    else:  # the new file landed without its manifest: not trusted, rebuilt with a note
        assert path.read_text() == "rebuilt model" and cache.built == {path.name}
        assert "truncated or replaced" in cache.notes[0]


KILLED_WRITE = r'''
import os, signal, sys
from qatcheck.fsutil import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half writ")
    os.kill(os.getpid(), signal.SIGKILL)
'''

LIVE_WRITE = r'''
import sys, time
from qatcheck.fsutil import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("still writing")
    print(tmp, flush=True)
    time.sleep(120)
'''


def test_temp_files_of_killed_writers_are_removed_never_a_live_writers(tmp_path, capsys):
    """Issue 21 #10: ``kill -9`` left temp files that ``cache prune`` did not remove. A writer holds
    a lock on its temp file while it lives; opening the cache and ``cache prune`` remove the temp
    files nobody holds (anywhere under the cache: the latency-reference store too) once a minute
    old, and never touch a live concurrent writer's, however old."""
    import os
    import subprocess
    import sys

    root = tmp_path / "c"
    good = ArtifactCache(root).get_or_build("r-fp32", {"a": 1}, ".onnx", _writer("model"))

    def killed(target: Path) -> None:
        proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], capture_output=True)
        assert proc.returncode == -9, proc.stderr.decode()

    def age(paths, seconds=3600) -> None:
        for t in paths:
            os.utime(t, (time.time() - seconds,) * 2)

    killed(root / "r-fp16-0123.onnx")
    killed(root / "latency-reference" / "abcd.onnx")
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITE, str(root / "r-qat-4567.onnx")],
                            stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        temps = sorted(root.rglob(".*.tmp"))
        assert len(temps) == 3 and live_tmp in temps
        assert ArtifactCache(root).orphans == []  # all three written just now: a writer may still start
        age(temps)
        foreign = root / ".notes.tmp"  # another program's: not a name atomic_path gives
        foreign.write_text("mine")
        age([foreign])
        cache = ArtifactCache(root)  # opening the cache (every session does) removes the orphans
        assert sorted(cache.orphans) == sorted(t for t in temps if t != live_tmp)
        assert "removed 2 temp file(s)" in cache.notes[0] and "left by writers that died" in cache.notes[0]
        assert live_tmp.exists() and good.exists()
        killed(root / "r-fp16-0123.onnx")  # and python -m qatcheck cache prune says what it removed
        age(root.glob(".r-fp16-0123.onnx.*.tmp"))
        assert cli(["cache", "prune", "--cache", str(root)]) == 0
        out = capsys.readouterr().out
        assert "removed .r-fp16-0123.onnx." in out and ".tmp (temp file of a writer that died mid-write)" in out
        assert sorted(root.rglob(".*.tmp")) == sorted([live_tmp, foreign]) and good.exists()
        assert live.poll() is None  # the live writer never noticed
    finally:
        live.kill()
        live.wait()


KILLED_COMMIT = r'''
import os, signal, sys
import qatcheck.baselines as b
root = sys.argv[1]
real = b.write_text_atomic
def dying(path, text):
    from qatcheck.fsutil import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(text[: len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
b.write_text_atomic = dying
store = b.BaselineStore(root)
store.stage("r", b.Update("fp32-onnxruntime", "metrics", "top1", 0.5, 0.5))
store.commit()
'''


def test_kill_9_during_a_baseline_commit_leaves_the_file_as_it_was(tmp_path):
    import subprocess
    import sys

    from qatcheck.baselines import BaselineStore, Update, load

    store = BaselineStore(tmp_path)
    store.stage("r", Update("fp32-onnxruntime", "metrics", "top1", 0.9, 0.5))
    store.commit()
    before = (tmp_path / "r.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_COMMIT, str(tmp_path)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "r.json").read_bytes() == before
    assert load(tmp_path / "r.json", "r")["cases"]["fp32-onnxruntime"]["metrics"]["top1"]["value"] == 0.9


def test_editing_a_registered_modes_builder_module_changes_its_key(tmp_path, monkeypatch):
    """A user's own mode builds with code qatcheck never versions: the key follows its source."""
    import importlib

    from qatcheck.artifacts import build_code_digest
    from qatcheck.modes import ModeSpec

    (tmp_path / "my_builders.py").write_text("def build(b, spec, path, dynamic):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    mine = ModeSpec("mine", "float", "fp32", "my_builders:build")
    before = build_code_digest(mine)
    assert build_code_digest(mine) == before and build_code_digest(spec("fp32")) != before
    (tmp_path / "my_builders.py").write_text("def build(b, spec, path, dynamic):\n    return {'v': 2}\n")
    assert build_code_digest(mine) != before


def test_a_sensitivity_profile_keys_on_the_model_and_analysis_code(tmp_path, monkeypatch):
    import qatcheck.fsutil as fsutil
    from qatcheck.analysis.sensitivity import SensitivityRunner

    runner = SensitivityRunner(digits_recipe(), "onnx", tmp_path, True, False)
    parts = runner.profile_key_parts(256, False)
    assert parts["model"] == runner.builder.onnx_artifact("fp32").digest and parts["code"]
    monkeypatch.setattr(fsutil, "source_digest", lambda items: "edited")
    assert runner.profile_key_parts(256, False)["code"] == "edited"


# ---- edits to the code forward() runs, in the user's own modules (issue 21.1) ----------------------
USERPKG = {
    "userpkg/__init__.py": "",
    "userpkg/helpers.py": "def finish(y):\n    return y\n",
    "userpkg/blocks.py": '''import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))
''',
    "userpkg/usernet.py": '''from pathlib import Path

import numpy as np
import torch
from torch import nn

from qatcheck.data.base import ArrayDataset
from qatcheck.recipe import InputSpec, QuantSettings, Recipe
from userpkg.blocks import Block
from userpkg.helpers import finish


def postprocess(y):
    return y


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return postprocess(finish(self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))))


def build():
    torch.manual_seed(0)
    return UserNet()


def data(name, n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)
    labels = Path(__file__).with_name(f"{name}-labels.npy")
    if not labels.exists():  # labelled once, by the model as first recorded: its top-1 is 100%
        with torch.no_grad():
            np.save(labels, build()(torch.from_numpy(x)).argmax(1).numpy())
    return ArrayDataset(name, x, np.load(labels))


RECIPE = Recipe(name="usernet", task="classification", model=build, eval_data=lambda: data("eval", 32, 1),
                calib_data=lambda: data("calib", 32, 2), input=InputSpec(name="input", shape=(16, 1, 8, 8)),
                top_k=(1,), quant=QuantSettings(calibrator="minmax", torch_calibrator="max", calib_batches=2),
                modes=("fp32", "trt_ptq", "torch_ptq"), backends=("torch", "onnxruntime"))
''',
}

#: builds the fp32, trt_ptq and torch_ptq artifacts in a fresh process; says what it built and how
#: close each ONNX artifact is to the torch model it must match
BUILD_USERNET = r"""
import json, sys
import numpy as np, torch
from qatcheck.artifacts import ArtifactBuilder, RecipeState
from qatcheck.backends.onnxruntime_backend import OrtRunner
from qatcheck.cache import ArtifactCache
from userpkg.usernet import RECIPE, data

def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

cache = ArtifactCache(sys.argv[1])
b = ArtifactBuilder(RecipeState(RECIPE), cache)
x = data("probe", 16, 3).images
ort = {m: OrtRunner(b.onnx_artifact(m).path, provider="CPUExecutionProvider", input_name="input").infer(x)[0]
       for m in ("fp32", "trt_ptq", "torch_ptq")}
with torch.no_grad():
    ref = {m: b.torch_artifact(m).module(torch.from_numpy(x)).numpy() for m in ("fp32", "torch_ptq")}
print(json.dumps({"built": sorted(n.rsplit("-", 1)[0] for n in cache.built), "fp32": ref["fp32"].tolist(),
                  "cosine": {"fp32": cosine(ort["fp32"], ref["fp32"]), "trt_ptq": cosine(ort["trt_ptq"], ref["fp32"]),
                             "torch_ptq": cosine(ort["torch_ptq"], ref["torch_ptq"])}}))
"""

EVERY_ARTIFACT = ["usernet-fp32", "usernet-torch_ptq", "usernet-torch_ptq-state", "usernet-trt_ptq"]


def _build_usernet(root: Path) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", BUILD_USERNET, str(root / "cache")], cwd=root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_userpkg(root: Path) -> None:
    for rel, text in USERPKG.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    path = root / rel
    text = path.read_text()
    assert text.count(old) == 1, (rel, old)
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def recorded_usernet(tmp_path_factory) -> tuple[Path, dict]:
    """The user's package and an artifact cache its model's artifacts were built into."""
    root = tmp_path_factory.mktemp("usernet")
    _write_userpkg(root)
    first = _build_usernet(root)
    assert first["built"] == EVERY_ARTIFACT
    return root, first


def _copy(recorded: tuple[Path, dict], tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(recorded[0], tmp_path / "u")
    return tmp_path / "u"


#: each kind of edit to code forward() runs that is not forward()'s own source, and what it does
EDITS = {
    "module_level_helper": ("userpkg/usernet.py", "def postprocess(y):\n    return y\n",
                            "def postprocess(y):\n    return y * 2\n", lambda y: 2 * y),
    "function_in_another_module": ("userpkg/helpers.py", "    return y\n", "    return y - 1\n", lambda y: y - 1),
    "submodule_method_in_another_module": ("userpkg/blocks.py", "torch.relu(self.conv(x))",
                                           "torch.sigmoid(self.conv(x))", None),
}


@pytest.mark.parametrize("kind", list(EDITS))
def test_an_edit_to_code_forward_calls_rebuilds_the_onnx_and_torch_artifacts(recorded_usernet, tmp_path, kind):
    """Keys held forward()'s source, not what it calls: the rerun reused stale graphs (issue 21.1)."""
    import numpy as np

    root = _copy(recorded_usernet, tmp_path)  # in another folder too: the keys do not hold paths
    rel, old, new, effect = EDITS[kind]
    _edit(root, rel, old, new)
    after = _build_usernet(root)
    assert after["built"] == EVERY_ARTIFACT
    # every ONNX artifact computes the edited model: its cosine to the torch side it must match
    assert after["cosine"]["fp32"] > 0.99999 and after["cosine"]["torch_ptq"] > 0.99999, after["cosine"]
    assert after["cosine"]["trt_ptq"] > 0.999, after["cosine"]
    before, now = np.array(recorded_usernet[1]["fp32"]), np.array(after["fp32"])
    assert np.allclose(now, effect(before), atol=1e-5) if effect else not np.allclose(now, before, atol=1e-3)


def test_a_comment_in_the_models_code_rebuilds_nothing(recorded_usernet, tmp_path):
    root = _copy(recorded_usernet, tmp_path)
    _edit(root, "userpkg/usernet.py", "    def forward(self, x):\n",
          "    def forward(self, x):\n        # the head reads the pooled block\n")
    _edit(root, "userpkg/helpers.py", "def finish(y):\n", "def finish(y):\n    # nothing to finish yet\n")
    assert _build_usernet(root)["built"] == []


def test_a_regression_in_a_helper_forward_calls_fails_on_every_backend_not_only_torch(pytester, tmp_path):
    """The issue's run end to end: the stale graphs passed the ONNX cases on the old behaviour."""
    _write_userpkg(pytester.path)
    pytester.makepyfile(test_usernet="""
import pytest
from qatcheck.standard import test_accuracy, test_parity  # noqa: F401
from userpkg.usernet import RECIPE

pytestmark = pytest.mark.qatcheck_recipe(RECIPE)
""")
    args = ("-p", "no:cacheprovider", "--qatcheck-cache", str(tmp_path / "cache"), "--qatcheck-baselines",
            str(tmp_path / "b"), "--qatcheck-reports", str(tmp_path / "r"), "--qatcheck-no-progress")
    rec = pytester.runpytest_subprocess(*args, "--update-baselines")
    assert rec.ret == 0, rec.stdout.str()
    _edit(pytester.path, "userpkg/usernet.py", "    return y\n", "    return -y\n")  # the scores reversed
    run = pytester.runpytest_subprocess(*args)
    run.stdout.fnmatch_lines(["artifact cache *: 4 built, 0 reused"])
    failed = {line.split("::")[1].split(" ")[0] for line in run.stdout.lines if line.startswith("FAILED")}
    assert failed == {f"test_accuracy[usernet-{case}]" for case in (
        "fp32-torch", "fp32-onnxruntime", "trt_ptq-onnxruntime", "torch_ptq-torch", "torch_ptq-onnxruntime")}
