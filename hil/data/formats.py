"""The publishers' on-disk formats, read as arrays: MNIST's IDX files, CIFAR-10's python batches
(through `hil.data.safe_pickle`), Kaggle's Carvana images and masks. Every malformed file is a
`UserError` naming it; `hil.data.datasets` turns the arrays into datasets.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import cv2
import numpy as np

from hil.data.safe_pickle import read_safe_pickle
from hil.errors import UserError

__all__ = [
    "CIFAR_BATCHES",
    "MNIST_FILES",
    "find_files",
    "read_carvana",
    "read_cifar10",
    "read_idx",
    "read_mnist",
]

# ---------------------------------------------------------------------------------------------
# MNIST: IDX files

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# IDX type codes (third byte of the magic number); all values big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """An IDX file (raw, or gzipped when its name ends in .gz) as a native-endian array.

    The header is two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32; the data must fill exactly the size they promise.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if len(raw) < 4:
        raise UserError(f"{path}: truncated: {len(raw)} bytes, shorter than an IDX header")
    if raw[0] or raw[1] or raw[2] not in _IDX_TYPES:
        raise UserError(
            f"{path}: not an IDX file: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000, a type code 08-0E, the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated inside the header ({ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    need, have = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize, len(raw) - header
    if have != need:
        problem = "truncated" if have < need else "has trailing bytes"
        raise UserError(f"{path}: {problem}: dimensions {dims} need {need} bytes, found {have}")
    data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def find_files(
    root: Path, subdirs: tuple[str, ...], names, expected: str, gz: bool = True
) -> list[Path]:
    """Each of `names` (or, with `gz`, name.gz) in the first root/subdir that holds them all.

    Otherwise a UserError names the first file missing from the most complete candidate folder.
    """
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found; expected {expected}")
    suffixes = ("", ".gz") if gz else ("",)
    best: tuple[int, Path, str] | None = None
    for sub in subdirs:
        folder = root / sub if sub else root
        found = [
            next((folder / f"{n}{s}" for s in suffixes if (folder / f"{n}{s}").is_file()), None)
            for n in names
        ]
        missing = [n for n, p in zip(names, found, strict=True) if p is None]
        if not missing:
            return found
        if best is None or len(names) - len(missing) > best[0]:
            best = (len(names) - len(missing), folder, missing[0])
    assert best is not None
    raise UserError(f"{best[1]}: missing {best[2]}{'(.gz)' if gz else ''}; expected {expected}")


def read_mnist(root: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNIST's four IDX files: 60000 + 10000 images (N, 1, 28, 28) float32, labels 0-9, and the
    indices of the test images.

    Looked for in `root`, `root/mnist` and `root/MNIST/raw` (torchvision's layout). The t10k
    files are the test split.
    """
    root = Path(root)
    expected = (
        "the four MNIST IDX files (raw or .gz) in this folder or its mnist/ or MNIST/raw/ subfolder"
    )
    paths = find_files(root, ("", "mnist", "MNIST/raw"), MNIST_FILES, expected)
    arrays = [read_idx(p) for p in paths]
    for p, a, ndim in zip(paths, arrays, (3, 1, 3, 1), strict=True):
        if a.ndim != ndim or a.dtype != np.uint8:
            raise UserError(f"{p}: expected {ndim}-D unsigned bytes, found {a.ndim}-D {a.dtype}")
    train_x, train_y, test_x, test_y = arrays
    for k in (0, 2):  # (images, labels) of train, then of test
        (x, y), (px, py) = arrays[k : k + 2], paths[k : k + 2]
        if len(x) != len(y):
            raise UserError(f"{py}: {len(y)} labels for the {len(x)} images of {px.name}")
        if y.size and y.max() > 9:
            raise UserError(f"{py}: label {y.max()} outside 0-9")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(f"{paths[2]}: images {test_x.shape[1:]} differ from training's")
    images = np.concatenate([train_x, test_x])[:, None].astype(np.float32) / 255
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    test = np.arange(len(train_x), len(images), dtype=np.int64)
    return images, labels, test


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches, read without letting the pickle run anything

CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def _str_keys(obj, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(read_safe_pickle(path), path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise UserError(f"{path}: 'data' is not an (N, 3072) uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' rows hold {data.shape[1]} bytes, expected 3072")
    try:
        labels = np.asarray(labels, np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: 'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(f"{path}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(f"{path}: labels outside 0-{classes - 1}")
    # A row is the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root: Path | str) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """CIFAR-10's python batches: 50000 + 10000 images (N, 3, 32, 32) float32, labels 0-9, the
    number of classes and the indices of the test images.

    Looked for in `root` and `root/cifar-10-batches-py`; test_batch is the test split.
    batches.meta, when present, gives the number of classes.
    """
    root = Path(root)
    expected = (
        "CIFAR-10's python batches (data_batch_1..5, test_batch, batches.meta) "
        "in this folder or its cifar-10-batches-py/ subfolder"
    )
    paths = find_files(root, ("", "cifar-10-batches-py"), CIFAR_BATCHES, expected, gz=False)
    folder = paths[0].parent
    classes = 10
    if (folder / "batches.meta").is_file():
        meta = _str_keys(read_safe_pickle(folder / "batches.meta"), folder / "batches.meta")
        names = meta.get("label_names")
        if not isinstance(names, list) or not names:
            raise UserError(f"{folder / 'batches.meta'}: no 'label_names' list")
        classes = len(names)
    parts = [_cifar_batch(p, classes) for p in paths]
    images = np.concatenate([x for x, _ in parts]).astype(np.float32) / 255
    labels = np.concatenate([y for _, y in parts])
    test = np.arange(len(images) - len(parts[-1][1]), len(images), dtype=np.int64)
    return images, labels, classes, test


# ---------------------------------------------------------------------------------------------
# Carvana: Kaggle's car images and masks

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MASK_SUFFIXES = (".gif", ".png")


def _read_mask(path: Path) -> np.ndarray:
    """A mask file as a (H, W) bool array: foreground above half the file's largest value, so
    0/1 and 0/255 masks (Carvana's GIFs decode to either, depending on the reader) agree."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:  # OpenCV before 4.7 has no GIF decoder
        try:
            from PIL import Image

            with Image.open(path) as im:
                mask = np.asarray(im.convert("L"))
        except Exception as e:
            raise UserError(f"{path}: not a readable mask image: {e}") from None
    top = int(mask.max())
    return mask > top / 2 if top else np.zeros(mask.shape, bool)


def read_carvana(root: Path | str, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Kaggle's Carvana layout: train/ID.jpg with train_masks/ID_mask.gif (or .png), both
    resized to size x size: images (N, 3, s, s) float32, masks (N, s, s) in {0, 1}.

    Looked for in `root` and `root/carvana`. Large JPEGs are decoded at a reduced scale (still at
    least twice `size`), which is several times faster and loses nothing after the resize.
    """
    root = Path(root)
    expected = "train/ID.jpg images and train_masks/ID_mask.gif masks (Kaggle's Carvana layout)"
    folder = next((f for f in (root, root / "carvana") if (f / "train").is_dir()), None)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found; expected {expected}")
    if folder is None:
        raise UserError(f"{root}: missing train/; expected {expected}")
    if not (folder / "train_masks").is_dir():
        raise UserError(f"{folder}: missing train_masks/; expected {expected}")
    files = sorted(p for p in (folder / "train").iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder / 'train'}: no .jpg or .png images; expected {expected}")
    images = np.empty((len(files), 3, size, size), np.float32)
    masks = np.empty((len(files), size, size), np.int64)
    flag = cv2.IMREAD_COLOR
    for i, path in enumerate(files):
        candidates = [folder / "train_masks" / f"{path.stem}_mask{s}" for s in _MASK_SUFFIXES]
        mask_path = next((p for p in candidates if p.is_file()), None)
        if mask_path is None:
            raise UserError(
                f"{folder / 'train_masks'}: missing {path.stem}_mask.gif (or .png), "
                f"the mask of train/{path.name}"
            )
        img = cv2.imread(str(path), flag)
        if img is None:
            raise UserError(f"{path}: not an image OpenCV can read")
        if i == 0:
            flag = _reduced_decode_flag(img.shape[:2], size)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        images[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) / np.float32(255)
        mask = _read_mask(mask_path).astype(np.uint8)
        masks[i] = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return images, masks


def _reduced_decode_flag(hw: tuple[int, int], size: int) -> int:
    """The coarsest IMREAD_REDUCED_COLOR_k whose images stay at least 2 x `size` on each side."""
    for k, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                    (2, cv2.IMREAD_REDUCED_COLOR_2)):  # fmt: skip
        if min(hw) // k >= 2 * size:
            return flag
    return cv2.IMREAD_COLOR
