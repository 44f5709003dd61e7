"""Read evaluation/calibration images from an npz file into uint8 NHWC arrays at the model's size, and normalise them.

Two layouts are accepted:
  (a) `x` uint8 [N, H, W, 3] RGB (+ `y` int [N]): the CIFAR files;
  (b) `jpeg` uint8 [concatenated JPEG bytes], `offsets` int [N + 1] (image i is jpeg[offsets[i]:offsets[i+1]])
      (+ `y` int [N]): the ImageNet files.

Geometry for Preprocess(size, resize): an image that is already size x size passes through bit-exact. Otherwise,
with `resize` set, the short side is resized to `resize` (bilinear, long side = floor(long * resize / short)) and the
centre size x size is cut; without `resize`, the centre is cut directly, and an image smaller than `size` is an error
(the recipe key `advanced.model.resize` sets `resize`; `check_geometry` refuses a mismatch before any work).
The centre crop starts at floor((H - size) / 2), floor((W - size) / 2).

Selection: images [start, start + limit) of the file, in file order (a tuning and a reporting split of one file).

Normalisation (to_tensor): t[n, c, h, w] = (x[n, h, w, c] - mean[c]) / std[c], mean and std in 0..255 units.
"""

from __future__ import annotations

import io
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dfp_deploy.core.errors import DataError
from dfp_deploy.core.types import Preprocess

PROGRESS_MIN_IMAGES = 200
EXPECTED_LAYOUTS = "'x' uint8 [N,H,W,3] (+ 'y'), or 'jpeg' + 'offsets' [N+1] (+ 'y')"
# what a damaged npz raises while numpy reads it: a bad zip directory or CRC, a corrupt deflate stream, a
# truncated member, a header numpy cannot parse, a compression method zipfile lacks
_READ_ERRORS = (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, KeyError,
                SyntaxError, TypeError)


def load_images(
    path: str | Path,
    preprocess: Preprocess,
    limit: int | None = None,
    require_labels: bool = True,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images as uint8 [N, size, size, 3] (`limit` images of the file from index `start`) and labels int64 [N]
    (None if absent)."""
    _check_limit(limit)
    _check_start(start)
    with _open_npz(Path(path)) as data:
        keys = set(data.files)
        if "x" in keys:
            images = _read_array_images(data, path)
            count = len(images)
        elif "jpeg" in keys and "offsets" in keys:
            jpeg, offsets = _read_jpeg_index(data, path)
            count = len(offsets) - 1
        else:
            raise DataError(f"{path} has keys {sorted(keys)}: expected {EXPECTED_LAYOUTS}")
        labels = _read_labels(data, path) if "y" in keys else None
        if labels is None and require_labels:
            raise DataError(f"{path} has no labels 'y': accuracy needs labelled images ({EXPECTED_LAYOUTS})")
        if labels is not None and len(labels) != count:
            raise DataError(f"{path}: {count} images but {len(labels)} labels in 'y'; they must have the same length")
        if start >= count:
            raise DataError(f"{path} holds {count} images: the first image asked for is index {start}; start below "
                            f"{count} (advanced.eval.start)")
        end = count if limit is None else min(start + int(limit), count)
        if "x" in keys:
            out = _fit_array_images(images[start:end], preprocess, path)
        else:
            out = _decode_jpegs(jpeg, offsets, start, end, preprocess, path)
    return out, (None if labels is None else labels[start:end])


def to_tensor(x_uint8: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, (x - mean) / std per channel."""
    if not isinstance(x_uint8, np.ndarray) or x_uint8.dtype != np.uint8 or x_uint8.ndim != 4 or x_uint8.shape[3] != 3:
        got = (
            f"{x_uint8.dtype} {x_uint8.shape}" if isinstance(x_uint8, np.ndarray) else type(x_uint8).__name__
        )
        raise DataError(f"to_tensor expects uint8 images [N, H, W, 3], got {got}")
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    normalised = (x_uint8.astype(np.float32) - mean) / std
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def _check_limit(limit) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise DataError(f"limit must be a positive number of images or None, got {limit!r}")


def _check_start(start) -> None:
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise DataError(f"start must be a non-negative image index, got {start!r}")


def _open_npz(path: Path):
    if not path.exists():
        raise DataError(f"data file {path} does not exist: check the data path")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file: point it at an .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(f"{path} is not a readable npz file ({_first_line(exc)}): expected {EXPECTED_LAYOUTS}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an npz: save with np.savez(path, x=..., y=...)")
    return data


def _read_labels(data, path) -> np.ndarray:
    y = _load_key(data, "y", path)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be integer class ids of shape [N], got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def _load_key(data, key: str, path) -> np.ndarray:
    try:
        return data[key]
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: array '{key}' cannot be read ({_first_line(exc)}); the file is damaged or "
                        "truncated") from exc


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:160]}"


def check_file(path: str | Path, key: str) -> None:
    """Refuse, before any work, a data file that is missing, not an npz, or damaged: every member's CRC-32 is checked
    (deflate streams decompressed on the way, a few hundred MB/s), so a corrupt image array fails here, not after
    export. The message starts with the recipe key."""
    try:
        with _open_npz(Path(path)) as data:
            try:
                bad = data.zip.testzip()
            except _READ_ERRORS as exc:
                raise DataError(f"{path} is damaged ({_first_line(exc)}); copy or save it again") from exc
            if bad is not None:
                raise DataError(f"{path} is damaged: member {bad!r} fails its CRC-32 check; copy or save it again")
    except DataError as exc:
        raise DataError(f"{key}: {exc}") from exc


def check_labels(path: str | Path, num_classes: int, limit: int | None = None, key: str = "eval.data",
                 start: int = 0) -> None:
    """Refuse labels outside [0, num_classes) before any work: a top-1 against them is 0 % and says nothing.
    Refuse a `start` (advanced.eval.start) at or beyond the file's labelled images too.

    Reads only 'y' (the images are not decoded); a file without labels passes (load_images refuses it later where
    labels are required)."""
    _check_limit(limit)
    _check_start(start)
    with _open_npz(Path(path)) as data:
        if "y" not in data.files:
            return
        y = _read_labels(data, path)
    if start >= len(y):
        raise DataError(f"advanced.eval.start: {start} is beyond the {len(y)} images of {path}; the selected images "
                        f"are [start, start + eval.limit), so advanced.eval.start must be below {len(y)}")
    y = y[start:] if limit is None else y[start:start + limit]
    if len(y) == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = int(np.count_nonzero((y < 0) | (y >= num_classes)))
        raise DataError(f"{key}: {path} has {bad} labels outside the model's classes [0, {num_classes}) "
                        f"(min {low}, max {high}); check that the data set matches model.name and its num_classes")


def _read_array_images(data, path) -> np.ndarray:
    x = _load_key(data, "x", path)
    if x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 1):
        raise DataError(f"{path}: 'x' {x.shape} holds 1-channel images; they must be RGB [N, H, W, 3]")
    if x.ndim != 4 or x.shape[3] != 3:
        raise DataError(f"{path}: 'x' must be RGB images [N, H, W, 3] (channels last), got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' must be uint8 pixels 0..255, got {x.dtype}")
    return x


def _read_jpeg_index(data, path) -> tuple[np.ndarray, np.ndarray]:
    jpeg = _load_key(data, "jpeg", path)
    offsets = _load_key(data, "offsets", path)
    if jpeg.ndim != 1 or jpeg.dtype != np.uint8:
        raise DataError(f"{path}: 'jpeg' must be uint8 bytes of shape [B], got {jpeg.dtype} {jpeg.shape}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 1:
        raise DataError(f"{path}: 'offsets' must be integers of shape [N+1], got {offsets.dtype} {offsets.shape}")
    if offsets[0] < 0 or offsets[-1] > len(jpeg) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{path}: 'offsets' must increase strictly from >= 0 up to len(jpeg) = {len(jpeg)}")
    return jpeg, offsets.astype(np.int64)


def _fit_array_images(x: np.ndarray, preprocess: Preprocess, path) -> np.ndarray:
    height, width = x.shape[1:3]
    if height == width == preprocess.size:
        return x
    if preprocess.resize is None:
        return _centre_crop_batch(x, preprocess.size, path)
    from PIL import Image

    return np.stack([_fit_image(Image.fromarray(img), preprocess, path, i) for i, img in enumerate(x)])


def _centre_crop_batch(x: np.ndarray, size: int, path) -> np.ndarray:
    height, width = x.shape[1:3]
    if height < size or width < size:
        raise DataError(f"{path}: images are {height}x{width}, smaller than the model's {size}x{size} input; "
                        f"set advanced.model.resize (e.g. {suggested_resize(size)}) or model.input_size")
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(x[:, top : top + size, left : left + size])


def _fit_image(img, preprocess: Preprocess, path, index: int) -> np.ndarray:
    """One PIL RGB image -> uint8 [size, size, 3] under the resize / centre-crop rule."""
    size = preprocess.size
    width, height = img.size
    if width == height == size:
        return np.asarray(img, dtype=np.uint8)
    if preprocess.resize is not None and min(width, height) != preprocess.resize:
        img = _resize_short_side(img, preprocess.resize)
        width, height = img.size
    if width < size or height < size:
        raise DataError(
            f"{path}: image {index} is {height}x{width}, smaller than the model's {size}x{size} input; "
            f"set advanced.model.resize (e.g. {suggested_resize(size)}: the short side is resized to it, then the "
            f"centre {size}x{size} is cut) or model.input_size"
        )
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _resize_short_side(img, short: int):
    from PIL import Image

    width, height = img.size
    if width <= height:
        new_size = (short, int(height * short / width))
    else:
        new_size = (int(width * short / height), short)
    return img.resize(new_size, Image.BILINEAR)


def _decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, start: int, end: int, preprocess: Preprocess,
                  path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((end - start, preprocess.size, preprocess.size, 3), dtype=np.uint8)
    for i in _progress(range(start, end), end - start, f"decoding {Path(path).name}"):
        blob = jpeg[offsets[i] : offsets[i + 1]].tobytes()
        try:
            with Image.open(io.BytesIO(blob)) as img:
                # JPEG datasets hold a few greyscale/CMYK images; models expect RGB
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{path}: image {i} is not a decodable image ({exc})") from exc
        out[i - start] = _fit_image(rgb, preprocess, path, i)
    return out


def suggested_resize(size: int) -> int:
    """The short side torchvision's ImageNet evaluation resizes to for a `size` crop (256 for 224)."""
    return round(size * 256 / 224)


def first_image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) of the file's first image, read without decoding the others (None: the file holds none)."""
    from PIL import Image, UnidentifiedImageError

    with _open_npz(Path(path)) as data:
        keys = set(data.files)
        if "x" in keys:
            x = _read_array_images(data, path)
            return (int(x.shape[1]), int(x.shape[2])) if len(x) else None
        if "jpeg" in keys and "offsets" in keys:
            jpeg, offsets = _read_jpeg_index(data, path)
            if len(offsets) < 2:
                return None
            try:
                with Image.open(io.BytesIO(jpeg[offsets[0] : offsets[1]].tobytes())) as img:
                    return int(img.size[1]), int(img.size[0])
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataError(f"{path}: image 0 is not a decodable image ({exc})") from exc
    raise DataError(f"{path} has keys {sorted(keys)}: expected {EXPECTED_LAYOUTS}")


def check_geometry(path: str | Path, preprocess: Preprocess, key: str) -> None:
    """Refuse, before any work, images that the preprocessing cannot bring to the model's input: without a resize,
    an image smaller than the input. Only the first image is read (files of mixed sizes fail later, at decode)."""
    size = preprocess.size
    if preprocess.resize is not None:
        return  # every image is resized to short side `resize` >= size (recipe/loader check it) before the crop
    hw = first_image_size(path)
    if hw is None or min(hw) >= size:
        return
    raise DataError(f"{key}: {path} holds {hw[0]}x{hw[1]} images, smaller than the model's {size}x{size} input; "
                    f"set advanced.model.resize (e.g. advanced.model.resize={suggested_resize(size)}: short side "
                    f"resized to {suggested_resize(size)}, centre {size}x{size} cut) or model.input_size to the "
                    "images' size")


def _progress(iterable, total: int, desc: str):
    if total <= PROGRESS_MIN_IMAGES:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
