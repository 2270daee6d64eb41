"""Sensor model: sampled frames against the closed-form photon-transfer model."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

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
