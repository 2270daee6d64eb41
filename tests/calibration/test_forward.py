"""The per-tile forward model: the design's "same" convolution, light kept through the recording
operator, the kernel recovered from random binary patterns, and the pixels only one tile sees."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibration.forward import (
    TileModel,
    convolve,
    estimate_kernel,
    exclusive_masks,
    light_reach,
    margin_for,
    render,
)
from calibration.tilemap import PaddedGrid, TileMap

HW = (16, 16)
FRAME = (120, 120)
VIGNETTING = 0.1


def rot(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, s], [-s, c]])


def tile_at(x: float, y: float, scale: float = 2.48, k1: float = 0.03) -> TileMap:
    """A tile with the input grid's centre imaged at (x, y), rotated by 17°."""
    linear = scale * rot(17)
    shift = np.array([x, y]) - linear @ np.array([(HW[1] - 1) / 2, (HW[0] - 1) / 2])
    return TileMap.from_affine(np.hstack([linear, shift[:, None]]), HW, k1)


@pytest.mark.parametrize("k", [4, 5, 7])
def test_convolve_is_torch_conv2d_with_the_flipped_kernel_in_the_designs_window(k):
    rng = np.random.default_rng(k)
    emitted = rng.random((3, 2, 12, 10))
    kernel = rng.random((2, k, k))
    off = k - 1 - (k - 1) // 2  # the "same" window starts at `off` in the full convolution
    before, after = k - 1 - off, off
    padded = F.pad(torch.as_tensor(emitted), (before, after, before, after))
    flipped = torch.as_tensor(kernel).flip(-1, -2)[None]
    expected = F.conv2d(padded, flipped)[:, 0].numpy()
    np.testing.assert_allclose(convolve(emitted, kernel), expected, atol=1e-12)


def test_convolve_of_an_impulse_places_the_kernel_at_the_window_offset():
    k = 5
    kernel = np.random.default_rng(0).random((1, k, k))
    emitted = np.zeros((1, 1, 11, 11))
    emitted[0, 0, 5, 5] = 1.0
    out = convolve(emitted, kernel)[0]
    off = k - 1 - (k - 1) // 2
    np.testing.assert_allclose(out[5 - off : 5 - off + k, 5 - off : 5 - off + k], kernel[0])
    assert out.sum() == pytest.approx(kernel.sum())


def model_for(k: int, tile: TileMap | None = None) -> tuple[TileModel, PaddedGrid]:
    grid = PaddedGrid(*HW, margin_for(k))
    return TileModel.build(tile or tile_at(60.0, 60.0), grid, FRAME), grid


def patterns(n: int, grid: PaddedGrid, seed: int) -> np.ndarray:
    """n random binary input-grid patterns as padded-grid light (n, 1, Hp, Wp)."""
    rng = np.random.default_rng(seed)
    return grid.pad((rng.random((n, 1, *HW)) > 0.5).astype(np.float64))


@pytest.mark.parametrize("k", [5, 7])
def test_render_keeps_all_the_light_of_kernel_and_pattern_in_the_tiles_region(k):
    model, grid = model_for(k)
    emitted = patterns(4, grid, seed=1)
    kernel = np.random.default_rng(2).random((1, k, k))
    signal = render(model, emitted, kernel, 0.0)
    expected = kernel.sum() * emitted.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(signal.sum(axis=1), expected, rtol=1e-4)
    assert light_reach(grid.margin) >= k // 2 + 1


def test_render_applies_vignetting_by_the_radial_distance_of_each_pixel():
    model, grid = model_for(5)
    emitted = patterns(2, grid, seed=3)
    kernel = np.random.default_rng(4).random((1, 5, 5))
    flat, dimmed = render(model, emitted, kernel, 0.0), render(model, emitted, kernel, 0.1)
    assert model.radial.max() > 0.5
    np.testing.assert_allclose(dimmed, flat * (1 - 0.1 * model.radial), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [5, 7])
def test_estimate_kernel_recovers_a_random_kernel_from_24_noiseless_patterns(k):
    model, grid = model_for(k)
    kernel = np.random.default_rng(k).random((1, k, k))
    emitted = patterns(24, grid, seed=10 + k)
    signal = render(model, emitted, kernel, VIGNETTING)
    mask = np.ones(signal.shape[1], bool)
    est, rel = estimate_kernel(model, emitted, signal, k, mask, VIGNETTING)
    np.testing.assert_allclose(est, kernel, atol=1e-5)
    assert rel < 1e-5


def noisy_error(model, grid, kernel, n: int, seed: int) -> float:
    """RMS kernel error from n patterns with Poisson-like noise (variance ∝ signal)."""
    rng = np.random.default_rng(seed)
    emitted = patterns(n, grid, seed=seed)
    clean = render(model, emitted, kernel, VIGNETTING)
    signal = clean + np.sqrt(0.01 * np.maximum(clean, 0)) * rng.standard_normal(clean.shape)
    mask = np.ones(signal.shape[1], bool)
    est, _ = estimate_kernel(model, emitted, signal, kernel.shape[-1], mask, VIGNETTING)
    return float(np.sqrt(np.mean((est - kernel) ** 2)))


def test_estimate_kernel_error_falls_like_one_over_root_patterns_with_noise():
    k = 5
    model, grid = model_for(k)
    kernel = np.random.default_rng(0).random((1, k, k))
    few = np.mean([noisy_error(model, grid, kernel, 24, seed) for seed in (1, 2, 3)])
    many = np.mean([noisy_error(model, grid, kernel, 96, seed) for seed in (4, 5, 6)])
    assert 0.3 < many / few < 0.75  # 4x the patterns: half the error (1 / √4)


def box_mask(region, other) -> np.ndarray:
    """Pixels of `region` (h·w,) outside the box `other`: the oracle of two shared regions."""
    y0, x0, h, w = region
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    oy, ox, oh, ow = other
    inside = (ys >= oy) & (ys < oy + oh) & (xs >= ox) & (xs < ox + ow)
    return ~inside.ravel()


def test_exclusive_masks_drop_exactly_the_pixels_two_regions_share():
    grid = PaddedGrid(8, 8, margin_for(3))
    small = (8, 8)

    def tile(x, y):
        linear = 2.0 * rot(5)
        shift = np.array([x, y]) - linear @ np.array([3.5, 3.5])
        return TileMap.from_affine(np.hstack([linear, shift[:, None]]), small)

    models = [TileModel.build(tile(x, y), grid, FRAME) for x, y in ((30, 30), (52, 36), (95, 90))]
    a, b, c = (m.region for m in models)
    assert a[1] + a[3] > b[1]  # the first two overlap, the third is apart
    masks = exclusive_masks(models, FRAME)
    np.testing.assert_array_equal(masks[0], box_mask(a, b))
    np.testing.assert_array_equal(masks[1], box_mask(b, a))
    assert masks[2].all() and 0 < (~masks[0]).sum() < len(masks[0])
