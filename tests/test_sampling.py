"""The one stratified sampler: fixed by its seed, inside the indices, each class in proportion."""

from __future__ import annotations

import numpy as np
import pytest

from hil.data.datasets import load_dataset
from hil.data.sampling import fraction_size, stratified_fraction, stratified_subset
from hil.errors import UserError


def test_a_subset_is_fixed_inside_the_split_and_each_class_within_one_of_its_share():
    data = load_dataset("digits")
    train = data.split("train")
    a, b = (stratified_subset(data.labels, train, 500, 0) for _ in range(2))
    assert np.array_equal(a, b) and len(a) == 500 and set(a) <= set(train)
    assert np.all(np.diff(a) > 0)  # sorted, no repeats
    counts = np.bincount(data.labels[a], minlength=10)
    share = 500 * np.bincount(data.labels[train], minlength=10) / len(train)
    assert np.all(np.abs(counts - share) < 1), (counts, share)
    assert not np.array_equal(a, stratified_subset(data.labels, train, 500, 1))


def test_a_fraction_rounds_each_class_and_keeps_at_least_one():
    labels = np.array([0] * 96 + [1] * 3 + [2] * 1)
    idx = np.arange(100)
    assert fraction_size(labels, idx, 0.1) == 10 + 1 + 1  # round(9.6), max(1, 0.3), max(1, 0.1)
    assert fraction_size(labels, idx, 1.0) == 100
    digits = load_dataset("digits")
    test = digits.split("test")
    chosen = stratified_fraction(digits.labels, test, 0.1, 3)
    want = np.maximum(1, np.round(0.1 * np.bincount(digits.labels[test], minlength=10)))
    np.testing.assert_array_equal(np.bincount(digits.labels[chosen], minlength=10), want)
    assert np.array_equal(stratified_fraction(digits.labels, test, 1.0, 3), test)


def test_masks_are_shuffled_and_impossible_strata_are_one_line():
    masks = np.zeros((20, 4, 4), np.int64)
    got = stratified_subset(masks, np.arange(20), 5, 0)
    assert len(got) == 5 and len(set(got)) == 5
    with pytest.raises(UserError, match="cannot draw a stratified 2 of 4 samples"):
        stratified_subset(np.array([0, 0, 1, 2]), np.arange(4), 2, 0)
