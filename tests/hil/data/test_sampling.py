"""Sampling within a split: fixed by its seed, inside the indices, every class kept."""

from __future__ import annotations

import numpy as np

from hil.data.datasets import load_dataset
from hil.data.sampling import balanced_subset, fraction_size, stratified_fraction


def test_a_balanced_subset_is_fixed_inside_the_split_and_as_equal_per_class_as_it_can_be():
    data = load_dataset("digits")
    train = data.split("train")
    a, b = (balanced_subset(data.labels, train, 500, 0) for _ in range(2))
    assert np.array_equal(a, b) and len(a) == 500 and set(a) <= set(train)
    assert np.all(np.diff(a) > 0)  # sorted, no repeats
    counts = np.bincount(data.labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1, counts
    assert not np.array_equal(a, balanced_subset(data.labels, train, 500, 1))
    labels = np.array([0] * 9 + [1])
    assert 9 in balanced_subset(labels, np.arange(10), 3, 0)  # class 1's only sample


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


def test_masks_are_one_stratum():
    masks = np.zeros((20, 4, 4), np.int64)
    for got in (
        balanced_subset(masks, np.arange(20), 5, 0),
        stratified_fraction(masks, np.arange(20), 0.25, 0),
    ):
        assert len(got) == 5 and len(set(got)) == 5


def test_the_fraction_draw_is_the_one_capture_has_always_made():
    """Per class in label order, one seeded generator's permutation, the first ones: the
    selection `hil capture --fraction` made before the sampler moved here (so the demo's 109
    training captures are the same samples)."""
    digits = load_dataset("digits")
    idx = digits.split("train")
    rng, keep = np.random.default_rng(0), []
    for c in range(10):
        members = rng.permutation(idx[digits.labels[idx] == c])
        keep += members[: max(1, round(0.1 * len(members)))].tolist()
    got = stratified_fraction(digits.labels, idx, 0.1, 0)
    assert len(got) == 109 and np.array_equal(got, np.sort(keep))
