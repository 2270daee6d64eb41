"""Oracles for sim.propagation: Gaussian beams, lens foci (sinc² and Airy), band limit, PSFs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from sim.propagation import (
    MaskOptics,
    PhaseMaskPSF,
    angular_spectrum,
    aperture,
    coordinates_um,
    psf_from_phase,
    thin_lens_phase,
)

LAM_NM = 500.0
PITCH_UM = 2.0
N = 256
D_UM = 101 * PITCH_UM  # odd pixel count: a binary pupil symmetric about the axis
FOCAL_MM = 7.3  # λf/D ≈ 9 pixels: the focal spot is well sampled


def gaussian(shape, pitch_um, waist_um, dtype=torch.float64):
    y, x = coordinates_um(shape, pitch_um)
    return torch.exp(-(x**2 + y**2) / waist_um**2).to(complex_of(dtype))


def complex_of(dtype):
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def power(field, pitch_um):
    return float((field.abs() ** 2).sum()) * pitch_um**2


def focus(kind, center_um=(0.0, 0.0)):
    pupil = aperture((N, N), PITCH_UM, D_UM, kind)
    lens = thin_lens_phase((N, N), PITCH_UM, LAM_NM, FOCAL_MM, center_um=center_um)
    field = angular_spectrum(pupil * torch.exp(1j * lens), LAM_NM, PITCH_UM, FOCAL_MM)
    return (field.abs() ** 2).double()


def fwhm_px(profile, peak):
    """Full width at half maximum of a 1-D profile, half-max crossings linearly interpolated."""
    profile = profile / profile[peak]

    def crossing(step):
        j = peak
        while profile[j] > 0.5:
            j += step
        inside, outside = profile[j - step], profile[j]
        return j - step + step * (inside - 0.5) / (inside - outside)

    return float(crossing(1) - crossing(-1))


def test_gaussian_beam_energy_and_width():
    waist_um, z_mm, lam_nm, pitch_um = 60.0, 20.0, 633.0, 4.0
    field = gaussian((128, 128), pitch_um, waist_um, torch.float32)
    out = angular_spectrum(field, lam_nm, pitch_um, z_mm)
    assert out.dtype == torch.complex64
    assert power(out, pitch_um) == pytest.approx(power(field, pitch_um), rel=1e-3)
    # closed form: w(z) = w0·sqrt(1 + (z/zR)²), on-axis intensity falls as (w0/w)²
    z_rayleigh_um = math.pi * waist_um**2 / (lam_nm * 1e-3)
    w_um = waist_um * math.sqrt(1 + (z_mm * 1e3 / z_rayleigh_um) ** 2)
    intensity = out.abs().double() ** 2
    y, x = coordinates_um((128, 128), pitch_um)
    second_moment = float((intensity * x**2).sum() / intensity.sum())
    assert math.sqrt(4 * second_moment) == pytest.approx(w_um, rel=1e-3)
    assert float(intensity[64, 64]) == pytest.approx((waist_um / w_um) ** 2, rel=1e-3)


def test_band_limit_and_transfer_phase_on_plane_waves():
    # 64 µm window, z = 1 mm: limit 1/(λ·sqrt((2z/L)²+1)) = 0.0640 /µm, grid step 1/64 /µm,
    # so the 4th harmonic (0.0625) propagates and the 5th (0.078) is cut.
    n, pitch_um, z_mm = 64, 1.0, 1.0
    limit = 1 / (LAM_NM * 1e-3 * math.sqrt((2 * z_mm * 1e3 / (n * pitch_um)) ** 2 + 1))
    assert 4 / n < limit < 5 / n
    x = torch.arange(n, dtype=torch.float64) * pitch_um
    for k, passes in [(4, True), (5, False)]:
        fx = k / (n * pitch_um)
        wave = torch.exp(2j * math.pi * fx * x).expand(n, n)
        out = angular_spectrum(wave, LAM_NM, pitch_um, z_mm, pad=False)
        if passes:
            kz = math.sqrt(1 / (LAM_NM * 1e-3) ** 2 - fx**2)
            expected = wave * np.exp(2j * math.pi * z_mm * 1e3 * kz)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        else:
            assert float(out.abs().max()) < 1e-12


def test_forward_then_backward_returns_the_field():
    gen = torch.Generator().manual_seed(1)
    y, x = coordinates_um((128, 128), 4.0)
    field = torch.zeros(2, 128, 128, dtype=torch.complex64)
    for _ in range(3):  # a few tilted, offset Gaussian beams with random complex weights
        weight = torch.randn(2, 1, 1, dtype=torch.complex64, generator=gen)
        cx, cy, tx, ty = (torch.rand(4, generator=gen, dtype=torch.float64) - 0.5).tolist()
        env = torch.exp(-((x - 80 * cx) ** 2 + (y - 80 * cy) ** 2) / 40.0**2)
        tilt = torch.exp(2j * math.pi * 0.02 * (tx * x + ty * y))
        field = field + weight * (env * tilt).to(torch.complex64)
    there = angular_spectrum(field, 633.0, 4.0, 3.0)
    back = angular_spectrum(there, 633.0, 4.0, -3.0)
    error = (back - field).abs().norm() / field.abs().norm()
    assert float(error) < 1e-4
    assert float((there - field).abs().norm() / field.abs().norm()) > 0.1  # it did propagate


def test_cached_transfer_function_survives_inference_mode():
    field = gaussian((32, 32), 4.0, 20.0, torch.float32).requires_grad_(True)
    with torch.inference_mode():
        first = angular_spectrum(field.detach(), 633.0, 4.0, 1.2345)
    second = angular_spectrum(field, 633.0, 4.0, 1.2345)  # same cache entry, now with autograd
    second.abs().sum().backward()
    torch.testing.assert_close(second.detach(), first.clone())
    assert torch.isfinite(field.grad).all()


def test_square_lens_focus_is_sinc_squared():
    intensity = focus("square")
    assert np.unravel_index(int(intensity.argmax()), intensity.shape) == (N // 2, N // 2)
    scale_px = LAM_NM * 1e-3 * FOCAL_MM * 1e3 / D_UM / PITCH_UM  # λf/D in pixels
    row = intensity[N // 2]
    assert fwhm_px(row, N // 2) == pytest.approx(0.8859 * scale_px, rel=0.02)
    first_zero = N // 2 + int(np.argmin(row[N // 2 : N // 2 + int(1.5 * scale_px)].numpy()))
    assert first_zero - N // 2 == pytest.approx(scale_px, abs=1.0)


def test_circular_lens_focus_is_airy():
    intensity = focus("circle")
    assert np.unravel_index(int(intensity.argmax()), intensity.shape) == (N // 2, N // 2)
    scale_px = LAM_NM * 1e-3 * FOCAL_MM * 1e3 / D_UM / PITCH_UM
    assert fwhm_px(intensity[N // 2], N // 2) == pytest.approx(1.029 * scale_px, rel=0.02)
    assert fwhm_px(intensity[:, N // 2], N // 2) == pytest.approx(1.029 * scale_px, rel=0.02)


def test_off_axis_lens_moves_the_spot_by_its_centre():
    dx_px, dy_px = 16, -10
    intensity = focus("square", center_um=(dx_px * PITCH_UM, dy_px * PITCH_UM))
    peak = np.unravel_index(int(intensity.argmax()), intensity.shape)
    assert peak == (N // 2 + dy_px, N // 2 + dx_px)


def test_aperture_area():
    shape, pitch_um = (64, 64), 1.0
    circle = aperture(shape, pitch_um, 40.0, "circle", supersample=8)
    assert float(circle.sum()) == pytest.approx(math.pi * 20.0**2, rel=5e-3)
    square = aperture(shape, pitch_um, 21.0, "square")
    assert float(square.sum()) == 21 * 21
    assert set(square.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError):
        aperture(shape, pitch_um, 10.0, "hexagon")


def sinc_sq_fraction(half_width):
    """Fraction of a unit sinc²(t) = (sin πt / πt)² that lies in |t| ≤ half_width."""
    return quad(lambda t: np.sinc(t) ** 2, -half_width, half_width, limit=200)[0]


def test_psf_from_phase_encircled_fraction_and_gradient():
    pupil = aperture((N, N), PITCH_UM, D_UM, "square", dtype=torch.float64)
    lens = thin_lens_phase((N, N), PITCH_UM, LAM_NM, FOCAL_MM, dtype=torch.float64)
    phase = lens.clone().requires_grad_(True)
    kernel = 31
    psf = psf_from_phase(phase, LAM_NM, PITCH_UM, FOCAL_MM, kernel, amplitude=pupil)
    assert psf.shape == (kernel, kernel)
    assert float(psf.detach().min()) >= 0.0
    assert float(psf.detach().sum()) <= 1.0
    assert np.unravel_index(int(psf.argmax()), psf.shape) == (kernel // 2, kernel // 2)
    # the separable sinc² focus: power in the K×K window is the 1-D fraction squared
    half_width = kernel * PITCH_UM / 2 * D_UM / (LAM_NM * 1e-3 * FOCAL_MM * 1e3)
    assert float(psf.detach().sum()) == pytest.approx(sinc_sq_fraction(half_width) ** 2, rel=5e-3)
    psf[kernel // 2, kernel // 2].backward()
    assert torch.isfinite(phase.grad).all()
    assert float(phase.grad.abs().sum()) > 0


def small_spot(dtype=torch.float32):
    n, pitch_um, focal_mm = 128, 2.0, 1.464
    pupil = aperture((n, n), pitch_um, 61 * pitch_um, "circle", dtype=dtype)
    lens = thin_lens_phase((n, n), pitch_um, LAM_NM, focal_mm, dtype=dtype)
    return lens, pupil, pitch_um, focal_mm


def test_sensor_binning_integrates_area_and_conserves_the_sum():
    lens, pupil, pitch_um, focal_mm = small_spot(torch.float64)
    full = psf_from_phase(lens, LAM_NM, pitch_um, focal_mm, 128, amplitude=pupil)
    binned = psf_from_phase(
        lens, LAM_NM, pitch_um, focal_mm, 65, amplitude=pupil, sensor_pitch_um=2 * pitch_um
    )
    # even factor: the centre sensor pixel covers fine samples c-1, c, so the 130-sample window
    # starts one sample before the grid and ends one after it: it holds all the light
    padded = np.pad(full.numpy(), ((1, 1), (1, 1)))
    oracle = padded.reshape(65, 2, 65, 2).sum(axis=(1, 3))
    np.testing.assert_allclose(binned.numpy(), oracle, rtol=1e-12, atol=1e-15)
    assert float(binned.sum()) == pytest.approx(float(full.sum()), rel=1e-12)
    # odd factor: the 21·3 window is the 63-sample centred window, summed in 3×3 blocks
    window = psf_from_phase(lens, LAM_NM, pitch_um, focal_mm, 63, amplitude=pupil)
    coarse = psf_from_phase(
        lens, LAM_NM, pitch_um, focal_mm, 21, amplitude=pupil, sensor_pitch_um=3 * pitch_um
    )
    oracle = window.numpy().reshape(21, 3, 21, 3).sum(axis=(1, 3))
    np.testing.assert_allclose(coarse.numpy(), oracle, rtol=1e-12, atol=1e-15)
    assert np.unravel_index(int(coarse.argmax()), coarse.shape) == (10, 10)
    with pytest.raises(ValueError):
        psf_from_phase(lens, LAM_NM, pitch_um, focal_mm, 8, sensor_pitch_um=2.5 * pitch_um)


def test_float64_matches_float32_and_batches():
    lens32, pupil32, pitch_um, focal_mm = small_spot(torch.float32)
    lens64, pupil64, _, _ = small_spot(torch.float64)
    shifts = torch.tensor([0.0, 0.3, -0.7])[:, None, None]
    psf32 = psf_from_phase(lens32 + shifts, LAM_NM, pitch_um, focal_mm, 15, amplitude=pupil32)
    psf64 = psf_from_phase(lens64 + shifts.double(), LAM_NM, pitch_um, focal_mm, 15, pupil64)
    assert psf32.dtype == torch.float32 and psf64.dtype == torch.float64
    torch.testing.assert_close(psf32.double(), psf64, rtol=1e-4, atol=1e-7)
    # a constant phase offset changes nothing: every batch entry is the same PSF
    torch.testing.assert_close(psf64[1], psf64[0], rtol=1e-10, atol=1e-14)
    field = gaussian((64, 64), 4.0, 30.0, torch.float64)
    out = angular_spectrum(field, 633.0, 4.0, 2.0)
    assert out.dtype == torch.complex128
    assert power(out, 4.0) == pytest.approx(power(field, 4.0), rel=1e-9)


def test_phase_mask_psf_module():
    optics = MaskOptics(
        wavelengths_nm=(450.0, 650.0),
        mask_shape=(64, 64),
        pitch_um=4.0,
        distance_mm=2.0,
        kernel_size=15,
        diameter_um=200.0,
    )
    kwargs = dict(num_psfs=2, optics=optics)
    module = PhaseMaskPSF(seed=3, **kwargs)
    psfs = module()
    values = psfs.detach()
    assert values.shape == (2, 2, 15, 15)
    assert float(values.min()) >= 0.0
    assert (values.sum(dim=(-2, -1)) <= 1.0).all()
    for c, wl in enumerate(optics.wavelengths_nm):
        oracle = psf_from_phase(
            module.phase[:, c].detach(), wl, 4.0, 2.0, 15, amplitude=module.amplitude
        )
        torch.testing.assert_close(values[:, c], oracle)
    torch.testing.assert_close(PhaseMaskPSF(seed=3, **kwargs)(), values)
    assert not torch.allclose(PhaseMaskPSF(seed=4, **kwargs)(), values)
    # without noise it is a lens focused on the sensor: a centred spot, same for every PSF
    lens_only = PhaseMaskPSF(seed=0, init_noise_rad=0.0, **kwargs)()
    assert np.unravel_index(int(lens_only[0, 0].argmax()), (15, 15)) == (7, 7)
    torch.testing.assert_close(lens_only[0], lens_only[1])
    psfs[:, :, 7, 7].sum().backward()
    assert torch.isfinite(module.phase.grad).all() and float(module.phase.grad.abs().sum()) > 0
