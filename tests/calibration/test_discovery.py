"""Finding the sub-images on synthetic bright fields whose truth is known: 16 flat rectangles of
different throughput, blurred, 4 px apart, with noise and hot pixels; then a blocked sub-optic,
two overlapping sub-images and a ghost, each of which must stop the calibration with a message
that says what was seen."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from calibration.discovery import DiscoveryError, find_subimages

SIZE, GAP, ORIGIN = 24, 4, 8  # rectangle side, gap between them, first corner (px)
NOISE = 0.003
SHAPE = (130, 150)


def layout(seed: int = 0) -> list[tuple[int, int, float]]:
    """(x0, y0, brightness) of a 4 × 4 grid of rectangles, throughput 0.3–1.0."""
    rng = np.random.default_rng(seed)
    step = SIZE + GAP
    return [
        (ORIGIN + c * step, ORIGIN + r * step, float(rng.uniform(0.3, 1.0)))
        for r in range(4)
        for c in range(4)
    ]


def bright_field(rects, extra=(), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(signal, noise σ): rectangles (x0, y0, b) and squares (x0, y0, side, b), a σ = 1.2 px
    blur, Gaussian noise and 40 hot pixels of +0.2."""
    rng = np.random.default_rng(seed)
    img = np.zeros(SHAPE)
    for x0, y0, b in rects:
        img[y0 : y0 + SIZE, x0 : x0 + SIZE] += b
    for x0, y0, side, b in extra:
        img[y0 : y0 + side, x0 : x0 + side] += b
    img = ndimage.gaussian_filter(img, 1.2)
    noise = np.full(SHAPE, NOISE)
    img += noise * rng.standard_normal(SHAPE)
    img.flat[rng.choice(img.size, 40, replace=False)] += 0.2
    return img, noise


def truth_centres(rects) -> np.ndarray:
    return np.array([(x0 + (SIZE - 1) / 2, y0 + (SIZE - 1) / 2) for x0, y0, _ in rects])


def matched_error(found, rects) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each found centre to its nearest true centre, and which one that is."""
    got = np.array([s.centre for s in found])
    return cKDTree(truth_centres(rects)).query(got)


def test_finds_all_16_subimages_one_per_rectangle():
    rects = layout()
    found = find_subimages(*bright_field(rects), expected=16)
    assert len(found) == 16
    dist, which = matched_error(found, rects)
    assert sorted(which) == list(range(16)) and dist.max() < 1.0
    areas = np.array([s.area_px for s in found])
    assert np.all(np.abs(areas - SIZE * SIZE) < 0.1 * SIZE * SIZE)


def test_found_centres_are_the_rectangles_centres():
    rects = layout()
    found = find_subimages(*bright_field(rects), expected=16)
    dist, _ = matched_error(found, rects)
    assert dist.max() < 0.25  # a shift-free opening gives 0.075 px here


def test_found_boxes_are_the_rectangles():
    rects = layout()
    found = find_subimages(*bright_field(rects), expected=16)
    boxes = {(y0, x0, SIZE, SIZE) for x0, y0, _ in rects}
    assert sum(s.box in boxes for s in found) >= 14


def test_found_subimages_are_in_raster_order_on_a_jittered_grid():
    rng = np.random.default_rng(3)
    rects = [
        (x0 + int(rng.integers(-1, 2)), y0 + int(rng.integers(-1, 2)), b) for x0, y0, b in layout()
    ]
    found = find_subimages(*bright_field(rects), expected=16)
    _, which = matched_error(found, rects)
    assert list(which) == list(range(16))


def test_a_blocked_subimage_stops_with_found_15_and_blocked():
    rects = layout()
    del rects[6]
    with pytest.raises(DiscoveryError) as err:
        find_subimages(*bright_field(rects), expected=16)
    message = str(err.value)
    assert "found 15" in message and "blocked" in message
    assert len(err.value.found) == 15
    assert err.value.frame.shape == SHAPE


def overlapping(px: int) -> list[tuple[int, int, float]]:
    """Rectangle 5 moved left onto rectangle 4 so that they share `px` columns."""
    rects = layout()
    x4, y4, _ = rects[4]
    rects[5] = (x4 + SIZE - px, y4, rects[5][2])
    return rects


def test_subimages_overlapping_by_30_percent_stop_with_overlap():
    with pytest.raises(DiscoveryError, match="overlap"):
        find_subimages(*bright_field(overlapping(round(0.3 * SIZE))), expected=16)


def test_subimages_overlapping_by_a_third_say_overlap_not_stray_light():
    with pytest.raises(DiscoveryError) as err:
        find_subimages(*bright_field(overlapping(SIZE // 3)), expected=16)
    assert "overlap" in str(err.value)


GHOST = (124, 58, 14, 0.6)  # a flat 14 px square right of the grid: a ghost sub-image


def test_an_extra_bright_blob_stops_with_stray_light():
    with pytest.raises(DiscoveryError) as err:
        find_subimages(*bright_field(layout(), extra=[GHOST]), expected=16)
    assert "stray light" in str(err.value) or "ghost" in str(err.value)


def test_a_dark_frame_says_nothing_is_lit():
    noise = np.full(SHAPE, NOISE)
    dark = noise * np.random.default_rng(0).standard_normal(SHAPE)
    with pytest.raises(DiscoveryError, match="nothing is lit"):
        find_subimages(dark, noise, expected=16)
