"""Datasets: the bundled digits' scaling and split, image folders, CIFAR-10 pickles, and clear errors."""

import pickle

import numpy as np
import pytest
import torch

from ddpm_fast.data import DatasetError, load_cifar10, load_dataset, load_digits, load_image_folder

PIL = pytest.importorskip("PIL.Image")


def test_digits_scaling_and_split():
    from sklearn.datasets import load_digits as sklearn_digits
    raw = torch.from_numpy(sklearn_digits().images).float()
    native = load_digits("all", size=8)
    # At 8x8 the scaling is exactly x / 16 * 2 - 1.
    torch.testing.assert_close(native.images[:, 0], raw / 8.0 - 1.0, rtol=0, atol=1e-6)
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape == (1497, 1, 16, 16) and test.images.shape == (300, 1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.images.max() > 0.9
    assert not train.flip, "a mirrored digit is a different (or no) digit"
    # The split is a partition: every label count adds up to the full set's.
    counts = torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10)
    assert torch.equal(counts, torch.bincount(torch.from_numpy(sklearn_digits().target), minlength=10))
    assert torch.equal(load_digits("test").images, test.images)  # the split is fixed


def test_image_folder_resize_and_crop(tmp_path):
    nested = tmp_path / "sub"
    nested.mkdir()
    # A wide image: red in its middle half, blue on the sides; the center crop keeps only red.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :, 2] = 255
    wide[:, 10:30] = (255, 0, 0)
    PIL.fromarray(wide).save(tmp_path / "a.png")
    PIL.fromarray(np.full((30, 30, 3), 255, np.uint8)).save(nested / "b.jpg", quality=95)
    data = load_image_folder(tmp_path, size=8)
    assert data.images.shape == (2, 3, 8, 8) and data.flip
    red = data.images[0]
    # Inside the crop's edge columns (where bicubic blends in the blue) the pixels are pure red; a squashed,
    # uncropped resize would put blue in the outer quarters instead.
    assert red[0, :, 1:-1].min() > 0.95 and red[2, :, 1:-1].max() < -0.95, "the center crop is the red band"
    assert red[0].min() > 0.5
    assert data.images[1].min() > 0.95  # the white JPEG
    grey = load_image_folder(tmp_path, size=8, channels=1)
    assert grey.images.shape == (2, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_image_folder(tmp_path / "file.txt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))


def _write_cifar(folder, names, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
        batches[name] = (data, labels)
    return batches


def test_cifar10_layout(tmp_path):
    names = [f"data_batch_{i}" for i in range(1, 6)]
    batches = _write_cifar(tmp_path, names)
    data = load_dataset(str(tmp_path))
    assert data.images.shape == (15, 3, 32, 32) and data.flip
    raw = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)  # CIFAR rows are C, H, W
    torch.testing.assert_close(data.images, torch.from_numpy(raw).float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert data.labels.tolist() == sum((batches[n][1] for n in names), [])


def test_cifar10_errors(tmp_path):
    _write_cifar(tmp_path, ["data_batch_1", "data_batch_2"])
    with pytest.raises(DatasetError, match="lacks data_batch_3, data_batch_4, data_batch_5"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path, [f"data_batch_{i}" for i in range(3, 6)])
    (tmp_path / "data_batch_4").write_bytes((tmp_path / "data_batch_4").read_bytes()[:100])  # truncated
    with pytest.raises(DatasetError, match="corrupt CIFAR-10 batch .*data_batch_4"):
        load_cifar10(tmp_path)

    class Exploit:  # a pickle that would call os.system when loaded
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    (tmp_path / "data_batch_4").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_cifar10(tmp_path)
