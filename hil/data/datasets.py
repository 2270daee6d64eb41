"""Datasets with deterministic splits: bundled, procedural, or read from their real on-disk formats.

`digits` is scikit-learn's bundled 8x8 handwritten digits (the embedded default) and `shapes` a
procedural segmentation set; neither needs files. `mnist`, `cifar10` and `carvana` read the files
as their publishers distribute them from a folder (`--data-root`); nothing is downloaded. Images
are float32 in [0, 1], (N, C, h, w); the optical student sees them placed on the display, the
teacher sees them raw. Where a dataset ships an official test set, `Dataset.split("test")` is
exactly that set, so results compare with the literature.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hil.errors import UserError

SPLIT_SEED = 20251207  # fixed forever: a sample stays in its split across runs and versions
FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # (N, C, h, w) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64, or (N, h, w) masks for segmentation
    classes: int
    task: str = "classification"
    # The publisher's test set (indices into images), or None to draw one by FRACTIONS.
    test_indices: np.ndarray | None = None

    def split(self, name: str) -> np.ndarray:
        """Indices of a split ("train", "val", "test"): stratified, the same on every run.

        With `test_indices` the test split is exactly that set and the rest is shared between
        train and val in the proportion FRACTIONS gives them.
        """
        if name not in FRACTIONS:
            raise UserError(f"unknown split {name!r}; choose from {', '.join(FRACTIONS)}")
        rng = np.random.default_rng(SPLIT_SEED)
        parts: dict[str, list[int]] = {k: [] for k in FRACTIONS}
        strata = self.labels if self.labels.ndim == 1 else np.zeros(len(self.labels), int)
        if self.test_indices is not None:
            test = np.unique(np.asarray(self.test_indices, np.int64))
            if name == "test":
                return test
            pool = np.setdiff1d(np.arange(len(self.labels)), test)
            val_share = FRACTIONS["val"] / (FRACTIONS["train"] + FRACTIONS["val"])
            for c in np.unique(strata[pool]):
                idx = rng.permutation(pool[strata[pool] == c])
                a = len(idx) - round(val_share * len(idx))
                parts["train"] += idx[:a].tolist()
                parts["val"] += idx[a:].tolist()
            return np.sort(np.asarray(parts[name], np.int64))
        for c in np.unique(strata):
            idx = rng.permutation(np.flatnonzero(strata == c))
            a = round(FRACTIONS["train"] * len(idx))
            b = a + round(FRACTIONS["val"] * len(idx))
            parts["train"] += idx[:a].tolist()
            parts["val"] += idx[a:b].tolist()
            parts["test"] += idx[b:].tolist()
        return np.sort(np.asarray(parts[name], np.int64))


def digits() -> Dataset:
    """1797 images (N, 1, 8, 8) and labels 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    return Dataset("digits", images, data.target.astype(np.int64), 10)


# ---------------------------------------------------------------------------------------------
# shapes: procedural segmentation


def shapes(n: int = 1000, size: int = 32, seed: int = 0) -> Dataset:
    """`n` noisy images (N, 1, size, size) of 1-3 bright ellipses, rectangles and triangles, with
    their foreground masks (N, size, size) in {0, 1}: a segmentation task that needs no files and
    is the same for a seed on every machine (numpy's PCG64 stream is stable across versions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.zeros((n, size, size), np.int64)
    for i in range(n):
        img = np.full((size, size), rng.uniform(0.0, 0.3))
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4)):
            inside = _random_shape(rng, xx, yy, size)
            img[inside] = rng.uniform(0.6, 1.0)
            mask |= inside
        img += rng.normal(0.0, 0.05, img.shape)
        images[i, 0] = np.clip(img, 0.0, 1.0)
        masks[i] = mask
    return Dataset("shapes", images, masks, 2, task="segmentation")


def _random_shape(rng: np.random.Generator, xx, yy, size: int) -> np.ndarray:
    """Pixels inside one randomly placed, sized and rotated ellipse, rectangle or triangle."""
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    a, b = rng.uniform(0.1, 0.25, 2) * size
    kind = rng.integers(3)
    if kind == 0:
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    if kind == 1:
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    angles = theta + 2 * np.pi * np.arange(3) / 3 + rng.uniform(-0.4, 0.4, 3)
    r = rng.uniform(0.15, 0.3) * size
    px, py = cx + r * np.cos(angles), cy + r * np.sin(angles)
    # Inside a counter-clockwise triangle: on the left of all three edges.
    sides = [
        (px[(k + 1) % 3] - px[k]) * (yy - py[k]) - (py[(k + 1) % 3] - py[k]) * (xx - px[k])
        for k in range(3)
    ]
    return np.logical_and.reduce([s >= 0 for s in sides]) | np.logical_and.reduce(
        [s <= 0 for s in sides]
    )


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


def _find_files(
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


def mnist(root: Path | str) -> Dataset:
    """MNIST from its four IDX files: 60000 + 10000 images (N, 1, 28, 28), labels 0-9.

    Looked for in `root`, `root/mnist` and `root/MNIST/raw` (torchvision's layout). The t10k
    files are the test split.
    """
    root = Path(root)
    expected = (
        "the four MNIST IDX files (raw or .gz) in this folder or its mnist/ or MNIST/raw/ subfolder"
    )
    paths = _find_files(root, ("", "mnist", "MNIST/raw"), MNIST_FILES, expected)
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
    return Dataset("mnist", images, labels, 10, test_indices=test)


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches, read without letting the pickle run anything

CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
# Plain numeric dtypes a CIFAR batch may hold; never object or structured ones.
_PICKLE_DTYPES = frozenset(
    ["b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"]
    + list("?bBhHiIlLqQefd")
)


class _DtypeSpec:
    """Stands in for numpy.dtype(code, ...): a whitelisted scalar code and its byte order."""

    def __init__(self, code, align=False, copy=False):
        code = code.decode("ascii") if isinstance(code, bytes) else code
        if not isinstance(code, str) or code not in _PICKLE_DTYPES:
            raise pickle.UnpicklingError(f"refuses dtype {code!r}: only plain numeric ones")
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise pickle.UnpicklingError("refuses a structured or sub-array dtype")
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            raise pickle.UnpicklingError(f"bad dtype byte order {order!r}")


class _Inert:
    """Refuses BUILD: a pickle must not set attributes on the stand-ins themselves."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("refuses to set state on a numpy stand-in")


class _NdarrayToken(_Inert):
    """Stands in for the class numpy.ndarray, which a pickle only passes to _reconstruct."""


class _ArraySpec:
    """Stands in for numpy's _reconstruct(ndarray, shape, dtype); __setstate__ builds the array
    from the pickled bytes with np.frombuffer, never from pickle-controlled pointers or objects."""

    array: np.ndarray | None = None  # stays None if the pickle never gives the state

    def __init__(self, subtype, shape, code):
        if subtype is not _NdarrayToken:
            raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("bad ndarray state")
        shape, spec, fortran, data = state[-4:]
        ok_shape = isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
        if not (ok_shape and isinstance(spec, _DtypeSpec) and isinstance(data, bytes | bytearray)):
            raise pickle.UnpicklingError("bad ndarray state")
        count = int(np.prod(shape, dtype=np.int64))
        if count * spec.dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f"array {shape} does not match its {len(data)} bytes")
        flat = np.frombuffer(data, spec.dtype, count)
        self.array = flat.reshape(shape, order="F" if fortran else "C").astype(
            spec.dtype.newbyteorder("=")
        )


class _Latin1Encode(_Inert):
    """_codecs.encode as Python 3 pickles bytes under protocol 2 (latin1 text), and nothing more."""

    def __call__(self, text, encoding):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode other than latin1 text to bytes")
        return text.encode("latin1")


# The only globals a pickle may name; each maps to an inert stand-in above, not to the real thing.
# numpy pickles an array as _reconstruct(ndarray, (0,), code) followed by a state tuple holding
# the shape, a dtype (itself reduced to numpy.dtype(code) plus a state) and the raw bytes; Python 3
# protocol-2 pickles write bytes as _codecs.encode(text, "latin1"). numpy.core is numpy 1.x's (and
# CIFAR's own Python 2) module path, numpy._core numpy 2's.
PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _ArraySpec,
    ("numpy._core.multiarray", "_reconstruct"): _ArraySpec,
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _DtypeSpec,
    ("_codecs", "encode"): _Latin1Encode(),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose find_class returns only the stand-ins in PICKLE_ALLOWED.

    Code runs out of a pickle only through the globals it names (GLOBAL / STACK_GLOBAL, then
    REDUCE / NEWOBJ / INST / OBJ calls them, BUILD sets state or attributes on objects); every
    other opcode builds only str, bytes, numbers, lists, tuples, dicts and sets. Refusing every
    other global, and making the allowed ones stand-ins that validate their arguments and own
    their __setstate__ (so BUILD cannot set attributes on them either), leaves nothing to run:
    numpy only ever sees np.frombuffer(bytes, a whitelisted numeric dtype). Persistent ids are
    refused by the base class, which has no persistent_load.
    """

    def find_class(self, module, name):
        found = PICKLE_ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refuses to load global {module}.{name}")
        return found


def _resolve(obj):
    """The unpickled object with each _ArraySpec replaced by its numpy array."""
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise pickle.UnpicklingError("an ndarray without its data")
        return obj.array
    if isinstance(obj, dict):
        return {_resolve(k): _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def read_safe_pickle(path: Path | str):
    """A pickle of plain containers, bytes, numbers and numeric numpy arrays (CIFAR's batches),
    read without executing anything from the file. Python 2 strings come back as bytes."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _resolve(_RestrictedUnpickler(f, encoding="bytes").load())
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: {e}") from None
    except Exception as e:  # truncated or garbled: EOFError, ValueError, KeyError, ...
        raise UserError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from None


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


def cifar10(root: Path | str) -> Dataset:
    """CIFAR-10's python batches: 50000 + 10000 images (N, 3, 32, 32), labels 0-9.

    Looked for in `root` and `root/cifar-10-batches-py`; test_batch is the test split.
    batches.meta, when present, gives the number of classes.
    """
    root = Path(root)
    expected = (
        "CIFAR-10's python batches (data_batch_1..5, test_batch, batches.meta) "
        "in this folder or its cifar-10-batches-py/ subfolder"
    )
    paths = _find_files(root, ("", "cifar-10-batches-py"), CIFAR_BATCHES, expected, gz=False)
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
    return Dataset("cifar10", images, labels, classes, test_indices=test)


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


def carvana(root: Path | str, size: int = 64) -> Dataset:
    """Kaggle's Carvana layout: train/ID.jpg with train_masks/ID_mask.gif (or .png), both
    resized to size x size: images (N, 3, s, s), masks (N, s, s) in {0, 1}.

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
    return Dataset("carvana", images, masks, 2, task="segmentation")


def _reduced_decode_flag(hw: tuple[int, int], size: int) -> int:
    """The coarsest IMREAD_REDUCED_COLOR_k whose images stay at least 2 x `size` on each side."""
    for k, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                    (2, cv2.IMREAD_REDUCED_COLOR_2)):  # fmt: skip
        if min(hw) // k >= 2 * size:
            return flag
    return cv2.IMREAD_COLOR


# ---------------------------------------------------------------------------------------------

LOADERS = {
    "digits": digits,
    "shapes": shapes,
    "mnist": mnist,
    "cifar10": cifar10,
    "carvana": carvana,
}
NEEDS_ROOT = frozenset({"mnist", "cifar10", "carvana"})  # these read files from --data-root


def load_dataset(name: str, root: Path | str | None = None) -> Dataset:
    """The dataset `name`; those in NEEDS_ROOT read their files from `root`."""
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; available: {', '.join(LOADERS)}")
    if name in NEEDS_ROOT:
        if root is None:
            raise UserError(f"dataset {name!r} reads its files from a folder: give --data-root")
        return LOADERS[name](Path(root))
    return LOADERS[name]()
