"""Which found sub-image is which designed tile: the grid read off jittered, rotated centres, and
the symmetry found by turning or mirroring the designed layout physically (the oracle) and
letting the PSFs decide."""

import math

import numpy as np
import pytest

from calibration.assignment import assign, grid_cells, psf_similarity

K = 7
PITCH = 50.0


def rot(deg: float) -> np.ndarray:
    """sim's R(θ), counter-clockwise as displayed (rows point down)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, s], [-s, c]])


def cells_of(shape: tuple[int, int]) -> np.ndarray:
    return np.array([(r, c) for r in range(shape[0]) for c in range(shape[1])])


def centres_of(cells: np.ndarray, linear: np.ndarray, jitter: float, seed: int) -> np.ndarray:
    """Sensor centres of grid cells (row, col) seen through `linear`, plus jitter."""
    rng = np.random.default_rng(seed)
    xy = cells[:, ::-1] * PITCH
    xy = xy - xy.mean(axis=0)
    return xy @ linear.T + [400.0, 300.0] + rng.normal(0, jitter, xy.shape)


def test_grid_cells_reads_rows_and_cols_of_a_jittered_rotated_grid():
    cells = cells_of((4, 4))
    order = np.random.default_rng(1).permutation(16)
    centres = centres_of(cells, rot(10), jitter=1.5, seed=0)[order]
    found, shape, angle = grid_cells(centres)
    assert shape == (4, 4)
    np.testing.assert_array_equal(found, cells[order])
    assert abs(angle) == pytest.approx(10.0, abs=1.0)


def test_grid_cells_angle_is_counter_clockwise_as_displayed():
    centres = centres_of(cells_of((4, 4)), rot(10), jitter=1.5, seed=0)
    _, _, angle = grid_cells(centres)
    assert angle == pytest.approx(10.0, abs=1.0)


def test_grid_cells_of_a_single_centre():
    cells, shape, angle = grid_cells(np.array([[3.0, 4.0]]))
    np.testing.assert_array_equal(cells, [[0, 0]])
    assert shape == (1, 1) and angle == 0.0


def designed_psfs(n: int, seed: int = 0) -> np.ndarray:
    """Distinct non-negative PSFs (n, 1, K, K)."""
    return np.random.default_rng(seed).random((n, 1, K, K)) ** 3


# the physical turn or mirror of the layout as displayed, and the symmetry assign must name
PHYSICAL = {
    "identity": np.eye(2),
    "rot180": -np.eye(2),
    "rot90": rot(90),
    "rot270": rot(-90),
    "flip_cols": np.diag([-1.0, 1.0]),
    "flip_rows": np.diag([1.0, -1.0]),
    "transpose": np.array([[0.0, 1.0], [1.0, 0.0]]),
    "anti_transpose": np.array([[0.0, -1.0], [-1.0, 0.0]]),
}


def found_layout(design_shape, symmetry: str, tilt: float, seed: int):
    """Found centres of the designed tiles after the layout is turned/mirrored and tilted,
    in a shuffled order: (found cells, found shape, tile of each found region)."""
    design = cells_of(design_shape)
    order = np.random.default_rng(seed).permutation(len(design))
    centres = centres_of(design, 2.0 * rot(tilt) @ PHYSICAL[symmetry], jitter=1.0, seed=seed)
    cells, shape, _ = grid_cells(centres[order])
    return cells, shape, order


def measured_psfs(designed: np.ndarray, tiles: np.ndarray, seed: int) -> np.ndarray:
    """The designed PSFs of `tiles`, scaled by a throughput and with 5% noise."""
    rng = np.random.default_rng(seed)
    psfs = designed[tiles] * rng.uniform(0.5, 1.5, (len(tiles), 1, 1, 1))
    return psfs + 0.05 * psfs.max() * rng.standard_normal(psfs.shape)


@pytest.mark.parametrize("symmetry", ["identity", "rot180", "rot90", "flip_cols"])
def test_assign_finds_the_turn_of_a_square_layout_from_the_psfs(symmetry):
    designed = designed_psfs(16)
    cells, shape, tiles = found_layout((4, 4), symmetry, tilt=7.0, seed=3)
    measured = measured_psfs(designed, tiles, seed=4)
    got = assign(cells, shape, cells_of((4, 4)), (4, 4), measured, designed)
    assert got.symmetry == symmetry
    assert got.tile_of_region == tuple(int(t) for t in tiles)
    assert got.confidence > 0.3 and got.score > 0.9
    assert got.record()["symmetry"] == symmetry


@pytest.mark.parametrize("symmetry", ["rot90", "rot270", "transpose", "anti_transpose"])
def test_assign_matches_a_2x4_design_to_a_found_4x2_grid_by_transposing(symmetry):
    designed = designed_psfs(8, seed=5)
    cells, shape, tiles = found_layout((2, 4), symmetry, tilt=-4.0, seed=6)
    assert shape == (4, 2)
    measured = measured_psfs(designed, tiles, seed=7)
    got = assign(cells, shape, cells_of((2, 4)), (2, 4), measured, designed)
    assert got.symmetry == symmetry
    assert got.tile_of_region == tuple(int(t) for t in tiles)
    assert got.confidence > 0.3


def test_assign_refuses_a_grid_no_symmetry_maps_onto_the_design():
    cells = cells_of((3, 3))
    psfs = designed_psfs(9)
    with pytest.raises(ValueError, match="3×3"):
        assign(cells, (3, 3), cells_of((4, 4)), (4, 4), psfs, designed_psfs(16))


def test_psf_similarity_of_a_psf_with_itself_and_a_scaled_copy_is_one():
    psf = designed_psfs(1)[0]
    assert psf_similarity(psf, psf) == pytest.approx(1.0, abs=1e-12)
    assert psf_similarity(3.0 * psf, psf) == pytest.approx(1.0, abs=1e-12)


def test_psf_similarity_of_different_psfs_is_well_below_one():
    a, b = designed_psfs(2, seed=9)
    assert psf_similarity(a, b) < 0.5


def shifted_pair(dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """A PSF with dark borders and its copy moved by (dy, dx): no light leaves the box."""
    psf = np.zeros((1, 11, 11))
    psf[0, 3:8, 3:8] = np.random.default_rng(2).random((5, 5))
    return np.roll(psf, (dy, dx), axis=(1, 2)), psf


@pytest.mark.parametrize("shift", [(0, 1), (2, -1), (-2, 2)])
def test_psf_similarity_prefers_the_right_shift_of_a_shifted_copy(shift):
    moved, psf = shifted_pair(*shift)
    other = np.zeros_like(psf)
    other[0, 3:8, 3:8] = np.random.default_rng(8).random((5, 5))
    assert psf_similarity(moved, psf) > 0.9 > psf_similarity(other, psf)


@pytest.mark.parametrize("shift", [(0, 1), (2, -1), (-2, 2)])
def test_psf_similarity_is_one_for_a_shifted_copy(shift):
    moved, psf = shifted_pair(*shift)
    assert psf_similarity(moved, psf) == pytest.approx(1.0, abs=1e-9)
