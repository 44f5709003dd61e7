"""Evaluation-data loading: both npz layouts, the resize/crop rule, normalisation, and every DataError case."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dfp_deploy.core.errors import DataError
from dfp_deploy.core.types import Preprocess
from dfp_deploy.data.images import load_images, to_tensor

CIFAR = Preprocess(size=32, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
LITE = Preprocess(size=24, mean=(127.0,) * 3, std=(128.0,) * 3)


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def write_array_npz(path, x, y=None):
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(path, **arrays)
    return path


def jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_jpeg_npz(path, images, y=None):
    blobs = [jpeg_bytes(img) for img in images]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    arrays = {"jpeg": np.frombuffer(b"".join(blobs), dtype=np.uint8), "offsets": offsets}
    if y is not None:
        arrays["y"] = np.asarray(y, dtype=np.int64)
    np.savez(path, **arrays)
    return blobs


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


# ---- layout (a): x arrays ----


def test_array_images_at_size_pass_through_bit_exact(tmp_path):
    x, y = random_images(6, 32, 32), np.arange(6, dtype=np.int32)
    images, labels = load_images(write_array_npz(tmp_path / "d.npz", x, y), CIFAR)
    assert images.dtype == np.uint8 and np.array_equal(images, x)
    assert labels.dtype == np.int64 and np.array_equal(labels, np.arange(6))


def test_limit_takes_the_first_images(tmp_path):
    x, y = random_images(6, 32, 32), np.arange(6)
    images, labels = load_images(write_array_npz(tmp_path / "d.npz", x, y), CIFAR, limit=4)
    assert np.array_equal(images, x[:4]) and np.array_equal(labels, [0, 1, 2, 3])
    images, _ = load_images(tmp_path / "d.npz", CIFAR, limit=100)
    assert len(images) == 6


def test_centre_crop_without_resize(tmp_path):
    x = random_images(3, 37, 40)
    images, _ = load_images(write_array_npz(tmp_path / "d.npz", x, np.zeros(3, np.int64)), CIFAR)
    # offsets floor((37-32)/2) = 2 and floor((40-32)/2) = 4
    assert np.array_equal(images, x[:, 2:34, 4:36])


def test_image_smaller_than_crop_is_an_error(tmp_path):
    x = random_images(2, 30, 40)
    with pytest.raises(DataError, match="smaller than the model's 32x32 input; set advanced.model.resize"):
        load_images(write_array_npz(tmp_path / "d.npz", x, np.zeros(2, np.int64)), CIFAR)


def test_resize_short_side_then_centre_crop(tmp_path):
    x = random_images(2, 40, 60)
    pre = Preprocess(size=16, mean=(0.0,) * 3, std=(1.0,) * 3, resize=20)
    images, _ = load_images(write_array_npz(tmp_path / "d.npz", x, np.zeros(2, np.int64)), pre)
    assert images.shape == (2, 16, 16, 3)
    for got, original in zip(images, x):
        resized = np.asarray(Image.fromarray(original).resize((30, 20), Image.BILINEAR))  # W x H, short side 20
        assert np.array_equal(got, resized[2:18, 7:23])


def test_resize_keeps_a_flat_image_flat(tmp_path):
    x = np.full((1, 50, 70, 3), (10, 200, 90), dtype=np.uint8)
    pre = Preprocess(size=24, mean=(0.0,) * 3, std=(1.0,) * 3, resize=28)
    images, _ = load_images(write_array_npz(tmp_path / "d.npz", x, np.zeros(1, np.int64)), pre)
    assert images.shape == (1, 24, 24, 3) and np.all(images == np.array([10, 200, 90], dtype=np.uint8))


def test_images_at_size_skip_the_resize(tmp_path):
    x = random_images(2, 16, 16)
    pre = Preprocess(size=16, mean=(0.0,) * 3, std=(1.0,) * 3, resize=20)
    images, _ = load_images(write_array_npz(tmp_path / "d.npz", x, np.zeros(2, np.int64)), pre)
    assert np.array_equal(images, x)


# ---- layout (b): concatenated JPEG bytes ----


def test_jpeg_layout_decodes_and_crops(tmp_path):
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (27, 27, 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.fromarray(rng.integers(0, 256, (27, 27), dtype=np.uint8), mode="L"))  # greyscale JPEG
    blobs = write_jpeg_npz(tmp_path / "j.npz", images, y=[5, 6, 7, 8])
    x, y = load_images(tmp_path / "j.npz", LITE)
    assert x.shape == (4, 24, 24, 3) and np.array_equal(y, [5, 6, 7, 8])
    for got, blob in zip(x, blobs):
        assert np.array_equal(got, decode(blob)[1:25, 1:25])  # centre 24 of 27: offset floor(3 / 2) = 1
    grey = x[3]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_jpeg_at_size_passes_through(tmp_path):
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(2)]
    blobs = write_jpeg_npz(tmp_path / "j.npz", images, y=[0, 1])
    pre = Preprocess(size=24, mean=(0.0,) * 3, std=(1.0,) * 3, resize=32)
    x, _ = load_images(tmp_path / "j.npz", pre, limit=1)
    assert len(x) == 1 and np.array_equal(x[0], decode(blobs[0]))


def test_many_jpegs_with_progress_and_no_labels(tmp_path):
    images = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(201)]
    write_jpeg_npz(tmp_path / "j.npz", images)
    pre = Preprocess(size=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    x, y = load_images(tmp_path / "j.npz", pre, require_labels=False)
    assert y is None and x.shape == (201, 8, 8, 3)
    assert abs(int(x[200, 4, 4, 0]) - 200) <= 3  # JPEG is lossy, but a flat colour survives


def test_corrupt_jpeg_names_the_image(tmp_path):
    garbage = np.arange(20, dtype=np.uint8)
    np.savez(tmp_path / "j.npz", jpeg=garbage, offsets=np.array([0, 10, 20]), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="image 0 is not a decodable image"):
        load_images(tmp_path / "j.npz", LITE)


def test_bad_offsets(tmp_path):
    np.savez(tmp_path / "j.npz", jpeg=np.zeros(10, np.uint8), offsets=np.array([0, 5, 50]), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="'offsets' must increase"):
        load_images(tmp_path / "j.npz", LITE)


# ---- normalisation ----


def test_to_tensor_normalises_a_known_pixel():
    x = np.zeros((2, 3, 4, 3), dtype=np.uint8)
    x[1, 2, 3] = (255, 0, 128)
    t = to_tensor(x, CIFAR)
    assert t.dtype == np.float32 and t.shape == (2, 3, 3, 4) and t.flags["C_CONTIGUOUS"]
    expected = [(255 - 123.675) / 58.395, (0 - 116.28) / 57.12, (128 - 103.53) / 57.375]
    assert t[1, :, 2, 3] == pytest.approx(expected, rel=1e-6)
    assert t[0, :, 0, 0] == pytest.approx([-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375], rel=1e-6)
    lite = to_tensor(x, LITE)
    assert lite[1, :, 2, 3] == pytest.approx([1.0, -127 / 128, 1 / 128])


def test_to_tensor_rejects_non_uint8():
    with pytest.raises(DataError, match="uint8 images"):
        to_tensor(np.zeros((1, 4, 4, 3), np.float32), CIFAR)


# ---- DataError cases ----


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nope.npz", CIFAR)


def test_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    path.write_text("not numpy")
    with pytest.raises(DataError, match="not a readable npz"):
        load_images(path, CIFAR)
    np.save(tmp_path / "a.npy", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="not an npz"):
        load_images(tmp_path / "a.npy", CIFAR)


def test_missing_keys_say_what_is_expected(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"has keys \['images'\]: expected 'x'.*'jpeg' \+ 'offsets'"):
        load_images(tmp_path / "d.npz", CIFAR)


def test_missing_labels(tmp_path):
    path = write_array_npz(tmp_path / "d.npz", random_images(2, 32, 32))
    with pytest.raises(DataError, match="no labels 'y'"):
        load_images(path, CIFAR)
    x, y = load_images(path, CIFAR, require_labels=False)
    assert y is None and len(x) == 2


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((2, 32, 32, 3), np.float32), "must be uint8"),
        (np.zeros((2, 32, 32, 3, 1), np.uint8), "must be RGB images"),
        (np.zeros((2, 3, 32, 32), np.uint8), "channels last"),
        (np.zeros((2, 32, 32), np.uint8), "1-channel images; they must be RGB"),
        (np.zeros((2, 32, 32, 1), np.uint8), "1-channel images; they must be RGB"),
    ],
)
def test_wrong_image_arrays(tmp_path, x, message):
    with pytest.raises(DataError, match=message):
        load_images(write_array_npz(tmp_path / "d.npz", x, np.zeros(2, np.int64)), CIFAR)


def test_label_problems(tmp_path):
    x = random_images(3, 32, 32)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_images(write_array_npz(tmp_path / "a.npz", x, np.zeros(2, np.int64)), CIFAR)
    with pytest.raises(DataError, match="'y' must be integer class ids"):
        load_images(write_array_npz(tmp_path / "b.npz", x, np.zeros(3, np.float32)), CIFAR)


def test_bad_limit(tmp_path):
    path = write_array_npz(tmp_path / "d.npz", random_images(2, 32, 32), np.zeros(2, np.int64))
    with pytest.raises(DataError, match="limit must be a positive"):
        load_images(path, CIFAR, limit=0)


def _deflate_damaged(path):
    """A compressed npz whose 'x' deflate stream is damaged (zlib.error while reading, not a CRC mismatch)."""
    import zipfile

    np.savez_compressed(path, x=random_images(8, 32, 32), y=np.arange(8))
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + 40
    data[start:start + 64] = bytes(b ^ 0x5A for b in data[start:start + 64])
    path.write_bytes(bytes(data))


def test_damaged_deflate_stream_is_a_data_error(tmp_path):
    _deflate_damaged(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"array 'x' cannot be read \(error: "):
        load_images(tmp_path / "d.npz", CIFAR)


def test_check_file_names_the_key_and_checks_every_member(tmp_path):
    from dfp_deploy.data.images import check_file

    write_array_npz(tmp_path / "ok.npz", random_images(4, 32, 32), np.arange(4))
    check_file(tmp_path / "ok.npz", "eval.data")
    _deflate_damaged(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"^compress.calibration.data: .*d.npz is damaged"):
        check_file(tmp_path / "d.npz", "compress.calibration.data")
    np.savez(tmp_path / "s.npz", x=random_images(4, 32, 32))
    data = bytearray((tmp_path / "s.npz").read_bytes())
    data[len(data) // 3] ^= 0xFF  # stored (uncompressed) member: only its CRC-32 can tell
    (tmp_path / "s.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="CRC-32"):
        check_file(tmp_path / "s.npz", "eval.data")
    with pytest.raises(DataError, match="^eval.data: .*does not exist"):
        check_file(tmp_path / "none.npz", "eval.data")


@pytest.mark.parametrize("labels, limit, ok", [([0, 9, 3], None, True), ([0, 10, 3], None, False),
                                               ([0, -1, 3], None, False), ([0, 1, 12], 2, True)])
def test_labels_must_be_classes_of_the_model(tmp_path, labels, limit, ok):
    from dfp_deploy.data.images import check_labels

    write_array_npz(tmp_path / "d.npz", random_images(3, 32, 32), np.array(labels))
    if ok:
        check_labels(tmp_path / "d.npz", 10, limit)
    else:
        with pytest.raises(DataError, match=r"^eval.data: .* 1 labels outside the model's classes \[0, 10\)"):
            check_labels(tmp_path / "d.npz", 10, limit)


def test_top1_refuses_labels_no_logit_can_match():
    from dfp_deploy.measure.accuracy import top1

    def run(x):
        return np.zeros((len(x), 10), np.float32)

    x = np.zeros((3, 3, 4, 4), np.float32)
    assert top1(run, x, np.array([0, 0, 1]), batch=2, static_batch=False) == pytest.approx(200 / 3)
    with pytest.raises(DataError, match=r"eval.data: labels span \[0, 10\] but the model has 10 classes"):
        top1(run, x, np.array([0, 10, 1]), batch=2, static_batch=False)


# ---- selection [start, start + limit) and geometry checked before any work ----


def test_start_and_limit_select_a_split(tmp_path):
    x, y = random_images(8, 32, 32), np.arange(8)
    path = write_array_npz(tmp_path / "d.npz", x, y)
    images, labels = load_images(path, CIFAR, start=3, limit=4)
    assert np.array_equal(images, x[3:7]) and np.array_equal(labels, [3, 4, 5, 6])
    tune, _ = load_images(path, CIFAR, limit=3)
    report, report_y = load_images(path, CIFAR, start=3)
    assert np.array_equal(np.concatenate([tune, report]), x) and np.array_equal(report_y, np.arange(3, 8))
    with pytest.raises(DataError, match=r"holds 8 images: the first image asked for is index 8.*advanced.eval.start"):
        load_images(path, CIFAR, start=8)


def test_start_selects_jpegs_without_decoding_the_others(tmp_path):
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (27, 27, 3), dtype=np.uint8)) for _ in range(4)]
    blobs = write_jpeg_npz(tmp_path / "j.npz", images, y=[5, 6, 7, 8])
    x, y = load_images(tmp_path / "j.npz", LITE, start=2, limit=5)
    assert np.array_equal(y, [7, 8])
    assert all(np.array_equal(got, decode(blob)[1:25, 1:25]) for got, blob in zip(x, blobs[2:]))


def test_check_labels_refuses_a_start_beyond_the_file(tmp_path):
    from dfp_deploy.data.images import check_labels

    write_array_npz(tmp_path / "d.npz", random_images(3, 32, 32), np.array([0, 1, 12]))
    check_labels(tmp_path / "d.npz", 10, limit=2, start=0)
    with pytest.raises(DataError, match=r"1 labels outside"):
        check_labels(tmp_path / "d.npz", 10, start=1)  # label 12 lies in the selected images
    with pytest.raises(DataError, match=r"^advanced.eval.start: 3 is beyond the 3 images"):
        check_labels(tmp_path / "d.npz", 10, start=3)


def test_resize_brings_small_images_up_to_a_larger_input(tmp_path):
    """27-px JPEGs for a 30-px model (as 227-px files for EfficientNet-Lite1's 240): short side to 34, centre 30."""
    rng = np.random.default_rng(6)
    images = [Image.fromarray(rng.integers(0, 256, (27, 27, 3), dtype=np.uint8)) for _ in range(2)]
    blobs = write_jpeg_npz(tmp_path / "j.npz", images, y=[0, 1])
    pre = Preprocess(size=30, mean=(0.0,) * 3, std=(1.0,) * 3, resize=34)
    x, _ = load_images(tmp_path / "j.npz", pre)
    for got, blob in zip(x, blobs):
        resized = np.asarray(Image.fromarray(decode(blob)).resize((34, 34), Image.BILINEAR))
        assert np.array_equal(got, resized[2:32, 2:32])


def test_geometry_is_checked_from_the_first_image(tmp_path):
    from dfp_deploy.data.images import check_geometry, first_image_size

    images = [Image.new("RGB", (27, 25), (0, 0, 0)) for _ in range(2)]
    write_jpeg_npz(tmp_path / "j.npz", images, y=[0, 1])
    write_array_npz(tmp_path / "a.npz", random_images(2, 32, 36), np.zeros(2, np.int64))
    assert first_image_size(tmp_path / "j.npz") == (25, 27) and first_image_size(tmp_path / "a.npz") == (32, 36)
    check_geometry(tmp_path / "a.npz", CIFAR, "eval.data")  # larger: centre-cropped
    check_geometry(tmp_path / "j.npz", Preprocess(size=30, mean=(0.0,) * 3, std=(1.0,) * 3, resize=30), "eval.data")
    with pytest.raises(DataError, match=r"^compress.calibration.data: .*j.npz holds 25x27 images, smaller than the "
                                        r"model's 30x30 input; set advanced.model.resize \(e.g. "
                                        r"advanced.model.resize=34"):
        check_geometry(tmp_path / "j.npz", Preprocess(size=30, mean=(0.0,) * 3, std=(1.0,) * 3),
                       "compress.calibration.data")
