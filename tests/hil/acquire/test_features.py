"""Capture's resampling: each sub-image read back onto the input grid, whatever the glass did.

The oracle is the design-space simulation of the fabricated optic: the input-grid light
convolved with each fabricated PSF (in the calibration's centroid convention), which is what the
backend would see if the sub-images were the design's tiles.
"""

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import shift as subpixel_shift

from calibration.forward import convolve
from calibration.pipeline import Plan, calibrate
from calibration.psf import psf_centroid
from hil.acquire.features import FeatureExtractor, pre_compensate
from hil.bench.assembly import Bench
from hil.bench.config import load_bench
from sim.clock import VirtualClock
from sim.fabrication import illumination_map

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def design_space_maps(world, design, image: np.ndarray, light: float) -> np.ndarray:
    """(P, h, w) in DN/s: the light on the input grid ⊛ each fabricated PSF, moved to its
    design's centroid as calibration measures it."""
    (h, w), s = design.hw, design.display_scale
    x0, y0 = design.origin_on(world.display_shape[:2])
    falloff = illumination_map(
        world.display_shape[:2], world.params.fabrication.illumination_falloff
    )
    block = falloff.numpy()[y0 : y0 + s * h, x0 : x0 + s * w]
    illumination = block.reshape(h, s, w, s).mean(axis=(1, 3))
    sensor, fab = world.sensor, world.fabrication
    per_unit = fab.gain * sensor.params.flux_e_per_s / sensor.gain_e_per_dn
    emitted = (image * illumination * light)[None, None].astype(np.float64)
    fabricated = world.frontend.psfs.numpy().astype(np.float64)
    maps = []
    for p, psf in enumerate(fabricated):
        delta = psf_centroid(psf) - psf_centroid(design.psfs[p])
        moved = subpixel_shift(psf, (0, -delta[1], -delta[0]), order=3, mode="grid-constant")
        maps.append(convolve(emitted, moved)[0] * per_unit)
    return np.asarray(maps)


@pytest.mark.parametrize("bench_file", ["bench-inverted.toml", "bench-rotated.toml"])
def test_resampled_maps_equal_the_design_space_simulation_within_noise(bench_file):
    bench = Bench(load_bench(EXAMPLES / bench_file), clock=VirtualClock())
    rng = np.random.default_rng(3)
    with bench:
        design = bench.design
        cal = calibrate(bench, design, Plan(patterns=16))
        extract = FeatureExtractor(cal, design.psfs.sum(axis=(1, 2, 3)))
        image = np.kron(rng.random((8, 8)), np.ones((4, 4))).astype(np.float32)  # 32 × 32
        bench.light.on()
        bench.camera.exposure_s = cal.exposure_s
        bench.display.show(design.on_display(pre_compensate(image, cal), bench.display.shape))
        maps = np.asarray([extract.maps(bench.camera.snap(1.0).image) for _ in range(6)])
        light = bench.world.light_level
    truth = design_space_maps(bench.world, design, image, light)
    mean, noise_var = maps.mean(axis=0), maps.var(axis=0, ddof=1).mean() / len(maps)
    residual = np.mean((mean - truth) ** 2)
    # within the noise of the mean of six frames, plus 3% of the signal for the PSFs' own error
    assert residual <= noise_var + (0.03**2) * np.mean(truth**2)
    assert np.abs(mean.mean(axis=(1, 2)) / truth.mean(axis=(1, 2)) - 1).max() <= 0.03
