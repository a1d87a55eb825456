"""Datasets: the bundled digits' scaling and split, image folders, CIFAR-10 pickles, and clear errors."""

import pickle
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from ddpm_fast.data import (DatasetError, ImageDataset, load_cifar10, load_dataset, load_digits,
                            load_image_folder, to_unit_range)

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
    assert (train.name, test.name) == ("digits-train", "digits-test")
    # Pinned: the permutation of seed 0, which every evaluation's held-out set depends on.
    assert test.labels[:12].tolist() == [6, 5, 5, 7, 9, 9, 8, 4, 6, 8, 6, 0]
    # 16x16: bilinear with align_corners=False (the border pixels are the 8x8 ones, not blends toward the edge).
    upsampled = torch.nn.functional.interpolate(raw[:, None] / 16, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(load_digits("all").images, upsampled * 2 - 1, rtol=0, atol=1e-6)
    assert load_dataset("digits").images.shape[1:] == (1, 16, 16)  # its default size


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


def test_an_image_too_large_to_decode_is_named(tmp_path, monkeypatch):
    """Pillow refuses images past twice MAX_IMAGE_PIXELS (a decompression bomb): a named error, not its own."""
    from PIL import Image
    Image.fromarray(np.random.default_rng().integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 144 pixels: more than twice as many
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png.*exceeds limit"):
        load_image_folder(tmp_path, size=8)


def _png16_rgb(path, pixels):
    """A 16-bit RGB PNG, written by hand: Pillow has no mode to save one from. pixels: (H, W, 3) uint16."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0 on every row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_image_folder_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "grey").mkdir()
    grey16 = rng.integers(0, 65536, size=(8, 8), dtype=np.uint16)
    grey16[0, :2] = (0, 65535)  # both ends of the range
    PIL.fromarray(grey16).save(tmp_path / "grey" / "a.png")  # mode I;16: convert("L") clipped it all to white
    expected = torch.from_numpy(grey16.astype(np.float32)) / 65535 * 2 - 1
    grey = load_image_folder(tmp_path / "grey", size=8, channels=1)
    torch.testing.assert_close(grey.images[0, 0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(load_image_folder(tmp_path / "grey", size=8).images[0], expected.expand(3, 8, 8),
                               rtol=0, atol=1e-6)
    # Resized (in float), it matches the picture rounded to 8 bits and resized by the 8-bit path: half a level of
    # rounding in, up to ~1.5x through bicubic's negative lobes in 2-D, half a level out; 2 levels in all. The
    # values keep to the middle half so no overshoot reaches 0 or 255, which the 8-bit path clips between its
    # horizontal and vertical passes.
    mid16 = rng.integers(16384, 49152, size=(8, 8), dtype=np.uint16)
    for name, pixels in (("mid16", mid16), ("mid8", np.round(mid16 / 257).astype(np.uint8))):
        (tmp_path / name).mkdir()
        PIL.fromarray(pixels).save(tmp_path / name / "a.png")
    small16, small8 = (load_image_folder(tmp_path / name, size=5, channels=1).images for name in ("mid16", "mid8"))
    torch.testing.assert_close(small16, small8, rtol=0, atol=2 * 2 / 255)
    # At a black-white edge, bicubic overshoots past 0 and 65535: clipped to [-1, 1].
    (tmp_path / "edge").mkdir()
    PIL.fromarray(np.repeat(np.array([[0] * 4 + [65535] * 4], np.uint16), 8, axis=0)).save(tmp_path / "edge" / "a.png")
    edge = load_image_folder(tmp_path / "edge", size=5, channels=1).images
    assert edge.min() == -1 and edge.max() == 1
    # A 32-bit integer TIFF named .png opens as mode "I" (as 16-bit PNGs did in older Pillow): 0..65535 scales
    # the same; wider values, or float ("F"), cannot be mapped and say so.
    (tmp_path / "int").mkdir()
    PIL.fromarray(grey16.astype(np.int32)).save(tmp_path / "int" / "a.png", format="TIFF")
    torch.testing.assert_close(load_image_folder(tmp_path / "int", size=8, channels=1).images[0, 0], expected,
                               rtol=0, atol=1e-6)
    PIL.fromarray(grey16.astype(np.int32) * 4).save(tmp_path / "int" / "a.png", format="TIFF")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png.*mode 'I' with values .* not a 16-bit"):
        load_image_folder(tmp_path / "int", size=8)
    PIL.fromarray(grey16.astype(np.float32) / 65535).save(tmp_path / "int" / "a.png", format="TIFF")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png.*mode 'F' is not supported"):
        load_image_folder(tmp_path / "int", size=8)
    # 16-bit color: Pillow opens it as RGB already reduced to the high bytes, within 1/257 of x / 65535.
    (tmp_path / "rgb").mkdir()
    rgb16 = rng.integers(0, 65536, size=(6, 6, 3), dtype=np.uint16)
    _png16_rgb(tmp_path / "rgb" / "a.png", rgb16)
    expected = torch.from_numpy(rgb16.astype(np.float32)).permute(2, 0, 1) / 65535 * 2 - 1
    torch.testing.assert_close(load_image_folder(tmp_path / "rgb", size=6).images[0], expected,
                               rtol=0, atol=2 / 257 + 1e-6)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_folder_exif_orientation(tmp_path, suffix):
    stored = np.random.default_rng(1).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    exif = PIL.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise
    PIL.fromarray(stored).save(tmp_path / f"a{suffix}", exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    with PIL.open(tmp_path / f"a{suffix}") as image:  # the decoded pixels, as stored (JPEG is lossy)
        stored = np.asarray(image.convert("RGB"))
    upright = np.rot90(stored, k=-1)  # (12, 8, 3); size 8 leaves it unresized, then crops rows 2..9
    expected = torch.from_numpy(upright[2:10].astype(np.float32)).permute(2, 0, 1) / 255 * 2 - 1
    torch.testing.assert_close(load_image_folder(tmp_path, size=8).images[0], expected, rtol=0, atol=1e-6)


def test_image_folder_size_is_checked(tmp_path):
    PIL.fromarray(np.random.default_rng(2).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for size in (0, -3, 2.0, True):  # 0 and -3 used to fail in the resize, blaming a.png
        with pytest.raises(ValueError, match=f"size must be an int >= 1, got {size!r}"):
            load_image_folder(tmp_path, size=size)


def test_dataset_size_is_checked_before_reading(tmp_path):
    _write_cifar(tmp_path, ["test_batch"])
    for size in (0, -3, 2.0, True):  # a CIFAR-10 folder's 0 and -3 used to fail inside F.interpolate
        with pytest.raises(ValueError, match=f"load_dataset: size must be an int >= 1 or None, got {size!r}"):
            load_dataset(str(tmp_path), size=size)
    assert load_dataset(str(tmp_path), size=8).images.shape[-2:] == (8, 8)
    assert load_dataset(str(tmp_path), size=32).data.dtype == torch.uint8  # its own size: kept as bytes


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
    assert data.data.dtype == torch.uint8 and torch.equal(data.data, torch.from_numpy(raw))  # held as its bytes


def test_every_byte_reads_as_the_loaders_float32_value():
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    as_loaded = torch.from_numpy(np.arange(256).astype(np.float32) / 255.0).mul(2.0).sub(1.0).reshape(1, 1, 16, 16)
    assert torch.equal(to_unit_range(every), as_loaded)
    assert to_unit_range(as_loaded) is as_loaded  # float data is already in [-1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bytes_read_the_same_on_a_gpu():
    """The Trainer maps its batches on the GPU: the same float32 values as the CPU (CUDA's division by a scalar
    is a multiply by its reciprocal, 1 ulp off for some bytes; the table is not)."""
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_unit_range(every.cuda()).cpu(), to_unit_range(every))


def test_image_dataset_takes_its_older_keyword_and_checks_its_data():
    pixels = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(ImageDataset("a", images=pixels).data, pixels)  # the keyword's name before data
    with pytest.raises(TypeError, match="give the images once, as data"):
        ImageDataset("a")
    with pytest.raises(TypeError, match="give the images once, as data"):
        ImageDataset("a", pixels, images=pixels)
    with pytest.raises(TypeError, match=r"images must be \(N, C, H, W\) uint8 or floating point, got torch.int32"):
        ImageDataset("a", pixels.int())
    dataset = ImageDataset("a", pixels)
    with pytest.raises(TypeError, match=r"got torch.uint8 of shape \(1, 4, 4\)"):
        dataset.images = pixels[0]


def test_eight_bit_images_are_held_as_bytes_and_read_as_before(tmp_path):
    """A folder of 8-bit images (and CIFAR-10, above) is held as uint8, a quarter of float32's memory; ``images``
    reads it as the float32 values the loader made before, bit for bit (x / 255 in float32, then 2 y - 1). One
    16-bit image makes the whole folder float32, with the 8-bit images' values unchanged."""
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        PIL.fromarray(image).save(tmp_path / f"{i}.png")
    folder = load_image_folder(tmp_path, size=6)
    assert folder.data.dtype == torch.uint8 and folder.data.shape == (3, 3, 6, 6)
    as_before = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(0, 3, 1, 2).mul(2.0).sub(1.0)
    assert torch.equal(folder.images, as_before)
    assert folder.images.dtype == torch.float32 and folder.images.min() >= -1 and folder.images.max() <= 1

    grey16 = rng.integers(0, 65536, size=(6, 6), dtype=np.uint16)
    PIL.fromarray(grey16).save(tmp_path / "1b.png")  # sorted between 1.png and 2.png
    mixed = load_image_folder(tmp_path, size=6)
    assert mixed.data.dtype == torch.float32
    assert torch.equal(mixed.images[[0, 1, 3]], as_before)
    torch.testing.assert_close(mixed.images[2], torch.from_numpy(grey16.astype(np.float32) / 65535 * 2 - 1)
                               .expand(3, 6, 6), rtol=0, atol=1e-6)


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
    rows = np.random.default_rng().integers(0, 256, size=(3, 3072), dtype=np.uint8)
    for batch, problem in (({b"data": rows[:, :3000], b"labels": [0, 1, 2]}, r"data has shape \(3, 3000\)"),
                           ({b"data": rows, b"labels": [0, 1]}, r"data has shape \(3, 3072\) .* and 2 labels"),
                           ({b"data": rows}, "KeyError: b'labels'")):
        (tmp_path / "data_batch_4").write_bytes(pickle.dumps(batch))
        with pytest.raises(DatasetError, match=f"corrupt CIFAR-10 batch .*data_batch_4.*{problem}"):
            load_cifar10(tmp_path)


@pytest.mark.parametrize("call, error, message", [
    (lambda tmp: load_digits("val"), ValueError, "load_digits: split must be 'train', 'test' or 'all', got 'val'"),
    (lambda tmp: load_digits(size=16.0), ValueError, "load_digits: size must be an int >= 8, got 16.0"),
    (lambda tmp: load_cifar10(tmp, "val"), ValueError, "load_cifar10: split must be 'train' or 'test', got 'val'"),
    (lambda tmp: load_dataset("digits", split="val"), ValueError,
     "load_dataset: split must be 'train' or 'test', got 'val'"),
    (lambda tmp: load_dataset(3), TypeError, "load_dataset: spec must be 'digits' or a path, got int"),
    (lambda tmp: load_image_folder(tmp, channels=4), ValueError, "load_image_folder: channels must be 1 or 3, got 4"),
    (lambda tmp: load_image_folder(tmp, channels=2), ValueError, "load_image_folder: channels must be 1 or 3, got 2"),
])
def test_bad_arguments_are_refused_by_the_function_given_them(tmp_path, call, error, message):
    _write_cifar(tmp_path, ["test_batch"])  # a readable dataset: only the argument is wrong
    PIL.fromarray(np.random.default_rng().integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(error, match=re.escape(message)):
        call(tmp_path)


def test_image_folder_matches_pillows_bicubic_resize_and_center_crop(tmp_path):
    """A 14x9 image at size 5: shorter side 9 -> 5, so 14 -> round(7.78) = 8 columns, and the crop keeps
    columns (8 - 5) // 2 = 1 .. 5 (an odd margin: the extra column is dropped on the right)."""
    from PIL import Image
    pixels = np.random.default_rng().integers(0, 256, size=(9, 14, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    resized = np.asarray(Image.fromarray(pixels).resize((8, 5), Image.Resampling.BICUBIC))[:, 1:6]
    expected = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1).mul(2.0).sub(1.0)
    assert torch.equal(load_image_folder(tmp_path, size=5).images[0], expected)


def test_image_folder_finds_images_by_suffix_in_any_case_and_reads_palettes(tmp_path):
    """.PNG / .JPEG count as images, a folder named like an image is searched, not read; a palette image ("P")
    reads as its RGB colors. Each image is stored at the output size, so no resize touches the values."""
    from PIL import Image
    rng = np.random.default_rng()
    rgb = rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb[0]).save(tmp_path / "a.PNG")
    (tmp_path / "b.png").mkdir()
    Image.fromarray(rgb[1]).save(tmp_path / "b.png" / "c.png")
    palette = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).convert("P")
    palette.save(tmp_path / "d.png")
    Image.fromarray(rgb[0]).save(tmp_path / "e.JPEG", quality=95)
    with Image.open(tmp_path / "e.JPEG") as image:  # the decoded pixels (JPEG is lossy)
        jpeg = np.asarray(image.convert("RGB"))
    data = load_image_folder(tmp_path, size=4)
    assert data.name == tmp_path.name
    expected = np.stack([rgb[0], rgb[1], np.asarray(palette.convert("RGB")), jpeg])  # sorted: a, b.png/c, d, e
    assert torch.equal(data.data, torch.from_numpy(expected).permute(0, 3, 1, 2))


def test_cifar10_splits(tmp_path):
    """split="test" reads test_batch only where the training batches are there too; a folder holding only
    test_batch serves it as its training split and has no held-out split."""
    names = [f"data_batch_{i}" for i in range(1, 6)]
    seed = int(np.random.default_rng().integers(99))
    batches = _write_cifar(tmp_path, names + ["test_batch"], per_batch=2, seed=seed)
    train, test = load_dataset(str(tmp_path)), load_dataset(str(tmp_path), split="test")
    as_images = lambda name: torch.from_numpy(batches[name][0]).reshape(-1, 3, 32, 32)  # noqa: E731
    assert torch.equal(train.data, torch.cat([as_images(n) for n in names])) and train.name == "cifar10-train"
    assert torch.equal(test.data, as_images("test_batch")) and test.labels.tolist() == batches["test_batch"][1]
    for folder, keep in ((tmp_path / "no_test", names), (tmp_path / "only_test", ["test_batch"])):
        folder.mkdir()
        _write_cifar(folder, keep)
        with pytest.raises(DatasetError, match="has no held-out split"):
            load_dataset(str(folder), split="test")
    assert load_dataset(str(tmp_path / "only_test")).name == "cifar10-test"  # test_batch alone is the training split


def test_cifar10_downsizing_averages_like_an_antialiasing_filter(tmp_path):
    """32 -> 8 with antialias: each output pixel is a triangle-weighted mean over 8x8 pixels, so uniform noise
    (std 0.577 in [-1, 1]) comes out at std ~0.577 * (sqrt(2.625) / 4) ** 2 = 0.095; plain bilinear sampling
    averages 2x2 pixels (std ~0.29)."""
    _write_cifar(tmp_path, ["test_batch"], per_batch=4, seed=int(np.random.default_rng().integers(99)))
    small = load_dataset(str(tmp_path), size=8)
    assert small.images.shape == (4, 3, 8, 8) and small.images.std() < 0.15


def test_load_dataset_passes_folder_size_and_channels(tmp_path):
    PIL.fromarray(np.random.default_rng().integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert load_dataset(str(tmp_path)).images.shape == (1, 3, 32, 32)  # the default size
    assert load_dataset(str(tmp_path), size=8, channels=1).images.shape == (1, 1, 8, 8)

