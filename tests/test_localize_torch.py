"""Damage localization in PyTorch for torch_ptq / qat (qatcheck.analysis.localize_torch,
`python -m qatcheck localize --mode torch_ptq`, and automatically on a failed parity check)."""
from __future__ import annotations

import json
import shutil

import pytest

from qatcheck.__main__ import main
from qatcheck.analysis import localize as L
from qatcheck.analysis import localize_torch as LT  # imported before pytester runs (conftest.py)
from qatcheck.data.batching import eval_batches
from qatcheck.quantize import torch_quant
from qatcheck.workspace import RecipeWorkspace

DIGITS = "qatcheck.zoo.recipes:digits_recipe"
#: the QuantConv2d planted on: its input quantizer's amax is scaled (x64: most inputs round to 0;
#: 1/8: clipped), the torch twin of the ONNX path's plant on /layer1/relu1/Relu_output_0
PLANT = "layer1.conv2"

pytestmark = pytest.mark.usefixtures("single_thread_module")


def _plant(module, layer: str = PLANT, factor: float = 64.0):
    module.get_submodule(layer)._input_quantizer._amax.mul_(factor)
    return module


def _plant_on_load(monkeypatch, layer: str = PLANT, factor: float = 64.0) -> None:
    """Every torch_ptq / qat module the artifact builder loads gets the plant; the cached state
    file stays clean (the plant happens after loading it)."""
    load = torch_quant.load_quantized

    def planted(model, config, path):
        qm = load(model, config, path)
        if layer in dict(qm.named_modules()):
            _plant(qm, layer, factor)
        return qm
    monkeypatch.setattr(torch_quant, "load_quantized", planted)


class _Models:
    def __init__(self, recipe, cache) -> None:
        self.recipe, self.cache = recipe, cache
        ws = RecipeWorkspace(recipe, cache)
        self.state, self.builder = ws.state, ws.builder

    def localize(self, factor: float | None = None, layer: str = PLANT, mode: str = "torch_ptq",
                 max_samples: int = 64):
        qm = self.builder.torch_artifact(mode).module
        if factor is not None:
            _plant(qm, layer, factor)
        batches = eval_batches(self.state.eval_data, self.recipe.input.profile()["opt"], pad=False,
                               max_samples=max_samples)
        return LT.localize_modules(qm, self.builder.torch_artifact("fp32").module, batches,
                                   recipe=self.recipe.name, mode=mode)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from qatcheck.zoo.recipes import digits_recipe

    return _Models(digits_recipe(), tmp_path_factory.mktemp("cache"))


def test_rows_follow_modules_and_data_flow(digits):
    """Rows are the leaf modules in execution order; a conv read only by its BatchNorm has its own
    SQNR measured after it (the BN is exact on fp32 inputs in torch_ptq); the residual ReLU reads
    both branches (ancestry from autograd, through the functional +)."""
    loc = L.localize(digits.recipe, "torch_ptq", cache_dir=digits.cache, max_samples=64)
    assert loc.path == "torch" and loc.order == "execution" and loc.samples == 64
    layers = [r.layer for r in loc.rows]
    assert layers[:4] == ["stem.conv", "stem.bn", "stem.relu", "layer1.conv1"]
    assert layers[-2:] == ["pool", "fc"]
    assert loc.row("stem.conv").own_after == "stem.bn" and loc.row("fc").own_after is None
    assert loc.row("stem.bn").own_sqnr_db == 300.0 and loc.row("layer1.relu1").own_sqnr_db == 300.0
    assert sorted(loc.row("layer1.relu2").inputs) == ["layer1.bn2", "stem.relu"]
    assert loc.row("layer2.relu2").inputs == ["layer2.downsample.bn", "layer2.bn2"]
    assert not loc.skipped and all(r.quant_only_sqnr_db is None for r in loc.rows)


def test_clean_model_names_nothing_and_plant_is_named(digits):
    """Clean: nothing below the 0.99 floor. x8 on layer1.conv2's input amax: it ranks first but
    stays above the floor; x64 and 1/8: it is named, not the downstream rows that inherit it.
    Every other layer's own SQNR is the clean one (own SQNR runs on fp32 inputs). Measured
    (torch_ptq, mse calibrator, 64 samples): clean worst own SQNR 35.7 dB (layer2.downsample.conv);
    x8 24.2 dB; x64 5.1 dB; 1/8 2.6 dB - the runner-up stays at 35.7."""
    clean = digits.localize()
    assert clean.named is None and clean.first_below_floor is None
    assert all(r.cosine >= 0.99 for r in clean.rows)
    assert "no layer below the floor" in L.verdict(clean)
    for factor, named in ((8.0, False), (64.0, True), (0.125, True)):
        loc = digits.localize(factor)
        top, second = loc.row(loc.worst[0]), loc.row(loc.worst[1])
        assert top.layer == PLANT and top.rank == 1, factor
        assert second.own_sqnr_db - top.own_sqnr_db > (6.0 if factor == 8.0 else 20.0), factor
        assert (loc.named == PLANT) is named, factor
        if named:
            assert loc.first_below_floor == PLANT and f"damage enters at {PLANT}:" in L.verdict(loc)
        for r in loc.rows:
            if r.tensor != top.tensor:
                assert r.own_sqnr_db == pytest.approx(clean.row(r.tensor).own_sqnr_db, abs=1e-6)
            if r.index < top.index:  # upstream of the plant nothing changed
                assert r.sqnr_db == pytest.approx(clean.row(r.tensor).sqnr_db, abs=1e-9)


def test_cli_torch_ptq_writes_reports(digits, tmp_path, capsys, monkeypatch):
    _plant_on_load(monkeypatch)
    reports = tmp_path / "reports"
    rc = main(["localize", "--recipe", DIGITS, "--mode", "torch_ptq", "--max-samples", "32",
               "--reports", str(reports), "--cache", str(digits.cache)])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"damage enters at {PLANT}:" in out and "worst five" in out and "execution order" in out
    for ext in ("json", "md", "png"):
        assert (reports / f"digits-localize-torch_ptq.{ext}").stat().st_size > 0
    data = json.loads((reports / "digits-localize-torch_ptq.json").read_text())
    assert data["named"] == PLANT and data["samples"] == 32 and data["path"] == "torch"
    assert len(data["worst"]) == 5 and data["worst"][0] == PLANT
    md = (reports / "digits-localize-torch_ptq.md").read_text()
    assert f"| {PLANT} |" in md and "own after layer1.bn2" in md
    # a Q/DQ graph is for the ONNX modes only
    assert main(["localize", "--recipe", DIGITS, "--mode", "torch_ptq", "--onnx", "x.onnx",
                 "--cache", str(digits.cache)]) == 2


SUITE = '''
import pytest
from qatcheck.standard import test_parity  # noqa: F401
from qatcheck.zoo import recipes
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    modes=("fp32", "torch_ptq"), backends=("torch",), dynamic_modes=()))
'''


def test_failed_torch_ptq_parity_names_the_layer(pytester, digits):
    """A torch_ptq case whose parity vs fp32 fails names where the damage enters in its failure
    message (the case's module vs fp32 in PyTorch, 32 samples, the case's floor) and writes the
    reports. The plant happens on load, on a copy of the module-scoped cache."""
    cache = pytester.path / "cache"
    shutil.copytree(digits.cache, cache)
    pytester.makepyfile(test_digits=SUITE)
    with pytest.MonkeyPatch.context() as mp:
        _plant_on_load(mp)
        result = pytester.runpytest("-p", "no:cacheprovider", "--qatcheck-cache", str(cache),
                                    "--qatcheck-baselines", str(pytester.path / "baselines"),
                                    "--qatcheck-reports", str(pytester.path / "reports"),
                                    "--qatcheck-no-progress", "--benchmark-disable")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*digits-torch_ptq-torch parity check failed:*",
                                 "*localize digits torch_ptq (32 samples, floor cosine 0.98): damage "
                                 f"enters at {PLANT}: own SQNR *",
                                 "*per-layer table: *digits-localize-torch_ptq.md*"])
    data = json.loads((pytester.path / "reports" / "digits-localize-torch_ptq.json").read_text())
    assert data["named"] == PLANT and data["floor"] == 0.98


def test_rule_quantizers_are_rows(tmp_path_factory):
    """QDQRules' residual-Add quantizers run in the block's forward, outside any layer: each is a
    row (named by its slot; the identity one is shared with conv1's input quantizer), compared with
    its input in the model run with every quantizer off. A plant on one (x64) names it."""
    from dataclasses import replace

    from qatcheck.quantize.qdq_rules import QDQRules
    from qatcheck.zoo.recipes import digits_recipe

    recipe = digits_recipe()
    recipe = replace(recipe, quant=replace(recipe.quant, qdq_rules=QDQRules(), torch_calibrator="max"))
    models = _Models(recipe, tmp_path_factory.mktemp("rulecache"))
    clean = models.localize(max_samples=32)
    assert clean.named is None and "Q/DQ rule's quantizer" in clean.method
    rule_rows = [r.tensor for r in clean.rows if r.op == "TensorQuantizer"]
    assert rule_rows == ["layer1._qdq_add_residual", "layer1._qdq_add_identity",
                         "layer2._qdq_add_residual", "layer2._qdq_add_identity"]
    assert clean.row("layer1._qdq_add_identity").inputs == ["stem.relu"]
    assert clean.row("layer1.relu2").inputs == ["layer1._qdq_add_residual", "layer1._qdq_add_identity"]
    qm = models.builder.torch_artifact("torch_ptq").module
    qm.layer1._qdq_add_residual._amax.mul_(64.0)
    batches = eval_batches(models.state.eval_data, recipe.input.profile()["opt"], pad=False,
                           max_samples=32)
    loc = LT.localize_modules(qm, models.builder.torch_artifact("fp32").module, batches)
    assert loc.named == "layer1._qdq_add_residual" and loc.row(loc.named_tensor).rank == 1


def test_which_failed_cases_are_localized(tmp_path):
    """torch_ptq / qat / fp8 on the torch backend are judged against fp32: localized. Their export
    on another backend is judged against the PyTorch module (export parity): one line saying so.
    Dynamic cases are not localized (their static twin is); fp32 never is (fp16:
    tests/test_fp16.py)."""
    from qatcheck.measurement import Case
    from qatcheck.workspace import CaseView
    from qatcheck.zoo.recipes import digits_recipe

    ws = RecipeWorkspace(digits_recipe(), tmp_path)  # nothing is built or loaded: none of these runs

    def view(*case):
        return CaseView.of(Case("digits", *case), ws, tmp_path)

    for mode in ("torch_ptq", "fp8"):
        [line] = L.for_failed_case(view(mode, "onnxruntime"))
        assert line.startswith("(no localization:") and f"digits-{mode}-torch" in line
    assert L.for_failed_case(view("qat", "torch", "opt")) == []
    assert L.for_failed_case(view("fp32", "torch")) == []
    assert not list(tmp_path.iterdir())


def test_qat_reference_is_fp32(digits):
    """qat: the fine-tuned weights are not fp32's. Rows still compare with fp32 (the parity
    reference); a layer whose weights moved also gets its quantization alone (quant-only: the
    layer vs itself with its quantizers off), and the report says what the reference is. The
    plant is named as in torch_ptq. Measured (digits, 64 samples): QAT moved the BatchNorm
    statistics most (stem.bn own 23.7 dB) while each conv's quant-only is within 0.4 dB of its
    own SQNR; x64 on layer1.conv2: named at 5.1 dB, runner-up 23.7 dB (stem.bn)."""
    clean = digits.localize(mode="qat")
    assert "fine-tuning drift" in clean.method
    convs = [r for r in clean.rows if r.op == "QuantConv2d"]
    assert convs and all(r.quant_only_sqnr_db is not None for r in convs)
    assert all(r.quant_only_sqnr_db is None for r in clean.rows if r.op == "ReLU")
    header, _ = L.table_rows(clean)
    assert "quant-only dB" in header
    loc = digits.localize(64.0, mode="qat")
    assert loc.named == PLANT and loc.row(PLANT).rank == 1
    assert loc.row(loc.worst[1]).own_sqnr_db - loc.row(PLANT).own_sqnr_db > 10.0


def test_digitdet_planted_is_named(tmp_path_factory):
    """The detector (Concat of an upsampled branch, three parallel heads): x64 on down2.b.conv's
    input amax names down2.b.conv; the heads' ancestry is the data flow (each head reads fuse.relu,
    not the head that ran before it). Measured (percentile, 64 samples): 2.6 dB vs 30.5 dB for the
    runner-up (down1.conv); the clean model names nothing."""
    from qatcheck.zoo.recipes import detection_recipe

    det = _Models(detection_recipe(), tmp_path_factory.mktemp("detcache"))
    clean = det.localize(max_samples=32)
    assert clean.named is None
    assert clean.row("fuse.conv").inputs == ["block1.relu", "up"]
    assert clean.row("size.conv.conv").inputs == ["fuse.relu"]
    loc = det.localize(64.0, "down2.b.conv", max_samples=32)
    named = loc.row(loc.named_tensor)
    assert loc.named == "down2.b.conv" and named.rank == 1
    assert loc.row(loc.worst[1]).own_sqnr_db - named.own_sqnr_db > 20.0
