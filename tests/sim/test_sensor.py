"""Sensor model: sampled frames against the closed-form photon-transfer model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, poisson

from sim.params import SensorParams
from sim.sensor import Sensor

PARAMS = SensorParams()
E_PER_UNIT = PARAMS.flux_e_per_s * PARAMS.exposure_s  # signal electrons for irradiance 1


@pytest.fixture
def sensor() -> Sensor:
    return Sensor(PARAMS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gain_maps_full_well_to_top_code(sensor: Sensor) -> None:
    assert sensor.max_dn == 4095
    assert sensor.gain_e_per_dn == pytest.approx(PARAMS.full_well_e / (4095 - 32))
    full = torch.tensor((PARAMS.full_well_e - PARAMS.dark_e) / E_PER_UNIT, dtype=torch.float64)
    assert sensor.mean_dn(full).item() == pytest.approx(sensor.max_dn)


@pytest.mark.parametrize("signal_e", [0.0, 50.0, 3000.0, 9000.0])
def test_frame_statistics_match_noise_model(sensor: Sensor, signal_e: float) -> None:
    irradiance = torch.full((250, 400), signal_e / E_PER_UNIT, dtype=torch.float64)
    frame = sensor.capture(irradiance, _gen(1))
    mean, var = sensor.mean_dn(irradiance[0, 0]), sensor.var_dn(irradiance[0, 0])
    black = PARAMS.black_level_dn
    # Relative to the offset, else the black level alone would make the mean check vacuous.
    assert (frame.mean() - black).item() == pytest.approx((mean - black).item(), rel=0.02)
    assert frame.var().item() == pytest.approx(var.item(), rel=0.02)


def test_saturation_clips_at_top_code() -> None:
    sensor = Sensor(SensorParams(read_noise_e=0.0))
    irradiance = torch.full((2, 64, 64), 0.2)
    irradiance[:, :, :16] = 10.0  # 5x the full well
    frame = sensor.capture(irradiance, _gen(2))
    assert torch.all(frame[:, :, :16] == sensor.max_dn)
    assert torch.all(frame[:, :, 16:] < sensor.max_dn)
    torch.testing.assert_close(sensor.saturated_fraction(frame), torch.full((2,), 0.25))


def test_read_noise_spreads_saturated_pixels_below_top_code(sensor: Sensor) -> None:
    """The full well maps exactly to the top code and read noise comes after the well clips."""
    frame = sensor.capture(torch.full((200, 500), 10.0, dtype=torch.float64), _gen(3))
    read_dn = PARAMS.read_noise_e / sensor.gain_e_per_dn
    expected = norm.cdf(0.5 / read_dn)  # P(round(top + read noise) ≥ top)
    assert sensor.saturated_fraction(frame).item() == pytest.approx(expected, abs=0.01)
    assert frame.min().item() >= sensor.max_dn - 6 * read_dn


@pytest.mark.parametrize("black_level_dn", [0, 32])
def test_frames_are_integers_in_range(black_level_dn: int) -> None:
    sensor = Sensor(SensorParams(black_level_dn=black_level_dn, dark_e=0.0))
    irradiance = torch.rand(4, 32, 32, generator=_gen(4)) * 3
    irradiance[0] = 0.0  # with no offset, read noise pushes dark pixels below 0
    frame = sensor.capture(irradiance, _gen(5))
    assert torch.equal(frame, torch.round(frame))
    assert frame.min().item() >= 0 and frame.max().item() <= sensor.max_dn
    assert frame.max().item() == sensor.max_dn
    if black_level_dn == 0:
        assert frame.min().item() == 0


def test_same_seed_same_frame(sensor: Sensor) -> None:
    irradiance = torch.rand(3, 16, 16, generator=_gen(6))
    first = sensor.capture(irradiance, _gen(7))
    assert torch.equal(first, sensor.capture(irradiance, _gen(7)))
    assert not torch.equal(first, sensor.capture(irradiance, _gen(8)))


def test_gradient_is_mean_response_and_zero_when_saturated(sensor: Sensor) -> None:
    irradiance = torch.full((2, 32, 32), 0.3, dtype=torch.float64)
    irradiance[1] = 5.0  # saturated
    irradiance.requires_grad_(True)
    sensor.capture(irradiance, _gen(9)).sum().backward()
    grad = irradiance.grad
    assert torch.isfinite(grad).all()
    slope = E_PER_UNIT / sensor.gain_e_per_dn
    torch.testing.assert_close(grad[0], torch.full_like(grad[0], slope))
    assert torch.all(grad[1] == 0)


def test_exposure_scales_signal_linearly(sensor: Sensor) -> None:
    irradiance = torch.full((200, 250), 0.5, dtype=torch.float64)
    base = PARAMS.exposure_s
    torch.testing.assert_close(sensor.electrons(irradiance), sensor.electrons(irradiance, base))
    torch.testing.assert_close(
        sensor.electrons(irradiance, 2 * base), 2 * sensor.electrons(irradiance)
    )

    def signal_e(exposure_s: float) -> float:
        frame = sensor.capture(irradiance, _gen(10), exposure_s)
        dn = frame.mean().item() - PARAMS.black_level_dn
        return dn * sensor.gain_e_per_dn - PARAMS.dark_e

    assert signal_e(2 * base) / signal_e(base) == pytest.approx(2.0, rel=0.01)


# -- the simulated camera's fast draws ------------------------------------------------------


def _table_pmf(sensor: Sensor, irradiance: float) -> tuple[np.ndarray, np.ndarray]:
    rate = float(sensor.electrons(irradiance)) + sensor.params.dark_e
    lo, cdf, _ = sensor._code_table(rate)
    return lo + np.arange(cdf.size), np.diff(cdf, prepend=0.0)


def test_without_read_noise_the_code_table_is_the_poisson_cdf() -> None:
    """DN = round(N/g + black): P(DN ≤ c) = P(N ≤ (c + ½ − black)·g), a Poisson CDF."""
    sensor = Sensor(SensorParams(read_noise_e=0.0))
    rate = 0.02 * E_PER_UNIT + sensor.params.dark_e
    lo, cdf, _ = sensor._code_table(rate)
    codes = lo + np.arange(cdf.size)
    bound = np.floor((codes + 0.5 - PARAMS.black_level_dn) * sensor.gain_e_per_dn)
    np.testing.assert_allclose(cdf[:-1], poisson.cdf(bound, rate)[:-1], atol=1e-12)


@pytest.mark.parametrize("signal_e", [0.0, 100.0, 3000.0])
def test_the_code_table_has_the_photon_transfer_mean_and_variance(sensor, signal_e) -> None:
    irradiance = signal_e / E_PER_UNIT
    codes, pmf = _table_pmf(sensor, irradiance)
    mean = float(sensor.mean_dn(torch.tensor(irradiance, dtype=torch.float64)))
    var = float(sensor.var_dn(torch.tensor(irradiance, dtype=torch.float64)))
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert (codes * pmf).sum() == pytest.approx(mean, abs=1e-6)
    assert ((codes - mean) ** 2 * pmf).sum() == pytest.approx(var, rel=1e-4)


def test_the_code_table_clips_at_the_full_well_before_read_noise(sensor: Sensor) -> None:
    codes, pmf = _table_pmf(sensor, 10.0)  # 10x the full well
    read_dn = PARAMS.read_noise_e / sensor.gain_e_per_dn
    assert pmf[codes == sensor.max_dn].item() == pytest.approx(norm.cdf(0.5 / read_dn), abs=1e-9)


def test_draw_samples_the_table_and_each_listed_pixel_its_own_rate(sensor: Sensor) -> None:
    shape, base = (600, 800), 100.0 / E_PER_UNIT
    index = np.arange(0, shape[0] * shape[1], 2)  # every other pixel at its own irradiance
    frame = sensor.draw(np.random.default_rng(0), shape, base, index, np.full(index.size, base))
    codes, pmf = _table_pmf(sensor, base)
    for sample in (np.delete(frame.ravel(), index), frame.ravel()[index]):  # table, Poisson
        counts = np.bincount(sample, minlength=codes[-1] + 1)[codes]
        expected = pmf * sample.size
        keep = expected > 20
        chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert chi2 < keep.sum() + 6 * math.sqrt(2 * keep.sum())  # χ² within 6σ of its mean
    bright = sensor.draw(np.random.default_rng(1), shape, base, index, np.full(index.size, 0.5))
    mean = float(sensor.mean_dn(torch.tensor(0.5, dtype=torch.float64)))
    assert bright.ravel()[index].mean() == pytest.approx(mean, abs=0.1)


def test_draw_is_seeded() -> None:
    sensor = Sensor(PARAMS)
    index, irr = np.array([5, 17]), np.array([0.4, 0.2])
    a, b, c = (sensor.draw(np.random.default_rng(s), (64, 64), 0.01, index, irr) for s in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_dark_map_adds_to_every_frame_and_to_the_model() -> None:
    dark = torch.zeros(50, 60)
    dark[::7, ::5] = 2000.0
    sensor = Sensor(PARAMS, dark_map_e=dark)
    zero = torch.zeros(50, 60, dtype=torch.float64)
    mean = sensor.mean_dn(zero)
    torch.testing.assert_close(
        mean - Sensor(PARAMS).mean_dn(zero), dark.double() / sensor.gain_e_per_dn
    )
    frames = torch.stack([sensor.capture(zero, _gen(s)) for s in range(30)])
    hot = dark > 0
    assert float(frames[:, hot].mean()) == pytest.approx(float(mean[hot][0]), abs=1.0)
    hot_index = np.flatnonzero(hot.numpy())
    drawn = np.stack(
        [sensor.draw(np.random.default_rng(s), (50, 60), 0.0, hot_index, np.zeros(hot_index.size))
         for s in range(30)]
    )  # fmt: skip
    assert drawn[:, hot.numpy()].mean() == pytest.approx(float(mean[hot][0]), abs=1.0)
