"""The one stratified sampler: a seeded, class-proportional subset, by scikit-learn.

`hil capture --fraction`, `hil finetune`'s training rows and the NTK estimate's subsets all draw
with `stratified_subset`, so "10% of the split" means the same samples wherever it is asked for
with the same seed. Segmentation masks have no class per sample: their subsets are plain seeded
shuffles. (`Dataset.split` is not a sampler: it defines the splits, fixed forever.)
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from hil.errors import UserError

__all__ = ["fraction_size", "stratified_fraction", "stratified_subset"]


def fraction_size(labels: np.ndarray, indices: np.ndarray, fraction: float) -> int:
    """How many of `indices` a fraction takes: each class's share rounded, at least one each."""
    indices = np.asarray(indices, np.int64)
    if fraction >= 1:
        return len(indices)
    if labels.ndim != 1:
        return max(1, round(fraction * len(indices)))
    counts = np.unique(labels[indices], return_counts=True)[1]
    return int(np.maximum(1, np.round(fraction * counts)).sum())


def stratified_subset(
    labels: np.ndarray, indices: np.ndarray, size: int | None, seed: int
) -> np.ndarray:
    """`size` of `indices` (all of them when None or more), sorted, each class in proportion to
    its share (`sklearn.model_selection.train_test_split(stratify=...)`, seeded by `seed`).

    `labels` is indexed by the entries of `indices`; masks (ndim > 1) are not stratified.
    """
    indices = np.asarray(indices, np.int64)
    if size is None or size >= len(indices):
        return np.sort(indices)
    strata = labels[indices] if labels.ndim == 1 else None
    if strata is not None and len(np.unique(strata)) < 2:
        strata = None
    try:
        chosen, _ = train_test_split(
            indices, train_size=int(size), stratify=strata, random_state=seed
        )
    except ValueError as e:  # a class too small to split, or fewer samples than classes
        raise UserError(f"cannot draw a stratified {size} of {len(indices)} samples: {e}") from None
    return np.sort(chosen)


def stratified_fraction(
    labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """`stratified_subset` of `fraction_size(labels, indices, fraction)` samples."""
    return stratified_subset(labels, indices, fraction_size(labels, indices, fraction), seed)
