"""Built-in recipes: real data that ships in registry packages, models trained by committed scripts.

``digits`` is the default everywhere (CI, README main job): scikit-learn's handwritten digits and
the DigitsNet checkpoint in this folder. ``fashion`` needs Debian's ``dataset-fashion-mnist``.
"""
from __future__ import annotations

from pathlib import Path

from qatcheck.recipe import InputSpec, QATSettings, QuantSettings, Recipe, Tolerances


def digits_recipe(checkpoint: str | Path | None = None, **overrides) -> Recipe:
    """The built-in classification recipe. ``overrides`` replace Recipe fields (tests use this to
    plant regressions: a bad calibrator, a different checkpoint)."""
    from qatcheck.data.digits import digits_split
    from qatcheck.zoo.digits_net import DIGITS_CHECKPOINT, load_digits_net

    ckpt = Path(checkpoint) if checkpoint else DIGITS_CHECKPOINT
    fields = dict(
        name="digits",
        task="classification",
        model=lambda: load_digits_net(ckpt),
        eval_data=lambda: digits_split("val"),
        calib_data=lambda: digits_split("calib"),
        train_data=lambda: digits_split("train"),
        # batch 32 at 16x16; the dynamic profile covers batch 1..128 and 16..24 pixels
        input=InputSpec(name="input", shape=(32, 1, 16, 16),
                        dynamic={0: (1, 32, 128), 2: (16, 16, 24), 3: (16, 16, 24)}),
        # entropy (TensorRT's default) clips the classifier input hard on this model: trt_ptq
        # loses ~14 points and `partial` keeps `fc` in higher precision to recover them; the
        # pytorch-quantization path uses mse, which keeps the drop under a point without help.
        quant=QuantSettings(calibrator="entropy", torch_calibrator="mse", calib_batches=8,
                            keep_precision=("fc",)),
        qat=QATSettings(epochs=2, lr=1e-4, batch_size=64),
        tolerances=Tolerances(metric_points=0.5),
        weights_id=str(ckpt),
    )
    fields.update(overrides)
    return Recipe(**fields)


def fashion_recipe(root: str | Path | None = None, **overrides) -> Recipe:
    """Fashion-MNIST (28x28, 10 classes), when Debian's dataset-fashion-mnist is installed."""
    from qatcheck.data.fashion_mnist import fashion_mnist_split
    from qatcheck.zoo.digits_net import FASHION_CHECKPOINT, load_fashion_net

    fields = dict(
        name="fashion",
        task="classification",
        model=lambda: load_fashion_net(FASHION_CHECKPOINT),
        eval_data=lambda: fashion_mnist_split("val", root),
        calib_data=lambda: fashion_mnist_split("calib", root),
        train_data=lambda: fashion_mnist_split("train", root),
        input=InputSpec(name="input", shape=(64, 1, 28, 28), dynamic={0: (1, 64, 256)}),
        quant=QuantSettings(calibrator="entropy", torch_calibrator="entropy", calib_batches=8,
                            keep_precision=("stem.conv", "fc")),
        qat=QATSettings(epochs=1, lr=1e-4, batch_size=128, max_batches_per_epoch=100),
        weights_id=str(FASHION_CHECKPOINT),
    )
    fields.update(overrides)
    return Recipe(**fields)
