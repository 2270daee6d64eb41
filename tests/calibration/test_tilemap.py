"""Tile maps (affine + radial distortion) and the area-integrated recording operator, against
closed forms: inverse maps, Jacobians, the integral of a bilinear tent over unit pixels, light
conservation and centroids."""

import math

import numpy as np
import pytest

from calibration.tilemap import (
    PaddedGrid,
    TileMap,
    area_operator,
    fit_tilemap,
    scale_of,
    sensor_region,
)

HW = (16, 16)


def rot(deg: float) -> np.ndarray:
    """sim's R(θ): (x, y) → (cos θ·x + sin θ·y, −sin θ·x + cos θ·y)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, s], [-s, c]])


def affine(linear: np.ndarray, shift=(100.0, 100.0)) -> np.ndarray:
    return np.hstack([np.asarray(linear, np.float64), np.asarray(shift, np.float64)[:, None]])


LINEARS = {
    "rotated": 2.48 * rot(17),
    "inverted": -2.4 * rot(17),
    "sheared": np.array([[1.9, 0.4], [-0.2, 2.3]]),
    "mirrored": np.array([[-1.3, 0.0], [0.0, 1.3]]) @ rot(-8),
}


def grid_points(margin: float = 4.0, n: int = 9) -> np.ndarray:
    """Points over the padded input grid, corners included."""
    xs = np.linspace(-margin - 1, HW[1] + margin, n)
    ys = np.linspace(-margin - 1, HW[0] + margin, n)
    xx, yy = np.meshgrid(xs, ys)
    return np.stack([xx.ravel(), yy.ravel()], 1)


def sensor_image(tile: TileMap, grid: PaddedGrid, maps: np.ndarray, n=None):
    """(region image, its pixel-centre xs, ys) of one padded-grid map, nothing clipped."""
    region = sensor_region(tile, grid, (400, 400))
    y0, x0, h, w = region
    assert y0 > 0 and x0 > 0 and y0 + h < 400 and x0 + w < 400
    img = (area_operator(tile, grid, region, n) @ maps.ravel()).reshape(h, w)
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    return img, xs, ys


@pytest.mark.parametrize("k1", [-0.05, 0.0, 0.05])
@pytest.mark.parametrize("name", list(LINEARS))
def test_to_input_inverts_to_sensor(name, k1):
    tile = TileMap.from_affine(affine(LINEARS[name]), HW, k1)
    pts = grid_points()
    np.testing.assert_allclose(tile.to_input(tile.to_sensor(pts)), pts, atol=1e-9)


def test_from_affine_puts_distortion_about_the_mapped_grid_centre_with_half_diagonal_radius():
    tile = TileMap.from_affine(affine(LINEARS["rotated"]), HW, 0.05)
    np.testing.assert_allclose(tile.centre, tile.undistorted(np.array([[7.5, 7.5]]))[0])
    assert tile.radius == pytest.approx(2.48 * math.hypot(16, 16) / 2, rel=1e-12)
    # k1 is the relative radial displacement at radius r
    corner = tile.centre + np.array([tile.radius, 0.0])
    np.testing.assert_allclose(tile.distort(corner[None])[0] - tile.centre, [1.05 * tile.radius, 0])


def jacobian_det(tile: TileMap, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """|det ∂d/∂x| by central differences."""
    ex, ey = np.array([h, 0.0]), np.array([0.0, h])
    dx = (tile.to_sensor(x + ex) - tile.to_sensor(x - ex)) / (2 * h)
    dy = (tile.to_sensor(x + ey) - tile.to_sensor(x - ey)) / (2 * h)
    return np.abs(dx[:, 0] * dy[:, 1] - dx[:, 1] * dy[:, 0])


@pytest.mark.parametrize("k1", [-0.05, 0.05])
@pytest.mark.parametrize("name", list(LINEARS))
def test_sensor_per_input_is_the_jacobian_determinant_of_to_sensor(name, k1):
    tile = TileMap.from_affine(affine(LINEARS[name]), HW, k1)
    x = grid_points()
    got = tile.sensor_per_input(tile.to_sensor(x))
    np.testing.assert_allclose(got, jacobian_det(tile, x), rtol=1e-5)


def test_radial_is_one_at_the_distortion_radius_and_zero_at_the_centre():
    tile = TileMap.from_affine(affine(LINEARS["sheared"]), HW, 0.05)
    u = tile.centre + tile.radius * np.array([[0.0, 0.0], [0.6, 0.8]])
    np.testing.assert_allclose(tile.radial(tile.distort(u)), [0.0, 1.0], atol=1e-12)


# A lit padded-grid pixel's bilinear interpolant is the tent (1 − |x|)(1 − |y|); over unit
# pixels centred on it and its neighbours it integrates to [1/8, 3/4, 1/8] along each axis.
TENT = np.outer([1 / 8, 3 / 4, 1 / 8], [1 / 8, 3 / 4, 1 / 8])


def unit_map_impulse(n):
    grid = PaddedGrid(*HW, margin=4)
    tile = TileMap.from_affine(affine(np.eye(2), (7.0, 5.0)), HW)
    maps = np.zeros(grid.shape)
    maps[9, 10] = 1.0  # input (x, y) = (6, 5) → sensor (13, 10)
    img = (area_operator(tile, grid, (0, 0, 40, 40), n) @ maps.ravel()).reshape(40, 40)
    return img


@pytest.mark.parametrize("n", [2, 4, 6])
def test_area_operator_integrates_a_lit_pixel_over_unit_pixels_in_closed_form(n):
    img = unit_map_impulse(n)
    expected = np.zeros((40, 40))
    expected[9:12, 12:15] = TENT
    np.testing.assert_allclose(img, expected, atol=1e-12)


def test_area_operator_default_subsampling_integrates_a_lit_pixel_in_closed_form():
    img = unit_map_impulse(None)
    np.testing.assert_allclose(img[9:12, 12:15], TENT, atol=1e-12)


SCALES = [0.4, 1.0, 2.48, -2.4]


def random_maps(grid: PaddedGrid, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(grid.shape)


def smooth_maps(grid: PaddedGrid, centre=(12.3, 11.6), sigma=2.5) -> np.ndarray:
    yy, xx = np.mgrid[: grid.shape[0], : grid.shape[1]]
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("k1", [0.0, 0.05])
@pytest.mark.parametrize("scale", SCALES)
def test_area_operator_conserves_the_light_of_a_white_and_a_smooth_field(scale, k1):
    grid = PaddedGrid(*HW, margin=4)
    tile = TileMap.from_affine(affine(scale * rot(17), (200.0, 200.0)), HW, k1)
    for maps, tol in ((np.ones(grid.shape), 1e-5), (smooth_maps(grid), 1e-5)):
        img, _, _ = sensor_image(tile, grid, maps)
        assert img.sum() == pytest.approx(maps.sum(), rel=tol)


@pytest.mark.parametrize("scale", SCALES)
def test_area_operator_conserves_each_pixels_light_to_the_sub_sampling_accuracy(scale):
    """Column sums: the light of one padded-grid pixel, ~ the midpoint rule's error h²/4."""
    grid = PaddedGrid(*HW, margin=4)
    tile = TileMap.from_affine(affine(scale * rot(17), (200.0, 200.0)), HW, 0.05)
    region = sensor_region(tile, grid, (400, 400))
    columns = np.asarray(area_operator(tile, grid, region).sum(axis=0)).ravel()
    np.testing.assert_allclose(columns, 1.0, atol=5e-3)


@pytest.mark.parametrize("name", list(LINEARS))
def test_sensor_centroid_of_a_spot_is_to_sensor_of_its_centroid_for_an_affine_map(name):
    grid = PaddedGrid(*HW, margin=4)
    tile = TileMap.from_affine(affine(LINEARS[name], (200.0, 200.0)), HW)
    maps = smooth_maps(grid, centre=(12.3, 11.6), sigma=2.0)
    img, xs, ys = sensor_image(tile, grid, maps)
    got = np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()
    yy, xx = np.mgrid[: grid.shape[0], : grid.shape[1]]
    centroid_in = np.array([(xx * maps).sum(), (yy * maps).sum()]) / maps.sum() - grid.margin
    np.testing.assert_allclose(got, tile.to_sensor(centroid_in[None])[0], atol=1e-6)


def test_sensor_region_holds_all_the_light_of_the_padded_grid():
    grid = PaddedGrid(*HW, margin=4)
    tile = TileMap.from_affine(affine(2.48 * rot(17), (200.0, 200.0)), HW, 0.05)
    y0, x0, h, w = sensor_region(tile, grid, (400, 400))
    big = (y0 - 6, x0 - 6, h + 12, w + 12)
    img = (area_operator(tile, grid, big) @ np.ones(grid.shape).ravel()).reshape(h + 12, w + 12)
    outside = img.copy()
    outside[6:-6, 6:-6] = 0.0
    assert img.sum() > 0 and np.all(outside == 0.0)  # nothing lands outside the region


def test_padded_grid_pad_and_crop_are_inverse():
    grid = PaddedGrid(3, 5, margin=2)
    x = np.random.default_rng(1).random((2, 3, 5))
    padded = grid.pad(x)
    assert padded.shape == (2, 7, 9) and padded.sum() == pytest.approx(x.sum())
    np.testing.assert_array_equal(grid.crop(padded), x)


def truth_map(k1: float) -> TileMap:
    return TileMap.from_affine(affine(2.48 * rot(17), (60.0, 50.0)), HW, k1)


def test_fit_tilemap_recovers_affine_and_distortion_from_exact_points():
    truth = truth_map(0.04)
    src = grid_points(margin=0.0, n=5)
    guess = truth.affine + np.array([[0.02, -0.01, 0.5], [0.01, 0.03, -0.4]])
    fit, err = fit_tilemap(src, truth.to_sensor(src), guess, HW)
    np.testing.assert_allclose(fit.affine, truth.affine, atol=1e-8)
    assert fit.k1 == pytest.approx(0.04, abs=1e-8)
    assert err.max() < 1e-8


def test_fit_tilemap_keeps_the_affine_only_with_fewer_than_8_points():
    truth = truth_map(0.0)
    src = grid_points(margin=0.0, n=5)[[0, 3, 7, 11, 15, 19, 24]]  # 7 points
    guess = truth.affine + np.array([[0.02, -0.01, 0.5], [0.01, 0.03, -0.4]])
    fit, err = fit_tilemap(src, truth.to_sensor(src), guess, HW)
    assert fit.k1 == 0.0
    np.testing.assert_allclose(fit.affine, truth.affine, atol=1e-8)
    # distorted points: still no k1 with 7 points, the affine absorbs what it can
    bent = truth_map(0.04)
    fit, err = fit_tilemap(src, bent.to_sensor(src), guess, HW)
    assert fit.k1 == 0.0 and err.max() > 1e-3


def test_scale_of_is_the_root_of_the_area_ratio():
    assert scale_of(affine(-2.4 * rot(33))) == pytest.approx(2.4, rel=1e-12)
    assert scale_of(affine(np.array([[2.0, 0.5], [0.0, 3.0]]))) == pytest.approx(math.sqrt(6))
