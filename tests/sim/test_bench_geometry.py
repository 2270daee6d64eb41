"""The bench geometry and its renderer against closed forms: the old packed placement at the
defaults, light conservation, where a point lands, vignetting, hot pixels, the sensor's size."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sim.bench_geometry import BenchGeometry, rotation
from sim.fabrication import illumination_map
from sim.layout import TileLayout
from sim.params import OpticsParams, SimParams
from sim.psf_frontend import PSFFrontend
from sim.world import HOT_PIXEL_DARK, SimWorld

LAYOUT = TileLayout.grid(16, (32, 32), 4, True)  # 8 signed kernels: 4×4 tiles
PSFS = PSFFrontend(8, 7, 1, True, trainable=False).psfs
MARGIN = 6


def make_world(sections: dict | None = None, **kw) -> SimWorld:
    params = SimParams.model_validate(sections or {})
    return SimWorld(params, PSFS, True, LAYOUT, **kw)


def centroid(img: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()


def rendered(geometry: BenchGeometry, maps: np.ndarray) -> np.ndarray:
    """Frame (H, W) of feature maps (P, Hp, Wp) on the grid padded by MARGIN."""
    frame = geometry.render_matrix(MARGIN).astype(np.float64) @ maps.ravel()
    return frame.reshape(geometry.frame_shape)


def old_signal(world: SimWorld) -> np.ndarray:
    """The pre-geometry world's frame before gain and stray light, on a canvas one pixel wider
    all round: "full" PSF convolution of the warped display, each tile at its layout box."""
    m, k = world._warp_margin, world.frontend.kernel_size
    off = k - 1 - (k - 1) // 2
    emitted = world.fabrication.apply_to_display(world.levels) * world.light_level
    padded = F.pad(emitted[None], (m, m, m, m))
    with torch.no_grad():
        full = world.frontend.intensities(world.fabrication.warp(padded), mode="full")[0]
    edge = k + m + 1
    fh, fw = world.layout.frame_shape
    canvas = torch.zeros(fh + 2 * edge, fw + 2 * edge)
    for tile, (y, x, _, _) in zip(full, world.layout.boxes, strict=True):
        y0, x0 = y - off - m + edge, x - off - m + edge
        canvas[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] += tile
    return canvas[edge - 1 : edge + fh + 1, edge - 1 : edge + fw + 1].double().numpy()


def test_pixel_area_integral_of_the_bilinear_interpolant_is_one_eighth_three_quarters():
    """∫ over [−½, ½] of the hat function is 3/4, over [½, 3/2] it is 1/8: at magnification 1
    a lone input pixel covers its own sensor pixel by 9/16 and the edge neighbours by 3/32."""
    geo = BenchGeometry(OpticsParams(), TileLayout.grid(1, (8, 8), 4, False))
    maps = np.zeros((1, 8 + 2 * MARGIN, 8 + 2 * MARGIN))
    maps[0, MARGIN + 3, MARGIN + 5] = 1.0  # input pixel (row 3, col 5)
    frame = rendered(geo, maps)
    b = np.array([1 / 8, 3 / 4, 1 / 8])
    y, x = 4 + 3, 4 + 5  # the layout box starts at the gap
    np.testing.assert_allclose(frame[y - 1 : y + 2, x - 1 : x + 2], np.outer(b, b), atol=1e-7)
    assert frame.sum() == pytest.approx(1.0, abs=1e-6)


def test_at_defaults_the_frame_is_the_old_packed_placement_area_integrated():
    # a whole-pixel misalignment: the old world's bilinear image warp was exact only there, and
    # the new world moves the image by the geometry instead
    fab = {"illumination_falloff": 0.1, "shift_px": [1.0, -2.0], "rotation_deg": 0.0}
    world = make_world({"fabrication": fab})
    world.set_source("light", True, 0.7)
    world.show(np.random.default_rng(0).random((32, 32)).astype(np.float32))
    old = old_signal(world)
    b = torch.tensor([1 / 8, 3 / 4, 1 / 8], dtype=torch.float64)
    blurred = F.conv2d(torch.from_numpy(old)[None, None], (b[:, None] * b[None, :])[None, None])
    fab = world.fabrication
    expected = blurred[0, 0].numpy() * fab.gain + fab.background * 0.7
    assert world.frame_shape == world.layout.frame_shape
    np.testing.assert_allclose(world.irradiance().double().numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("magnification", [0.31 * 8, 2.4, -2.4, 0.5])
def test_a_white_field_keeps_its_light_through_any_magnification(magnification):
    lay = TileLayout.grid(4, (32, 32), 4, True)
    hp = 32 + 2 * MARGIN
    pitch = 1.2 * hp * abs(magnification) + 8  # every padded tile on the sensor, none overlapping
    optics = OpticsParams(
        magnification=magnification, tile_pitch_px=(pitch, pitch), grid_rotation_deg=7.0
    )
    geo = BenchGeometry(optics, lay)
    white = np.ones((4, hp, hp))
    matrix = geo.render_matrix(MARGIN).astype(np.float64)
    for p in range(4):
        alone = np.zeros_like(white)
        alone[p] = white[p]
        total = (matrix @ alone.ravel()).sum()
        assert total == pytest.approx(white[p].sum(), rel=1e-3)
    # deep inside a tile a sensor pixel holds F / (magnification·s)²
    c = np.rint(geo.centre_px(0)).astype(int)
    frame = (matrix @ white.ravel()).reshape(geo.frame_shape)
    assert frame[c[1], c[0]] == pytest.approx(1 / magnification**2, rel=1e-6)


CASES = {
    "rotated 90°": dict(grid_rotation_deg=90.0),
    "rotated 17°": dict(grid_rotation_deg=17.0),
    "inverted": dict(magnification=-2.4),
    "jittered": dict(magnification=1.7, tile_jitter_px=6.0),
    "distorted": dict(magnification=2.4, distortion_k1=0.02, grid_rotation_deg=-5.0),
    "barrel, rotated, inverted": dict(
        magnification=-1.3, distortion_k1=-0.02, grid_rotation_deg=17
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_bright_input_pixel_lands_where_to_sensor_says(case):
    optics = OpticsParams(**{"magnification": 2.48, **case})
    lay = TileLayout.grid(4, (32, 32), 8, True)
    geo = BenchGeometry(optics, lay, sensor_hw=(400, 400), seed=5)  # rotated tiles fit
    hp = 32 + 2 * MARGIN
    matrix = geo.render_matrix(MARGIN).astype(np.float64)
    for p, (i, j) in enumerate([(3, 28), (16, 16), (30, 1), (0, 0)]):
        maps = np.zeros((4, hp, hp))
        maps[p, MARGIN + i, MARGIN + j] = 1.0
        frame = (matrix @ maps.ravel()).reshape(geo.frame_shape)
        got = centroid(frame)
        want = geo.to_sensor(p, [j, i])
        assert np.hypot(*(got - want)) <= 0.05, (p, got, want)
        np.testing.assert_allclose(geo.from_sensor(p, want), [j, i], atol=1e-9)


def test_the_map_follows_the_spec_closed_form():
    optics = OpticsParams(
        magnification=-0.4,
        tile_pitch_px=(120.0, 90.0),
        grid_center_px=(300.0, 200.0),
        grid_rotation_deg=30.0,
        distortion_k1=0.05,
    )
    geo = BenchGeometry(optics, LAYOUT, display_scale=8)
    a, r = -3.2, 3.2 * math.hypot(32, 32) / 2
    rot = rotation(30.0)
    np.testing.assert_allclose(rot @ [1.0, 0.0], [math.cos(math.pi / 6), -0.5])  # up-right
    p = 6  # row 1, column 2 of 4×4
    centre = np.array([300.0, 200.0]) + rot @ [120.0 * (2 - 1.5), 90.0 * (1 - 1.5)]
    np.testing.assert_allclose(geo.centre_px(p), centre)
    x = np.array([3.0, 25.0])
    u = centre + a * rot @ (x - 15.5)
    d = centre + (u - centre) * (1 + 0.05 * np.sum((u - centre) ** 2) / r**2)
    np.testing.assert_allclose(geo.to_sensor(p, x), d)


def test_vignetting_at_a_tile_corner():
    optics = OpticsParams(magnification=3.0, tile_vignetting=0.4)
    geo = BenchGeometry(optics, TileLayout.grid(1, (32, 32), 4, False))
    corner = geo.undistorted(0, [-0.5, -0.5])  # the grid's outer corner: |u − c| = r
    assert geo.vignetting(0, corner) == pytest.approx(0.6)
    hp = 32 + 2 * MARGIN
    frame = rendered(geo, np.ones((1, hp, hp)))
    X, Y = np.rint(corner).astype(int)  # the sensor pixel nearest that corner
    q = (np.sum((np.array([X, Y]) - geo.centre_px(0)) ** 2) + 1 / 6) / geo.radius_px**2
    # a pixel averages the quadratic falloff: its centre's value less v·(1/12 + 1/12)/r²
    assert frame[Y, X] == pytest.approx((1 - 0.4 * q) / 9, rel=1e-5)


def test_hot_pixels_are_a_seeded_fraction_with_a_fifth_of_the_full_well():
    sections = {"optics": {"hot_pixels": 0.004}, "fabrication": {"seed": 3}}
    world, again = make_world(sections), make_world(sections)
    other = make_world({"optics": {"hot_pixels": 0.004}, "fabrication": {"seed": 4}})
    fh, fw = world.frame_shape
    hot = world.sensor.dark_map_e.numpy() > 0
    assert hot.sum() == round(0.004 * fh * fw)
    assert np.array_equal(hot, again.sensor.dark_map_e.numpy() > 0)
    assert not np.array_equal(hot, other.sensor.dark_map_e.numpy() > 0)
    sensor = world.sensor
    extra = HOT_PIXEL_DARK * sensor.params.full_well_e
    assert world.sensor.dark_map_e.numpy()[hot] == pytest.approx(extra)
    frames = np.stack([world.capture(0.01) for _ in range(40)]).astype(np.float64)  # light off
    mean = sensor.mean_dn(torch.zeros(fh, fw, dtype=torch.float64)).numpy()
    var = sensor.var_dn(torch.zeros(fh, fw, dtype=torch.float64)).numpy()
    samples = frames[:, hot]  # 40 frames × 94 hot pixels: σ ≈ 18 DN, σ of the mean ≈ 0.3 DN
    assert samples.mean() == pytest.approx(mean[hot][0], abs=1.5)
    assert samples.var() == pytest.approx(var[hot][0], rel=0.1)
    assert mean[hot][0] == pytest.approx(mean[~hot][0] + extra / sensor.gain_e_per_dn)
    assert abs(frames[:, ~hot].mean() - mean[~hot][0]) < 0.01


def test_same_noise_seed_same_frames():
    world = make_world({"optics": {"hot_pixels": 0.001}})
    world.set_source("light", True, 1.0)
    world.show(np.full((32, 32), 0.6, np.float32))
    world.seed_noise(11)
    first = world.capture(0.01)
    world.seed_noise(11)
    assert np.array_equal(first, world.capture(0.01))
    assert not np.array_equal(first, world.capture(0.01))


def test_the_default_sensor_just_fits_the_packed_grid():
    assert make_world().frame_shape == LAYOUT.frame_shape == (4 + 4 * 36, 4 + 4 * 36)
    geo = BenchGeometry(OpticsParams(magnification=0.31), LAYOUT, display_scale=8)
    side = 4 + 4 * (32 * 2.48 + 4)
    assert geo.frame_shape == (math.ceil(side), math.ceil(side))
    assert geo.pitch_px == pytest.approx((32 * 2.48 + 4,) * 2)
    np.testing.assert_allclose(geo.grid_center_px, [(math.ceil(side) - 1) / 2] * 2)
    sized = make_world({"sensor": {"width": 1440, "height": 1080}})
    assert sized.frame_shape == (1080, 1440) and sized.capture(0.01).shape == (1080, 1440)


def test_a_display_block_lands_through_scale_origin_and_geometry():
    """End to end on a large display: an 8×8 block of display pixels is one input pixel; its
    sub-images' centroids sit at to_sensor of the warped point moved by each PSF's centroid."""
    sections = {
        "display": {"width": 640, "height": 400},
        "fabrication": {"background": 0.0, "kernel_blur_px": 0.0, "illumination_falloff": 0.2},
        "optics": {"magnification": 0.31, "grid_rotation_deg": 17.0, "tile_jitter_px": 3.0},
        "sensor": {"width": 480, "height": 480},  # the rotated grid fits
    }
    world = make_world(sections, display_scale=8, display_origin=(100, 50))
    world.set_source("light", True, 1.0)
    levels = np.zeros((400, 640), np.float32)
    i, j = 9, 20
    levels[50 + 8 * i : 58 + 8 * i, 100 + 8 * j : 108 + 8 * j] = 1.0
    world.show(levels)
    np.testing.assert_allclose(
        world.display_to_input([100 + 8 * j + 3.5, 50 + 8 * i + 3.5]), [j, i]
    )
    frame = world.irradiance().double().numpy()
    k = world.frontend.kernel_size
    off = k - 1 - (k - 1) // 2
    illum = illumination_map((400, 640), 0.2)[50 + 8 * i : 58 + 8 * i, 100 + 8 * j : 108 + 8 * j]
    for p in range(world.geometry.n_tiles):
        psf = world.frontend.psfs[p, 0].double().numpy()
        want = world.geometry.to_sensor(p, np.array([j, i], float) + centroid(psf) - off)
        lo = np.floor(want - 30).astype(int)
        crop = frame[lo[1] : lo[1] + 60, lo[0] : lo[0] + 60]
        assert np.hypot(*(centroid(crop) + lo - want)) <= 0.05
        light = world.fabrication.gain * float(illum.mean()) * psf.sum()
        assert crop.sum() == pytest.approx(light, rel=1e-3)
