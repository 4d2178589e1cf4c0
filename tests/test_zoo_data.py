"""Built-in data (digits, Fashion-MNIST loader) and the zoo model: the ground every built-in suite
stands on, so a silent change here (a different split, a drifted normalization, a stale checkpoint)
would move every baseline at once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qatcheck.data.digits import CALIB_SIZE, digits_split, shuffled_batches
from qatcheck.data.fashion_mnist import INSTALL_HINT, fashion_mnist_available, fashion_mnist_split
from qatcheck.errors import ArtifactError, ConfigError, DataError
from qatcheck.zoo.digits_net import DIGITS_CHECKPOINT, DigitsNet, load_digits_net
from qatcheck.zoo.train_digits import evaluate


def _rows(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def test_split_sizes_and_disjoint() -> None:
    train, val, calib = (digits_split(s) for s in ("train", "val", "calib"))
    assert (len(train), len(val), len(calib)) == (1257, 540, CALIB_SIZE)
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == np.float32
    assert train.targets.dtype == np.int64
    # digits has a handful of exact duplicate images; none may straddle train and val
    assert not _rows(train.images) & _rows(val.images)
    assert set(np.unique(val.targets)) == set(range(10))


def test_calib_is_drawn_from_train_and_covers_classes() -> None:
    train_rows, calib = _rows(digits_split("train").images), digits_split("calib")
    assert _rows(calib.images) <= train_rows
    assert not _rows(calib.images) & _rows(digits_split("val").images)
    assert set(np.unique(calib.targets)) == set(range(10))


def test_deterministic_and_cached() -> None:
    a, b = digits_split("train"), digits_split("train")
    assert a.images is b.images  # lru_cache: the second call is free
    assert a.fingerprint() == b.fingerprint()
    assert np.array_equal(digits_split("val", size=12).images, digits_split("val", size=12).images)
    # the checkpoint was trained on exactly these arrays
    meta = torch.load(DIGITS_CHECKPOINT, weights_only=True)["meta"]
    assert meta["train_fingerprint"] == a.fingerprint()
    assert meta["val_fingerprint"] == digits_split("val").fingerprint()


def test_normalization_is_roughly_standard_on_train() -> None:
    x = digits_split("train").images
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01


def test_shuffled_batches_cover_once_and_vary_by_seed() -> None:
    ds = digits_split("val")
    batches = list(shuffled_batches(ds, 64, seed=1))
    assert sum(len(y) for _, y in batches) == len(ds)
    assert sorted(np.concatenate([y for _, y in batches]).tolist()) == sorted(ds.targets.tolist())
    again = next(shuffled_batches(ds, 64, seed=1))[1]
    assert np.array_equal(batches[0][1], again)
    assert not np.array_equal(next(shuffled_batches(ds, 64, seed=2))[0], batches[0][0])


def test_unknown_split_is_config_error() -> None:
    with pytest.raises(ConfigError, match="test"):
        digits_split("test")
    with pytest.raises(ConfigError, match="test"):
        fashion_mnist_split("test")


def test_checkpoint_loads_and_reaches_accuracy() -> None:
    model = load_digits_net()
    assert isinstance(model, DigitsNet) and not model.training
    assert evaluate(model, digits_split("val")) >= 98.0


def test_module_names_are_readable() -> None:
    names = {n for n, _ in DigitsNet().named_modules()}
    assert {"stem.conv", "layer1.conv1", "layer2.downsample.conv", "pool", "fc"} <= names


def test_corrupt_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="bad.pt"):
        load_digits_net(bad)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_digits_net(tmp_path / "absent.pt")


def test_wrong_checkpoint_lists_missing_keys(tmp_path: Path) -> None:
    state = DigitsNet().state_dict()
    del state["fc.weight"]
    path = tmp_path / "partial.pt"
    torch.save({"state_dict": state, "meta": {}}, path)
    with pytest.raises(ArtifactError, match=r"partial\.pt.*missing keys.*fc\.weight"):
        load_digits_net(path)
    torch.save(state, path)  # a bare state dict, not the zoo format
    with pytest.raises(ArtifactError, match="state_dict"):
        load_digits_net(path)


def test_fashion_missing_files_give_install_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=INSTALL_HINT) as info:
        fashion_mnist_split("val", root=tmp_path)
    assert str(tmp_path) in str(info.value)
    reason = fashion_mnist_available(tmp_path)
    assert reason is not None and INSTALL_HINT in reason


def test_fashion_corrupt_idx_names_the_file(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        fashion_mnist_split("val", root=tmp_path)


@pytest.mark.skipif(fashion_mnist_available() is not None, reason=str(fashion_mnist_available()))
def test_fashion_val_split_when_installed() -> None:
    val = fashion_mnist_split("val")
    assert val.images.shape == (10000, 1, 28, 28) and len(np.unique(val.targets)) == 10
