"""ImageNet-style folder loader on a tiny fixture in the real on-disk format (JPEG/PNG files)."""
import numpy as np
import pytest
from PIL import Image

from qatcheck.data.imagefolder import ImageFolderDataset
from qatcheck.errors import DataError


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("n01440764", 3), ("n01443537", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
            img.save(tmp_path / cls / f"{i}.{'JPEG' if i % 2 else 'png'}")
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    return tmp_path


def test_streams_reference_eval_transform(folder):
    ds = ImageFolderDataset(folder, size=224)
    assert len(ds) == 5 and ds.classes == ["n01440764", "n01443537"]
    batches = list(ds.batches(2))
    assert [b[0].shape for b in batches] == [(2, 3, 224, 224), (2, 3, 224, 224), (1, 3, 224, 224)]
    labels = np.concatenate([b[1] for b in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1]
    # normalized with ImageNet statistics: uniform noise has mean ~0.5 -> (0.5 - 0.485) / 0.229
    assert abs(float(batches[0][0][:, 0].mean()) - (0.5 - 0.485) / 0.229) < 0.05
    assert ds.fingerprint() == ImageFolderDataset(folder, size=224).fingerprint()
    assert ds.fingerprint() != ImageFolderDataset(folder, size=160).fingerprint()
    # another class order: new labels, the same inputs (calibration reads only those)
    swapped = ImageFolderDataset(folder, size=224, classes=["n01443537", "n01440764"])
    assert swapped.fingerprint() != ds.fingerprint() and swapped.inputs_fingerprint() == ds.inputs_fingerprint()
    assert ImageFolderDataset(folder, size=160).inputs_fingerprint() != ds.inputs_fingerprint()


def test_bad_folders_are_named(folder, tmp_path_factory):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(folder / "missing")
    empty = tmp_path_factory.mktemp("empty")
    (empty / "cls").mkdir()
    with pytest.raises(DataError, match=f"{empty} has no images"):
        ImageFolderDataset(empty)
    with pytest.raises(DataError, match="not in the model's 1 classes"):
        ImageFolderDataset(folder, classes=["n01440764"])
    (folder / "n01443537" / "9.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image .*9.png"):
        list(ImageFolderDataset(folder).batches(8))
