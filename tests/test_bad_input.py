"""Bad input fails once, clearly: every error is a QatcheckError naming the file, field or value
the user has to fix (DESIGN.md principle 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qatcheck.artifacts import RecipeState
from qatcheck.quantize.export import load_onnx
from qatcheck.data.base import ArrayDataset
from qatcheck.errors import ArtifactError, ConfigError, DataError
from qatcheck.recipe import InputSpec, QuantSettings, Recipe, Tolerances

SPEC = InputSpec(name="input", shape=(2, 1, 4, 4))


def tiny_ds(name="tiny", shape=(4, 1, 4, 4)):
    return ArrayDataset(name, np.zeros(shape, np.float32), np.zeros(shape[0], np.int64))


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def recipe(**overrides) -> Recipe:
    fields = dict(name="tiny", task="classification", model=tiny_model, eval_data=tiny_ds,
                  calib_data=tiny_ds, input=SPEC, modes=("fp32", "torch_ptq"),
                  backends=("torch", "onnxruntime"))
    fields.update(overrides)
    return Recipe(**fields)


def test_a_valid_tiny_recipe_loads():
    state = RecipeState(recipe())
    assert isinstance(state.model, torch.nn.Module) and not state.model.training
    assert len(state.eval_data) == 4 and len(state.calib_data) == 4


# ------------------------------------------------------------------------------------------------
# Recipe / InputSpec -> ConfigError naming the field and value
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needles", [
    (dict(modes=("fp32", "int4")), ["'int4'", "known modes"]),
    (dict(backends=("torch", "openvino")), ["'openvino'", "known backends"]),
    (dict(quant=QuantSettings(calibrator="kl")), ["QuantSettings.calibrator", "'kl'", "minmax"]),
    (dict(quant=QuantSettings(torch_calibrator="minmax")),
     ["QuantSettings.torch_calibrator", "'minmax'", "mse"]),
    (dict(quant=QuantSettings(percentile=40.0)), ["QuantSettings.percentile", "40.0"]),
    (dict(name="my recipe"), ["Recipe.name", "'my recipe'"]),
    (dict(name="a/b"), ["Recipe.name", "'a/b'"]),
    (dict(name=""), ["Recipe.name"]),
    (dict(task="segmentation"), ["Recipe(tiny).task", "'segmentation'"]),
    (dict(modes=("fp32", "qat")), ["Recipe(tiny)", "'qat'", "train_data"]),
    (dict(modes=("fp32", "dynamic")), ["Recipe(tiny)", "'dynamic'", "InputSpec.dynamic"]),
    (dict(modes=("dynamic",), input=InputSpec(shape=(2, 1, 4, 4), dynamic={0: (1, 4, 8)})),
     ["InputSpec.dynamic[0]", "opt=4", "shape[0]=2"]),
    (dict(modes=("dynamic",), input=InputSpec(shape=(2, 1, 4, 4), dynamic={0: (4, 2, 8)})),
     ["InputSpec.dynamic[0]", "(4, 2, 8)"]),
    (dict(modes=("dynamic",), input=InputSpec(shape=(2, 1, 4, 4), dynamic={7: (1, 2, 8)})),
     ["InputSpec.dynamic axis 7"]),
    (dict(input=InputSpec(shape=(2, 0, 4, 4))), ["InputSpec.shape", "(2, 0, 4, 4)"]),
    (dict(input=InputSpec(dtype="int8", shape=(2, 1, 4, 4))), ["InputSpec.dtype", "'int8'"]),
    (dict(output_names=()), ["Recipe(tiny).output_names"]),
    (dict(tolerances=Tolerances(metric_points=-1)), ["Tolerances.metric_points"]),
    (dict(profile_samples=0), ["Recipe(tiny).profile_samples", "got 0"]),
])
def test_bad_recipe_is_one_config_error_naming_the_field(overrides, needles):
    with pytest.raises(ConfigError) as ei:
        recipe(**overrides)
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_qat_with_train_data_and_dynamic_with_axes_are_fine():
    r = recipe(modes=("qat", "dynamic"), train_data=tiny_ds,
               input=InputSpec(shape=(2, 1, 4, 4), dynamic={0: (1, 2, 8)}))
    assert r.input.profile()["max"] == (8, 1, 4, 4)


def test_unknown_mode_in_tolerances_names_the_tolerance_field():
    with pytest.raises(ConfigError, match="fp32_budget_points"):
        recipe(tolerances=Tolerances(fp32_budget_points={"torch-ptq": 1.0}))


# ------------------------------------------------------------------------------------------------
# ONNX files -> ArtifactError naming the path
# ------------------------------------------------------------------------------------------------
def test_missing_onnx_names_the_path(tmp_path):
    p = tmp_path / "model.onnx"
    with pytest.raises(ArtifactError, match="not found") as ei:
        load_onnx(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("content", [b"\x00\xffgarbage" * 50, b"", b"not an onnx model at all\n"])
def test_corrupt_onnx_names_the_path(tmp_path, content):
    p = tmp_path / "broken.onnx"
    p.write_bytes(content)
    with pytest.raises(ArtifactError, match="not a valid model") as ei:
        load_onnx(p)
    assert str(p) in str(ei.value)


# ------------------------------------------------------------------------------------------------
# datasets -> DataError naming the dataset
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, targets, needle", [
    (np.zeros((0, 1, 4, 4)), [], "is empty"),
    (np.zeros((0,)), [], "is empty"),
    (np.zeros((4, 16)), [0] * 4, "NCHW"),
    (np.zeros((4, 4, 4)), [0] * 4, "(4, 4, 4)"),
    (np.zeros((4, 1, 4, 4)), [0] * 3, "4 images but 3 targets"),
])
def test_bad_array_dataset_names_it(images, targets, needle):
    with pytest.raises(DataError) as ei:
        ArrayDataset("my-digits", images, targets)
    assert "'my-digits'" in str(ei.value) and needle in str(ei.value)


def test_empty_dataset_names_its_source():
    with pytest.raises(DataError, match=r"source: /data/val"):
        ArrayDataset("val", np.zeros((0, 1, 4, 4)), [], source="/data/val")


def test_bad_batch_size_names_the_dataset():
    with pytest.raises(DataError, match="'tiny'.*batch_size"):
        next(tiny_ds().batches(0))


# ------------------------------------------------------------------------------------------------
# RecipeState: model and data that do not match the recipe
# ------------------------------------------------------------------------------------------------
def test_model_that_rejects_the_input_spec():
    r = recipe(model=lambda: torch.nn.Linear(64, 10), input=InputSpec(shape=(1, 1, 16, 16)),
               eval_data=lambda: tiny_ds(shape=(4, 1, 16, 16)))
    with pytest.raises(ArtifactError) as ei:
        RecipeState(r).model
    msg = str(ei.value)
    assert "Recipe(tiny).model" in msg and "input(1, 1, 16, 16)" in msg and "float32" in msg


@pytest.mark.parametrize("field", ["calib_data", "eval_data", "train_data"])
def test_dataset_whose_samples_differ_from_the_spec(field):
    r = recipe(**{"train_data": tiny_ds, field: lambda: tiny_ds("wrong28", shape=(4, 1, 28, 28))})
    with pytest.raises(DataError) as ei:
        getattr(RecipeState(r), field)
    msg = str(ei.value)
    assert f"Recipe(tiny).{field}" in msg and "wrong28" in msg
    assert "(1, 28, 28)" in msg and "(2, 1, 4, 4)" in msg


def test_uint8_images_are_refused_not_rescaled():
    """Issue 21 #10: uint8 images went to the model as 0..255 floats and a 16% top-1 was recorded as
    a fresh baseline. qatcheck does not guess the model's scale: one error names the dataset, the
    dtype and range, and the conversion to make; float images of any width are taken as they are."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 4, 4), dtype=np.uint8)
    with pytest.raises(DataError) as ei:
        ArrayDataset("my-digits", pixels, np.zeros(4, np.int64))
    msg = str(ei.value)
    assert msg.startswith("dataset 'my-digits': images are uint8 (values 4..248)")
    assert "does not guess their scale" in msg and "images.astype(np.float32) / 255" in msg
    assert ArrayDataset("ok", pixels.astype(np.float64) / 255, np.zeros(4, np.int64)).images.dtype == np.float32

    class Pixels:  # a dataset of the user's own that yields the raw pixels
        name = "camera-roll"

        def __len__(self):
            return 4

        def batches(self, batch_size, limit=None):
            yield pixels[:batch_size], np.zeros(batch_size, np.int64)

    with pytest.raises(DataError, match=r"Recipe\(tiny\)\.eval_data \(camera-roll\): images are uint8"):
        RecipeState(recipe(eval_data=Pixels)).eval_data


# eleven bad samples over eleven of the thirteen batches of 8 (and one batch with two)
BAD = [3, 9, 10, 17, 30, 31, 55, 70, 88, 96, 99]


def _classify(images, infer, calls=None):
    from qatcheck.backends.torch_backend import TorchRunner
    from qatcheck.data.batching import eval_batches
    from qatcheck.evaluate import evaluate
    from qatcheck.tasks.classification import ClassificationTask

    ds = ArrayDataset("spread", images, np.arange(len(images)) % 3)
    runner = TorchRunner(infer, "fp32", "cpu")

    def counted(x):
        calls.append(len(x)) if calls is not None else None
        return runner.infer(x)
    return evaluate(counted, eval_batches(ds, (8, 1, 4, 4)), ClassificationTask(top_k=(1,)),
                    source="Recipe(tiny).eval_data (spread)")


def test_every_nan_input_sample_of_the_eval_set_is_counted():
    """Issue 21 #10: 11 NaN samples spread over the batches were reported as 1 or 3 (the first bad
    batch's). The whole set is scanned - no model runs from the first bad sample on - and the
    error counts all of them."""
    images = np.random.default_rng(0).standard_normal((100, 1, 4, 4)).astype(np.float32)
    images[BAD, 0, 1, 2] = np.nan
    images[96, 0, 0, 0] = np.inf
    calls: list[int] = []
    with pytest.raises(DataError) as ei:
        _classify(images, tiny_model(), calls)
    assert str(ei.value) == ("Recipe(tiny).eval_data (spread): 11 of 100 input samples hold NaN/inf values "
                             "(sample index 3, 9, 10, 17, 30, 31, 55, 70, ...); no model was run on them - "
                             "fix or filter the data")
    assert calls == []  # the first batch already holds one


def test_every_sample_with_nan_outputs_is_counted():
    """Outputs: a model that overflows on 11 samples spread over the set - the count is samples
    (and values) over the whole eval set, and the accuracy failure says so."""
    from qatcheck.judges import _nonfinite
    from qatcheck.measurement import Case, Measurement

    class LogOfFirstPixel(torch.nn.Module):  # NaN wherever the first pixel is negative
        def forward(self, x):
            return tiny_model()(x) + torch.log(x[:, :1, 0, 0])

    images = np.abs(np.random.default_rng(0).standard_normal((100, 1, 4, 4))).astype(np.float32)
    images[BAD, 0, 0, 0] = -1.0
    ev = _classify(images, LogOfFirstPixel())
    assert (ev.nonfinite_samples, ev.nonfinite_outputs, ev.samples) == (11, 33, 100)
    m = Measurement(case=Case("tiny", "fp16", "onnxruntime"), eval_samples=ev.samples,
                    nonfinite_outputs=ev.nonfinite_outputs, nonfinite_samples=ev.nonfinite_samples)
    assert _nonfinite(m).startswith("the outputs of 11 of 100 eval samples hold NaN/inf (33 values), from finite inputs")


def test_empty_dataset_from_a_factory_names_the_field():
    class Empty:
        name = "nothing"

        def __len__(self):
            return 0

    with pytest.raises(DataError, match=r"Recipe\(tiny\)\.calib_data is empty"):
        RecipeState(recipe(calib_data=Empty)).calib_data


def test_model_factory_that_raises_names_the_recipe():
    def factory():
        raise FileNotFoundError("weights.pth")

    with pytest.raises(ArtifactError) as ei:
        RecipeState(recipe(model=factory)).model
    msg = str(ei.value)
    assert "Recipe(tiny).model" in msg and "FileNotFoundError" in msg and "weights.pth" in msg


def test_model_factory_returning_something_else_names_the_recipe():
    with pytest.raises(ArtifactError, match=r"Recipe\(tiny\)\.model returned dict"):
        RecipeState(recipe(model=lambda: {"state_dict": {}})).model


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint" * 10, b""])
def test_digits_recipe_with_a_garbage_checkpoint_names_the_file(tmp_path, content):
    from qatcheck.zoo.recipes import digits_recipe

    ckpt = tmp_path / "digits_bad.pt"
    ckpt.write_bytes(content)
    r = digits_recipe(checkpoint=ckpt)
    with pytest.raises(ArtifactError) as ei:
        RecipeState(r).model
    assert str(ckpt) in str(ei.value) and "cannot be read" in str(ei.value)


def test_digits_recipe_with_a_foreign_checkpoint_names_the_file(tmp_path):
    from qatcheck.zoo.recipes import digits_recipe

    ckpt = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "meta": {}}, ckpt)
    with pytest.raises(ArtifactError) as ei:
        RecipeState(digits_recipe(checkpoint=ckpt)).model
    assert str(ckpt) in str(ei.value) and "missing keys" in str(ei.value)


def test_digits_recipe_with_a_missing_checkpoint_names_the_file(tmp_path):
    from qatcheck.zoo.recipes import digits_recipe

    with pytest.raises(ArtifactError, match="nope.pt does not exist"):
        RecipeState(digits_recipe(checkpoint=tmp_path / "nope.pt")).model


def test_data_factory_that_raises_names_the_recipe_and_field():
    def factory():
        raise FileNotFoundError("/data/imagenet/val")

    with pytest.raises(DataError, match=r"Recipe\(tiny\)\.calib_data"):
        RecipeState(recipe(calib_data=factory)).calib_data
