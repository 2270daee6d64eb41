"""Datasets that need no download, with deterministic splits.

`digits` is scikit-learn's bundled 8x8 handwritten digits (the embedded default). Images are
float32 in [0, 1], (N, C, h, w); the optical student sees them placed on the display, the teacher
sees them raw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hil.errors import UserError
from hil.render import place_on_display

SPLIT_SEED = 20251207  # fixed forever: a sample stays in its split across runs and versions
FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # (N, C, h, w) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64, or (N, h, w) masks for segmentation
    classes: int
    task: str = "classification"

    def split(self, name: str) -> np.ndarray:
        """Indices of a split ("train", "val", "test"): stratified, the same on every run."""
        if name not in FRACTIONS:
            raise UserError(f"unknown split {name!r}; choose from {', '.join(FRACTIONS)}")
        rng = np.random.default_rng(SPLIT_SEED)
        parts: dict[str, list[int]] = {k: [] for k in FRACTIONS}
        strata = self.labels if self.labels.ndim == 1 else np.zeros(len(self.labels), int)
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


LOADERS = {"digits": digits}


def load_dataset(name: str) -> Dataset:
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; available: {', '.join(LOADERS)}")
    return LOADERS[name]()


def to_display(images: np.ndarray, display_hw: tuple[int, int], fill: float = 0.75) -> np.ndarray:
    """Images (N, C, h, w) as the display shows them: (N, C, H, W), scaled and centred."""
    out = [place_on_display(img.transpose(1, 2, 0), display_hw, fill) for img in images]
    out = np.asarray(out, np.float32)
    return out[:, None] if out.ndim == 3 else out.transpose(0, 3, 1, 2)
