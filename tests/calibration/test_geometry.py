"""Tile geometry from dot grids, against the ground truth of the simulated optics.

A dot's spot has its intensity centroid at warp_points(dot) + tile offset + (PSF centroid − off),
where off is where the "same" window starts inside the full convolution (see `sim.world`): the
oracle every accuracy test below compares with.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibration.geometry import (
    ORIENTATIONS,
    DotGrid,
    GeometryError,
    affine_params,
    apply_affine,
    dot_grid,
    fit_affine,
    invert_affine,
    tile_box,
)
from calibration.registration import register_tile
from calibration.spots import find_spots
from hil.bench.assembly import Bench
from hil.bench.config import parse_bench
from sim.clock import VirtualClock
from sim.fabrication import blur_psfs, warp_image, warp_points

K = 7
OFF = K - 1 - (K - 1) // 2


def centroid(img: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()


def random_psf(seed: int) -> torch.Tensor:
    """A non-negative 7×7 PSF with an off-centre centroid, like a fabricated one."""
    raw = torch.rand(1, K, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return blur_psfs(raw, 0.7)[0]


def render(display: np.ndarray, psf, shift, rotation, frame_hw, at) -> np.ndarray:
    """What one tile records, placed on a frame as `SimWorld.irradiance` places it."""
    img = torch.as_tensor(display, dtype=torch.float64)
    warped = warp_image(img, shift, rotation)
    full = F.conv2d(warped[None, None], psf.flip(-1, -2)[None, None], padding=K - 1)[0, 0]
    frame = np.zeros(frame_hw)
    y0, x0 = at[0] - OFF, at[1] - OFF
    frame[y0 : y0 + full.shape[0], x0 : x0 + full.shape[1]] = full.numpy()
    return frame


def truth(grid: DotGrid, display_hw, psf, shift, rotation, at) -> np.ndarray:
    landed = warp_points(torch.as_tensor(grid.points), display_hw, shift, rotation).numpy()
    return landed + [at[1], at[0]] + centroid(psf.numpy()) - OFF


def design(at) -> np.ndarray:
    """The display grid landing 1:1 on the tile at (y0, x0): the guess before calibration."""
    return np.array([[1.0, 0.0, at[1]], [0.0, 1.0, at[0]]])


INVERSE = {"rot90": "rot270", "rot270": "rot90"}  # the other turns and mirrors undo themselves


def turned(affine: np.ndarray, grid: DotGrid, name: str) -> np.ndarray:
    """affine ∘ (x ↦ c + D (x − c)): the map `register_tile` tries as orientation `name`."""
    d, c = ORIENTATIONS[name], grid.centre
    return np.hstack([affine[:, :2] @ d, (affine[:, :2] @ (c - d @ c) + affine[:, 2])[:, None]])


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


# --- the dot grid ------------------------------------------------------------------------------


def test_default_grid_on_the_default_display_is_4x4_minus_the_gap_and_centred():
    grid = dot_grid((32, 32), 8)
    assert len(grid.points) == 15 and grid.spacing == 8
    assert sorted(set(grid.points[:, 0])) == [3, 11, 19, 27]
    assert grid.gap_point == (11.0, 3.0)
    assert not ((grid.lattice[:, 0] == 0) & (grid.lattice[:, 1] == 1)).any()
    assert grid.image.dtype == np.float32 and grid.image.sum() == 15
    xy = grid.points.astype(int)
    assert (grid.image[xy[:, 1], xy[:, 0]] == 1).all()
    np.testing.assert_array_equal(grid.centre, [15, 15])
    # the lattice sits in the middle: 3 dark px before it, 4 after (the odd one out of 7)
    assert grid.points.min() == 3 and 31 - grid.points.max() == 4


def test_split_frames_show_every_dot_once_two_spacings_apart():
    grid = dot_grid((32, 32), 8)
    frames = grid.split(2)
    assert len(frames) == 4
    np.testing.assert_array_equal(np.sum(frames, axis=0), grid.image)
    for f in frames:
        ys, xs = np.nonzero(f)
        d = np.hypot(xs[:, None] - xs[None], ys[:, None] - ys[None]) + np.eye(len(xs)) * 99
        assert d.min() >= 16


def test_grid_arguments_are_checked():
    with pytest.raises(ValueError, match="outside"):
        dot_grid((32, 32), 8, gap=(4, 0))
    with pytest.raises(ValueError, match="fewer than 2 dots"):
        dot_grid((12, 32), 8, margin=4)
    assert dot_grid((32, 32), 8, gap=None).gap_point is None


# --- affine helpers ----------------------------------------------------------------------------


def test_affine_fit_apply_invert_and_parameters():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 32, (20, 2))
    warp = warp_points(torch.as_tensor(src), (32, 32), (1.5, -2.0), 0.8).numpy() + [40, 4]
    a = fit_affine(src, warp)
    np.testing.assert_allclose(apply_affine(a, src), warp, atol=1e-9)
    np.testing.assert_allclose(apply_affine(invert_affine(a), warp), src, atol=1e-9)
    p = affine_params(a)
    assert p["rotation_deg"] == pytest.approx(0.8, abs=1e-9)
    assert p["scale_x"] == pytest.approx(1) and p["scale_y"] == pytest.approx(1)
    assert p["shear"] == pytest.approx(0, abs=1e-12)
    mirrored = affine_params(np.array([[-1.0, 0, 5], [0, 1, 0]]))
    assert mirrored["scale_x"] * mirrored["scale_y"] < 0
    weights = np.ones(20)
    weights[0] = 0  # a point with no weight does not pull the fit
    bad = warp.copy()
    bad[0] += 5
    np.testing.assert_allclose(fit_affine(src, bad, weights), a, atol=1e-9)
    with pytest.raises(GeometryError, match="one line"):
        fit_affine(np.array([[0, 0], [1, 1], [2, 2.0]]), np.zeros((3, 2)))


def test_tile_box_covers_the_mapped_display_and_is_clipped():
    assert tile_box(design((4, 40)), (32, 32), (148, 148)) == (4, 40, 32, 32)
    assert tile_box(design((4, 40)), (32, 32), (148, 148), pad=2) == (2, 38, 36, 36)
    assert tile_box(design((4, 4)), (32, 32), (148, 148), pad=10) == (0, 0, 46, 46)
    shifted = design((4, 40)) + [[0, 0, 0.3], [0, 0, -0.2]]
    assert tile_box(shifted, (32, 32), (148, 148)) == (3, 40, 33, 33)
    with pytest.raises(GeometryError, match="outside"):
        tile_box(design((400, 0)), (32, 32), (148, 148))


# --- spots rendered as the world renders them ----------------------------------------------------

# 64 × 64 display, spacing 16: the 8 px spots of a 7 × 7 PSF have dark pixels between them
SYNTH = dict(display_hw=(64, 64), frame_hw=(90, 96), at=(12, 20))


@pytest.mark.parametrize(
    "shift, rotation, seed, built",
    [
        ((0.0, 0.0), 0.0, 0, "identity"),
        ((3.0, -2.2), 1.0, 1, "rot90"),
        ((-2.7, 3.0), -0.6, 2, "flip_x"),
        ((0.45, 1.3), 0.3, 3, "identity"),
    ],
)
def test_noise_free_spots_give_the_ground_truth_map_within_0_02_px(shift, rotation, seed, built):
    """`built`: the bench is that turn or mirror of what the guess says."""
    grid = dot_grid(SYNTH["display_hw"], 16)
    psf = random_psf(seed)
    frame = render(grid.image, psf, shift, rotation, SYNTH["frame_hw"], SYNTH["at"])
    want = truth(grid, SYNTH["display_hw"], psf, shift, rotation, SYNTH["at"])

    spots = find_spots(frame, 16)
    assert len(spots) == len(grid.points)
    nearest = np.min(np.hypot(*(spots[:, None] - want[None]).transpose(2, 0, 1)), axis=1)
    assert nearest.max() < 0.02  # every centroid, not only the fit

    guess = turned(design(SYNTH["at"]), grid, INVERSE.get(built, built))
    reg = register_tile(grid, spots, guess)
    assert reg.orientation == built and reg.matched == len(grid.points)
    assert np.abs(apply_affine(reg.affine, grid.points) - want).max() < 0.02
    assert reg.rms_px < 0.02 and np.isfinite(reg.residuals_px).all()
    if built == "identity":
        assert affine_params(reg.affine)["rotation_deg"] == pytest.approx(rotation, abs=0.01)


def test_noisy_spots_give_the_ground_truth_map_within_0_1_px_rms():
    """Peak ~3000 e-, shot noise, 3 e- read noise and a 20 e- stray-light pedestal."""
    grid = dot_grid(SYNTH["display_hw"], 16)
    psf = random_psf(5)
    shift, rotation = (2.3, -1.1), 0.7
    frame = render(grid.image, psf, shift, rotation, SYNTH["frame_hw"], SYNTH["at"])
    want = truth(grid, SYNTH["display_hw"], psf, shift, rotation, SYNTH["at"])
    rng = np.random.default_rng(7)
    electrons = frame * (3000 / frame.max()) + 20
    # dark-subtracted: the stray-light pedestal stays, so find_spots has to remove it
    noisy = rng.poisson(electrons) + rng.normal(0, 3, frame.shape)

    reg = register_tile(grid, find_spots(noisy, 16), design(SYNTH["at"]))
    assert reg.matched == len(grid.points)
    assert rms(apply_affine(reg.affine, grid.points), want) < 0.1


# --- registration on spot lists ----------------------------------------------------------------


def bench_like_truth(grid: DotGrid) -> np.ndarray:
    """A tile 1° turned and 2.6 px off, with a PSF centroid off by (0.7, −1.1)."""
    pts = grid.points
    landed = warp_points(torch.as_tensor(pts), (32, 32), (2.6, -1.4), 1.0).numpy()
    return fit_affine(pts, landed + [40.7, 4 - 1.1])


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_a_turned_or_mirrored_guess_is_corrected_by_the_parity_gap(name):
    grid = dot_grid((32, 32), 8)
    true_map = bench_like_truth(grid)
    spots = apply_affine(true_map, grid.points)
    # the bench is built as `name` of the guess: guess = truth ∘ (turn by `name`)⁻¹
    guess = turned(true_map, grid, INVERSE.get(name, name))
    reg = register_tile(grid, spots, guess)
    assert reg.orientation == name
    np.testing.assert_allclose(reg.affine, true_map, atol=1e-9)


def test_a_rough_guess_with_lost_and_stray_spots_still_registers():
    grid = dot_grid((32, 32), 8)
    true_map = bench_like_truth(grid)
    rng = np.random.default_rng(1)
    spots = apply_affine(true_map, grid.points) + rng.normal(0, 0.03, (15, 2))
    lost = [0, 14]  # a corner and the far corner, as if cut off at the border
    stray = np.array([[45.0, 7.0], [70.0, 30.0]])  # a noise blob between dots, one far off
    spots = np.vstack([np.delete(spots, lost, axis=0), stray])
    c, t = grid.centre, math.radians(3.5)
    rough = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    # the truth turned 3.5° more about the grid centre, and 0.55 spacing off
    guess = np.hstack([true_map[:, :2] @ rough, apply_affine(true_map, [c - rough @ c]).T])
    guess[:, 2] += [3.0, -3.2]
    reg = register_tile(grid, spots, guess)
    assert reg.orientation == "identity" and reg.matched == 13
    assert np.isnan(reg.residuals_px[lost]).all()
    assert np.nanmax(reg.residuals_px) < 0.15
    assert rms(apply_affine(reg.affine, grid.points), apply_affine(true_map, grid.points)) < 0.05


def test_a_lit_gap_is_reported_as_ambiguous_not_guessed():
    grid = dot_grid((32, 32), 8)
    full = dot_grid((32, 32), 8, gap=None)
    true_map = bench_like_truth(grid)
    spots = apply_affine(true_map, full.points)  # the display shows the gap's dot too
    with pytest.raises(GeometryError, match="ambiguous orientation.*parity gap"):
        register_tile(grid, spots, design((4, 40)))
    # a grid without a gap fits every turn equally well: ambiguous unless told what to trust
    with pytest.raises(GeometryError, match="ambiguous orientation"):
        register_tile(full, spots, design((4, 40)))
    reg = register_tile(full, spots, design((4, 40)), orientations=("identity",))
    np.testing.assert_allclose(reg.affine, true_map, atol=1e-9)


def test_failures_say_what_went_wrong():
    grid = dot_grid((32, 32), 8)
    spots = apply_affine(bench_like_truth(grid), grid.points)
    with pytest.raises(GeometryError, match="found 4 spots, need at least 6"):
        register_tile(grid, spots[:4], design((4, 40)))
    with pytest.raises(GeometryError, match=r"only \d+ of 15 dots matched"):
        register_tile(grid, spots + [0, 40], design((4, 40)))  # looking at the wrong tile
    wobbly = spots + np.where(np.arange(15)[:, None] % 2, 0.7, -0.7) * [1, 0]
    with pytest.raises(GeometryError, match="residuals too large: RMS 0.[5-9]"):
        register_tile(grid, wobbly, design((4, 40)))


# --- the simulated bench, end to end -----------------------------------------------------------


@pytest.mark.parametrize(
    "gain, shift, rotation, seed",
    [(0.8, (3.0, 2.5), 1.0, 0), (1.2, (-2.5, 3.0), -1.0, 1), (1.0, (1.4, -0.8), 0.6, 2)],
)
def test_every_tile_of_the_simulated_bench_registers_within_0_1_px(gain, shift, rotation, seed):
    fab = dict(gain=gain, shift_px=list(shift), rotation_deg=rotation, seed=seed)
    bench = Bench(parse_bench({"sim": {"fabrication": fab}}), clock=VirtualClock())
    world = bench.world
    display_hw, frame_hw = (32, 32), world.layout.frame_shape
    grid = dot_grid(display_hw, 8)  # 4 × 4 less the gap; 7 × 7 PSFs: spots touch, so split
    frames = 8
    with bench:
        cam = bench.camera
        cam.exposure_s = 0.05  # dots are dim: ~1/20 of a white field at the peak
        bench.light.off()
        dark = np.mean([cam.snap(5.0).image for _ in range(frames)], axis=0)
        bench.light.on()
        signals = []
        for image in grid.split(2):
            bench.display.show(image)
            signals.append(np.mean([cam.snap(5.0).image for _ in range(frames)], axis=0) - dark)
    assert max(s.max() for s in signals) < 0.5 * world.sensor.max_dn  # not saturated

    landed = world.fabrication.warp_points(torch.as_tensor(grid.points)).numpy()
    errors = []
    for p, box in enumerate(world.layout.boxes):
        guess = design(box)
        region = tile_box(guess, display_hw, frame_hw, pad=10)
        y0, x0, h, w = region
        spots = np.vstack([find_spots(s[y0 : y0 + h, x0 : x0 + w], 16) + [x0, y0] for s in signals])
        reg = register_tile(grid, spots, guess, region=region)
        psf = world.frontend.psfs[p].sum(dim=0).double().numpy()
        want = landed + [box[1], box[0]] + centroid(psf) - OFF
        errors.append(rms(apply_affine(reg.affine, grid.points), want))
        assert reg.orientation == "identity" and reg.matched >= 13
        assert affine_params(reg.affine)["rotation_deg"] == pytest.approx(rotation, abs=0.25)
    assert max(errors) < 0.1, np.round(errors, 3)


def test_a_single_frame_of_touching_spots_is_refused_rather_than_measured_biased():
    """Spacing 8 with 7 × 7 PSFs: each spot is 8 px wide, so the whole grid in one frame tiles
    the tile with light; its centroids come out ~1 px off while the affine fit still looks good."""
    bench = Bench(parse_bench({}), clock=VirtualClock())
    grid = dot_grid((32, 32), 8)
    with bench:
        cam = bench.camera
        cam.exposure_s = 0.05
        bench.light.off()
        dark = np.mean([cam.snap(5.0).image for _ in range(4)], axis=0)
        bench.light.on()
        bench.display.show(grid.image)
        signal = np.mean([cam.snap(5.0).image for _ in range(4)], axis=0) - dark
    box = bench.world.layout.boxes[5]
    y0, x0, h, w = tile_box(design(box), (32, 32), signal.shape, pad=10)
    with pytest.raises(GeometryError, match=r"spots touch.*DotGrid.split\(2\)"):
        find_spots(signal[y0 : y0 + h, x0 : x0 + w], 8)
