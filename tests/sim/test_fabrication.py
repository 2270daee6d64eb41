"""Fabrication errors: geometry against roll/rot90/centroids, PSF errors against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ive

from sim.fabrication import (
    Fabrication,
    blur_psfs,
    display_response,
    illumination_map,
    perturb_psfs,
    warp_image,
    warp_points,
)
from sim.params import DisplayParams, FabricationParams

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _centroid(image: torch.Tensor) -> torch.Tensor:
    h, w = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    total = image.sum()
    return torch.stack(((image * xs).sum() / total, (image * ys).sum() / total))


def test_display_response_closed_form() -> None:
    values = torch.tensor([-0.5, 0.0, 0.25, 0.5, 1.0, 1.5], dtype=F64)
    expected = torch.tensor([0.0, 0.0, 0.25**2.2, 0.5**2.2, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(display_response(values, 2.2), expected)


def test_illumination_map_closed_form() -> None:
    falloff, (h, w) = 0.2, (5, 7)
    y, x = np.mgrid[0:h, 0:w]
    r2 = (y - 2.0) ** 2 + (x - 3.0) ** 2
    expected = 1 - falloff * r2 / (2.0**2 + 3.0**2)
    got = illumination_map((h, w), falloff, dtype=F64)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert got[2, 3].item() == 1.0
    for corner in (got[0, 0], got[0, -1], got[-1, 0], got[-1, -1]):
        assert corner.item() == pytest.approx(1 - falloff)
    assert torch.equal(illumination_map((1, 1), falloff), torch.ones(1, 1))


@pytest.mark.parametrize("shift", [(2, -3), (-4, 1), (0, 4)])
def test_integer_shift_equals_roll(shift: tuple[int, int]) -> None:
    image = torch.rand(2, 3, 16, 20, generator=_gen(0), dtype=F64)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))  # wider than the shift: no wrap
    expected = torch.roll(padded, shifts=(shift[1], shift[0]), dims=(-2, -1))
    torch.testing.assert_close(warp_image(padded, shift), expected, atol=1e-6, rtol=0)


def test_zero_warp_is_identity() -> None:
    image = torch.rand(3, 1, 13, 17, generator=_gen(1))
    torch.testing.assert_close(warp_image(image, (0.0, 0.0), 0.0), image, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("degrees", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_quarter_turns_equal_rot90(degrees: float, k: int) -> None:
    """torch.rot90 with k=1 on (rows, cols) turns counter-clockwise as displayed."""
    image = torch.rand(2, 3, 9, 9, generator=_gen(2))
    expected = torch.rot90(image, k=k, dims=(-2, -1))
    torch.testing.assert_close(warp_image(image, rotation_deg=degrees), expected, atol=1e-5, rtol=0)


def test_warp_points_sign_convention() -> None:
    centre = torch.tensor([3.0, 2.0], dtype=F64)  # of a 5 x 7 image
    right = centre + torch.tensor([1.0, 0.0], dtype=F64)
    # +90° as displayed (rows down): a point right of the centre goes up, i.e. to a smaller row.
    torch.testing.assert_close(
        warp_points(right, (5, 7), rotation_deg=90.0), centre + torch.tensor([0.0, -1.0], dtype=F64)
    )
    shifted = warp_points(centre, (5, 7), shift_px=(1.5, -0.5))
    torch.testing.assert_close(shifted, centre + torch.tensor([1.5, -0.5], dtype=F64))


@pytest.mark.parametrize(
    ("shift", "degrees"),
    [((0.3, -0.7), 0.0), ((1.4, -0.8), 1.0), ((0.0, 0.0), 1.0), ((-0.25, 0.6), -1.0)],
)
def test_dot_centroid_follows_warp_points(shift: tuple[float, float], degrees: float) -> None:
    h, w, dot = 28, 32, (12.0, 9.0)
    image = torch.zeros(1, 1, h, w, dtype=F64)
    image[..., int(dot[1]), int(dot[0])] = 1.0
    warped = warp_image(image, shift, degrees)[0, 0]
    target = warp_points(torch.tensor(dot, dtype=F64), (h, w), shift, degrees)
    torch.testing.assert_close(_centroid(warped), target, atol=0.05, rtol=0)


def test_warp_gradient_is_the_adjoint_shift() -> None:
    image = torch.rand(1, 2, 12, 12, generator=_gen(3), dtype=F64).requires_grad_(True)
    weights = torch.rand(1, 2, 12, 12, generator=_gen(4), dtype=F64)
    (warp_image(image, (2, 1)) * weights).sum().backward()
    # Interior pixels map one to one, so the gradient is the weights shifted back.
    expected = torch.roll(weights, shifts=(-1, -2), dims=(-2, -1))
    torch.testing.assert_close(image.grad[..., :-1, :-2], expected[..., :-1, :-2])
    torch.testing.assert_close(image.grad[..., -1:, :], torch.zeros_like(image.grad[..., -1:, :]))


def test_warp_passes_gradcheck() -> None:
    image = torch.rand(1, 1, 6, 7, generator=_gen(5), dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: warp_image(x, (0.3, -0.2), 7.0), (image,))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_blur_preserves_sum_and_variance(sigma: float) -> None:
    k = 41
    psfs = torch.zeros(2, 3, k, k, dtype=F64)
    psfs[..., k // 2, k // 2] = 1.0
    psfs[1] *= 3.0
    blurred = blur_psfs(psfs, sigma)
    torch.testing.assert_close(blurred.sum(dim=(-2, -1)), psfs.sum(dim=(-2, -1)))
    offsets = torch.arange(k, dtype=F64) - k // 2
    single = blurred[0, 0]
    var_x = (single.sum(dim=0) * offsets**2).sum().item()
    var_y = (single.sum(dim=1) * offsets**2).sum().item()
    assert var_x == pytest.approx(sigma**2, rel=0.02)
    assert var_y == pytest.approx(sigma**2, rel=0.02)


def test_blur_kernel_is_the_discrete_gaussian() -> None:
    sigma, k = 0.8, 15
    delta = torch.zeros(k, k, dtype=F64)
    delta[k // 2, k // 2] = 1.0
    offsets = np.arange(k) - k // 2
    kernel_1d = ive(offsets, sigma**2)  # e^{-t} I_n(t), t = σ²
    np.testing.assert_allclose(
        blur_psfs(delta, sigma).numpy(), np.outer(kernel_1d, kernel_1d), atol=1e-9
    )


def test_blur_zero_sigma_is_identity_and_blur_is_differentiable() -> None:
    psfs = torch.rand(4, 7, 7, generator=_gen(6), dtype=F64).requires_grad_(True)
    assert torch.equal(blur_psfs(psfs, 0.0), psfs)
    assert torch.autograd.gradcheck(lambda x: blur_psfs(x, 0.7), (psfs,))


def test_perturb_relative_error_statistics() -> None:
    psfs = torch.rand(64, 31, 31, generator=_gen(7), dtype=F64) + 0.1
    error = 0.05
    perturbed = perturb_psfs(psfs, error, _gen(8))
    relative = torch.linalg.matrix_norm(perturbed - psfs) / torch.linalg.matrix_norm(psfs)
    assert relative.mean().item() == pytest.approx(error, rel=0.02)
    z = (perturbed / psfs - 1) / error
    assert abs(z.mean().item()) < 4 / z.numel() ** 0.5  # z ~ N(0, 1) i.i.d.: 4 standard errors
    assert z.std().item() == pytest.approx(1.0, rel=0.015)


def test_perturb_identity_nonnegative_seeded_differentiable() -> None:
    psfs = torch.rand(8, 9, 9, generator=_gen(9), dtype=F64)
    assert torch.equal(perturb_psfs(psfs, 0.0, _gen(1)), psfs)
    wild = perturb_psfs(psfs, 1.0, _gen(1))
    assert wild.min().item() == 0.0  # large errors hit the clamp, light stays non-negative
    assert torch.equal(wild, perturb_psfs(psfs, 1.0, _gen(1)))
    assert not torch.equal(wild, perturb_psfs(psfs, 1.0, _gen(2)))
    leaf = psfs.clone().requires_grad_(True)
    perturb_psfs(leaf, 0.1, _gen(3)).sum().backward()
    z = torch.randn(psfs.shape, generator=_gen(3), dtype=F64)
    torch.testing.assert_close(leaf.grad, 1 + 0.1 * z)


def test_fabrication_is_deterministic_per_seed() -> None:
    display = DisplayParams()
    psfs = torch.rand(8, 7, 7, generator=_gen(10))
    same_a = Fabrication(FabricationParams(seed=3), display)
    same_b = Fabrication(FabricationParams(seed=3), display)
    other = Fabrication(FabricationParams(seed=4), display)
    fabricated = same_a.fabricate_psfs(psfs)
    assert torch.equal(fabricated, same_b.fabricate_psfs(psfs))
    assert torch.equal(fabricated, same_a.fabricate_psfs(psfs))  # repeat calls: same optic
    assert not torch.equal(fabricated, other.fabricate_psfs(psfs))
    params = same_a.params
    # Salted: same seed as a design generator must not replay the design's draws.
    assert not torch.equal(same_a.generator().get_state(), _gen(3).get_state())
    perturbed = perturb_psfs(psfs, params.kernel_error, same_a.generator())
    expected = blur_psfs(perturbed, params.kernel_blur_px)
    torch.testing.assert_close(fabricated, expected)


def test_fabrication_display_and_warp() -> None:
    params = FabricationParams(gain=0.8, background=0.02, illumination_falloff=0.1)
    display = DisplayParams(width=12, height=10, gamma=2.0)
    fab = Fabrication(params, display)
    assert (fab.gain, fab.background) == (0.8, 0.02)
    values = torch.rand(2, 10, 12, generator=_gen(11), dtype=F64)
    expected = values**2 * illumination_map((10, 12), 0.1, dtype=F64)
    torch.testing.assert_close(fab.apply_to_display(values), expected)
    with pytest.raises(ValueError):
        fab.apply_to_display(torch.rand(10, 11))
    images = torch.rand(2, 1, 10, 12, generator=_gen(12), dtype=F64)
    warped = warp_image(images, params.shift_px, params.rotation_deg)
    torch.testing.assert_close(fab.warp(images), warped)
    xy = torch.tensor([[3.0, 4.0]], dtype=F64)
    torch.testing.assert_close(
        fab.warp_points(xy), warp_points(xy, (10, 12), params.shift_px, params.rotation_deg)
    )


def test_correlated_kernel_error_has_the_set_std_and_correlation() -> None:
    """A smooth δ keeps unit variance; its neighbour correlation is exp(-d²/4σ²) (closed form
    for white noise smoothed by a Gaussian of std σ)."""
    psfs = torch.ones(4000, 1, 7, 7, dtype=torch.float64)
    error, corr = 0.2, 2.0
    z = (perturb_psfs(psfs, error, _gen(5), corr_px=corr) - 1) / error
    assert float(z.std()) == pytest.approx(1.0, rel=0.02)
    for d in (1, 2, 3):
        rho = float((z[..., :, :-d] * z[..., :, d:]).mean())
        assert rho == pytest.approx(math.exp(-(d**2) / (4 * corr**2)), abs=0.02)
