"""Oracles for sim.fourier4f: direct complex convolution, all-pass, shifts, Parseval, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve

from sim.fourier4f import Fourier4fFrontend

H, W = 12, 10  # not square, so a swapped axis shows


def make(kernels=3, seed=0, dtype=torch.float32):
    return Fourier4fFrontend(
        kernels, (H, W), wavelength_nm=633.0, pitch_um=8.0, focal_mm=100.0, seed=seed, dtype=dtype
    )


def images(n=2, seed=0, dtype=torch.float32):
    return torch.rand(n, 1, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_padded_grid_and_fourier_pitch():
    frontend = make()
    assert frontend.padded_size == (24, 20)  # next_fast_len(23), next_fast_len(19)
    row_um, col_um = frontend.fourier_pitch_um
    assert row_um == pytest.approx(0.633 * 100e3 / (24 * 8.0))
    assert col_um == pytest.approx(0.633 * 100e3 / (20 * 8.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_is_intensity_of_direct_linear_convolution(dtype):
    frontend = make(seed=5, dtype=dtype)
    # a random mask with its full amplitude range, not just the near-all-pass start
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        frontend.amplitude_raw.copy_(2 * torch.randn(frontend.amplitude_raw.shape, generator=gen))
        frontend.phase.copy_(math.pi * torch.randn(frontend.phase.shape, generator=gen))
    x = images(dtype=dtype)
    out = frontend(x).detach().numpy()
    assert out.shape == (2, 3, H, W) and out.dtype == np.dtype(str(dtype).split(".")[1])
    kernels = frontend.coherent_kernels().detach().numpy().astype(np.complex128)
    hp, wp = frontend.padded_size
    for n in range(2):
        image = x[n, 0].double().numpy()
        for k in range(3):
            full = convolve(image, kernels[k], mode="full", method="direct")
            same = full[hp // 2 : hp // 2 + H, wp // 2 : wp // 2 + W]
            oracle = np.abs(same) ** 2
            error = np.abs(out[n, k] - oracle).max() / np.abs(oracle).max()
            assert error < (1e-5 if dtype == torch.float32 else 1e-12)


def test_all_pass_mask_images_the_square_of_the_input():
    frontend = make()
    frontend.set_fourier_mask(torch.ones(3, *frontend.padded_size, dtype=torch.complex64))
    assert float(frontend.fourier_mask().detach().abs().min()) == 1.0
    kernels = frontend.coherent_kernels().detach()
    delta = torch.zeros_like(kernels)
    hp, wp = frontend.padded_size
    delta[:, hp // 2, wp // 2] = 1.0
    torch.testing.assert_close(kernels, delta, rtol=0, atol=1e-6)
    x = images()
    out = frontend(x).detach()
    torch.testing.assert_close(out, (x**2).expand(-1, 3, -1, -1), rtol=1e-5, atol=1e-6)
    # Parseval: nothing leaves the image footprint, so the output holds all the input power
    torch.testing.assert_close(out.sum(dim=(-2, -1)), (x**2).sum(dim=(-2, -1)).expand(-1, 3))


def test_linear_phase_ramp_shifts_the_image():
    frontend = make(kernels=2)
    hp, wp = frontend.padded_size
    ky = torch.arange(hp, dtype=torch.float64)[:, None] - hp // 2
    kx = torch.arange(wp, dtype=torch.float64)[None, :] - wp // 2
    shifts = [(2, -3), (-4, 1)]  # (rows down, columns right)
    ramps = [torch.exp(-2j * math.pi * (ky * dy / hp + kx * dx / wp)) for dy, dx in shifts]
    frontend.set_fourier_mask(torch.stack(ramps))
    x = images(n=1)
    out = frontend(x).detach()[0]
    for k, (dy, dx) in enumerate(shifts):
        expected = torch.zeros(H, W)
        rows, cols = slice(max(dy, 0), H + min(dy, 0)), slice(max(dx, 0), W + min(dx, 0))
        src_rows = slice(max(-dy, 0), H + min(-dy, 0))
        src_cols = slice(max(-dx, 0), W + min(-dx, 0))
        expected[rows, cols] = x[0, 0, src_rows, src_cols] ** 2
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-6)


def test_parseval_on_the_full_sensor_plane():
    frontend = make(seed=1, dtype=torch.float64)
    x = images(dtype=torch.float64)
    plane = frontend.sensor_plane(x).detach()
    hp, wp = frontend.padded_size
    # phase-only masks scatter light but keep it all: sum |u ⊛ h|² = sum |u|²
    mask = frontend.fourier_mask().detach()
    frontend.set_fourier_mask(torch.exp(1j * mask.angle()))
    phase_only = frontend.sensor_plane(x).detach().sum(dim=(-2, -1))
    torch.testing.assert_close(phase_only, (x**2).sum(dim=(-2, -1)).expand(-1, 3))
    # with amplitude: sum |u ⊛ h|² = sum_f |M(f)|² |U(f)|² / (Hp·Wp), spectrum from numpy
    padded = np.zeros((2, hp, wp))
    top, left = (hp - H) // 2, (wp - W) // 2
    padded[:, top : top + H, left : left + W] = x[:, 0].numpy()
    spectrum = np.fft.fftshift(np.fft.fft2(padded), axes=(-2, -1))
    gain = np.abs(mask.numpy()) ** 2
    oracle = (np.abs(spectrum[:, None]) ** 2 * gain[None]).sum(axis=(-2, -1)) / (hp * wp)
    np.testing.assert_allclose(plane.sum(dim=(-2, -1)).numpy(), oracle, rtol=1e-10)
    assert (oracle < (x**2).sum().item()).all()  # a passive mask only loses light


def test_gradients_reach_both_mask_parameters():
    frontend = make()
    x = images()
    weights = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(9))
    (frontend(x) * weights).sum().backward()
    for grad in (frontend.amplitude_raw.grad, frontend.phase.grad):
        assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().max()) > 0


def test_seeded_init_and_input_check():
    a, b, c = make(seed=7), make(seed=7), make(seed=8)
    torch.testing.assert_close(a.fourier_mask(), b.fourier_mask())
    assert not torch.allclose(a.fourier_mask(), c.fourier_mask())
    amplitude = a.fourier_mask().detach().abs()
    assert float(amplitude.min()) >= 0.0 and float(amplitude.max()) <= 1.0
    with pytest.raises(ValueError):
        a(torch.zeros(1, 3, H, W))
