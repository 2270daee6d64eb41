"""Registering a sub-image from its split dot-grid frames, against the map that rendered them:
Gaussian spots at the dots' sensor images, a little noise, nothing else known in advance."""

import math

import numpy as np
import pytest

from calibration.discovery import SubImage
from calibration.geometry import GeometryError, dot_grid
from calibration.localize import guess_affine, register_region, spot_region
from calibration.tilemap import TileMap

HW = (32, 32)
GRID = dot_grid(HW, 8)
SIGMA = 1.3  # spot σ on the sensor (px)


def rot(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, s], [-s, c]])


def tile_at(centre, linear: np.ndarray, k1: float = 0.0) -> TileMap:
    """The map putting the input grid's centre at `centre` (x, y) with linear part `linear`."""
    shift = np.asarray(centre) - linear @ np.array([(HW[1] - 1) / 2, (HW[0] - 1) / 2])
    return TileMap.from_affine(np.hstack([linear, shift[:, None]]), HW, k1)


def split_frames(tile: TileMap, frame_hw, seed: int = 0) -> np.ndarray:
    """The four split(2) frames of the dot grid as this tile records them: (4, H, W)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[: frame_hw[0], : frame_hw[1]]
    frames = []
    for image in GRID.split(2):
        frame = np.zeros(frame_hw)
        dots = np.argwhere(image > 0)[:, ::-1].astype(np.float64)
        for x, y in tile.to_sensor(dots):
            frame += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * SIGMA**2))
        frames.append(frame + 0.001 * rng.standard_normal(frame_hw))
    return np.array(frames)


def rms_at_dots(got: TileMap, truth: TileMap) -> float:
    miss = got.to_sensor(GRID.points) - truth.to_sensor(GRID.points)
    return float(np.sqrt(np.mean(np.sum(miss**2, axis=1))))


FRAME = (128, 128)
CENTRE = (63.5, 63.5)
CASES = {  # linear part, k1 → orientation the parity gap must pick against the guess
    "rotated": (2.48 * rot(17), 0.0, "identity"),
    "inverted": (-2.48 * rot(17), 0.0, "rot180"),
    "mirrored": (2.48 * rot(17) @ np.diag([-1.0, 1.0]), 0.0, "flip_x"),
    "distorted": (2.48 * rot(17), 0.03, "identity"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_register_region_recovers_the_map_and_orientation_of_a_sub_image(case):
    linear, k1, orientation = CASES[case]
    truth = tile_at(CENTRE, linear, k1)
    frames = split_frames(truth, FRAME)
    reg = register_region(GRID, frames, (0, 0, *FRAME), 2.48, 3, np.array([CENTRE]), 0)
    assert reg.orientation == orientation
    assert len(reg.points) == len(GRID.points) == 15
    assert rms_at_dots(reg.map, truth) < 0.02
    assert reg.rms_px < 0.05
    assert reg.map.k1 == pytest.approx(k1, abs=2e-3)


def test_register_region_keeps_to_its_own_sub_image_beside_a_neighbour():
    frame_hw = (128, 240)
    centres = np.array([[63.5, 63.5], [170.5, 63.5]])
    tiles = [tile_at(centres[0], 2.48 * rot(17)), tile_at(centres[1], -2.3 * rot(12))]
    frames = sum(split_frames(t, frame_hw, seed=i) for i, t in enumerate(tiles))
    for own, (tile, scale, orientation) in enumerate(
        zip(tiles, (2.48, 2.3), ("identity", "rot180"), strict=True)
    ):
        reg = register_region(GRID, frames, (0, 0, *frame_hw), scale, 3, centres, own)
        assert reg.orientation == orientation
        assert rms_at_dots(reg.map, tile) < 0.02


def test_guess_affine_reads_scale_and_turn_modulo_90_from_the_spots():
    truth = tile_at(CENTRE, -2.48 * rot(17))  # inverted: the guess sees only the lattice
    per_frame = [
        truth.to_sensor(np.argwhere(image > 0)[:, ::-1].astype(np.float64))
        for image in GRID.split(2)
    ]
    guess, scale = guess_affine(GRID, per_frame, 2 * GRID.spacing)
    assert scale == pytest.approx(2.48, rel=1e-9)
    np.testing.assert_allclose(guess[:, :2], 2.48 * rot(17), atol=1e-9)
    # the grid's mean dot lands on the spots' mean
    mean_spot = np.vstack(per_frame).mean(axis=0)
    np.testing.assert_allclose(guess[:, :2] @ GRID.points.mean(axis=0) + guess[:, 2], mean_spot)


def test_guess_affine_without_spots_says_so():
    with pytest.raises(GeometryError, match="fewer than 2 spots"):
        guess_affine(GRID, [np.zeros((1, 2)), np.zeros((0, 2))], 16)


def test_spot_region_grows_the_box_by_the_reach_at_the_scale_and_clips_to_the_frame():
    sub = SubImage(box=(10, 20, 30, 40), centre=(40.0, 25.0), area_px=1200, half_max_area_px=1000)
    pad = math.ceil(3 * 2.5) + 2  # 10 px
    assert spot_region(sub, 2.5, 3, (100, 100)) == (0, 10, 10 + 30 + pad, 40 + 2 * pad)
    assert spot_region(sub, 2.5, 3, (45, 65)) == (0, 10, 45, 55)
