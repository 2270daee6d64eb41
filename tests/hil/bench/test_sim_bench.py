"""The simulated bench against the ground truth of its own physics."""

import math

import numpy as np
import pytest
import torch

from drivers.errors import DeviceTimeout
from drivers.protocols import RetryPolicy
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig, parse_bench
from sim.clock import VirtualClock
from sim.fabrication import illumination_map


def make_bench(**sections) -> Bench:
    return Bench(parse_bench({"sim": sections}), clock=VirtualClock())


def centroid(img: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.meshgrid(
        torch.arange(img.shape[0], dtype=torch.float64),
        torch.arange(img.shape[1], dtype=torch.float64),
        indexing="ij",
    )
    img = img.double()
    return (float((xs * img).sum() / img.sum()), float((ys * img).sum() / img.sum()))


def test_a_point_on_the_display_lands_where_geometry_and_psfs_put_it():
    fab = dict(
        gain=1.1, shift_px=[1.3, -0.7], rotation_deg=0.8, background=0.0, illumination_falloff=0.1
    )
    bench = make_bench(fabrication=fab, display={"gamma": 2.0})
    world, dot = bench.world, (17.0, 13.0)
    with bench:
        bench.light.on()
        bench.light.level = 0.5
        img = np.zeros(bench.display.shape, np.float32)
        img[int(dot[1]), int(dot[0])] = 0.6
        bench.display.show(img)
        irr = world.irradiance()
    k = world.frontend.kernel_size
    off = k - 1 - (k - 1) // 2
    v = round(0.6 * 255) / 255  # the display quantises to 8 bits
    emitted = 0.5 * v**2  # light level · v ** gamma
    illum = float(illumination_map(world.display_shape, 0.1)[int(dot[1]), int(dot[0])])
    for p, (y0, x0, h, w) in enumerate(world.layout.boxes):
        psf = world.frontend.psfs[p, 0]
        # the misalignment is part of the geometry: the spot's centroid is where the geometry
        # puts the PSF's centroid next to the dot
        want = world.geometry.to_sensor(p, np.asarray(dot) + np.asarray(centroid(psf)) - off)
        cx, cy = centroid(irr[y0 : y0 + h, x0 : x0 + w])
        assert cx + x0 == pytest.approx(want[0], abs=0.01)
        assert cy + y0 == pytest.approx(want[1], abs=0.01)
        energy = float(irr[y0 : y0 + h, x0 : x0 + w].sum())
        assert energy == pytest.approx(1.1 * emitted * illum * float(psf.sum()), rel=1e-4)


def test_frames_follow_the_noise_model_around_the_rendered_irradiance():
    bench = make_bench()
    with bench:
        bench.light.on()
        bench.display.show(np.full(bench.display.shape, 0.8, np.float32))
        frame = torch.as_tensor(bench.camera.snap(1.0).image, dtype=torch.float64)
        irr = bench.world.irradiance().double()
    sensor = bench.world.sensor
    mean, var = sensor.mean_dn(irr), sensor.var_dn(irr)
    assert float(mean.max()) < sensor.max_dn - 10  # no clipping in this check
    z = (frame - mean) / var.sqrt()
    assert abs(float(z.mean())) < 0.03
    assert float(z.var()) == pytest.approx(1.0, rel=0.05)


def test_light_off_gives_the_dark_level_and_light_goes_off_on_exceptions():
    bench = make_bench()
    sensor = bench.world.sensor
    with pytest.raises(RuntimeError, match="boom"), bench:
        bench.light.on()
        bench.display.show(np.ones(bench.display.shape, np.float32))
        assert bench.world.light_level == 1.0
        raise RuntimeError("boom")
    assert bench.world.light_level == 0.0 and not bench.light.is_on
    assert float(bench.world.levels.abs().max()) == 0.0
    assert not any(d.is_open for d in bench.devices.values())
    with bench:
        frame = bench.camera.snap(1.0).image.astype(np.float64)
    expected = sensor.params.black_level_dn + sensor.params.dark_e / sensor.gain_e_per_dn
    assert frame.mean() == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("exposure_s, fps, period", [(0.001, 30, 1 / 30), (0.05, 30, 0.05)])
def test_frame_rate_is_limited_by_exposure_and_fps(exposure_s, fps, period):
    bench = make_bench(sensor={"fps_limit": fps, "exposure_s": exposure_s})
    with bench:
        stamps = [bench.camera.snap(1.0).timestamp_s for _ in range(6)]
    assert np.allclose(np.diff(stamps), period, rtol=1e-9)
    assert stamps[0] == pytest.approx(exposure_s)


def test_a_frame_that_cannot_arrive_in_time_raises_device_timeout_within_the_timeout():
    bench = make_bench(sensor={"exposure_s": 2.0})
    bench.camera.retry = RetryPolicy(retries=2, retry_backoff_s=0.0)
    with bench:
        t0 = bench.world.clock.now()
        with pytest.raises(DeviceTimeout, match="gave up after 3 attempts"):
            bench.camera.snap(timeout_s=0.5)
        assert bench.world.clock.now() - t0 <= 3 * 0.5 + 1e-9  # each attempt on time


def test_display_validates_what_it_is_asked_to_show():
    bench = make_bench()
    with bench:
        with pytest.raises(ValueError, match=r"\(32, 32\)"):
            bench.display.show(np.zeros((8, 8), np.float32))
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            bench.display.show(np.full((32, 32), 1.5, np.float32))
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            bench.display.show(np.full((32, 32), 300, np.uint16))
        bench.display.show(np.full((32, 32), 255, np.uint8))
        assert float(bench.world.levels.min()) == 1.0


def test_same_seed_same_frames_other_seed_other_optic():
    frames = []
    for seed in (3, 3, 4):
        bench = make_bench(fabrication={"seed": seed})
        with bench:
            bench.light.on()
            bench.display.show(np.full((32, 32), 0.5, np.float32))
            frames.append(bench.camera.snap(1.0).image)
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])


def test_fabricated_kernels_differ_from_the_design_by_the_configured_error():
    bench = make_bench(fabrication={"kernel_error": 0.1, "kernel_blur_px": 0.0})
    d, f = bench.world.designed.psfs, bench.world.frontend.psfs
    rel = float((f - d).norm() / d.norm())
    assert 0.07 < rel < 0.13


def test_default_bench_is_the_simulated_one():
    bench = Bench(BenchConfig())
    assert bench.simulated
    assert bench.camera.shape == bench.world.layout.frame_shape
    assert math.prod(bench.display.shape) == 32 * 32
