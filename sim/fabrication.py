"""How the fabricated frontend differs from its design: y = α·(a warped by β) ⊛ (k + δ) + ε.

Geometry convention, shared by `warp_image` and `warp_points`: a point is (x, y) = (column, row)
in pixels, pixel centres at integers, rows pointing down. The warp rotates by `rotation_deg`
counter-clockwise *as displayed* (so +90° takes a point right of the centre to above it) about the
image centre ((W − 1)/2, (H − 1)/2), then shifts by (dx, dy) = (right, down):

    x' = cx + cos θ·(x − cx) + sin θ·(y − cy) + dx
    y' = cy − sin θ·(x − cx) + cos θ·(y − cy) + dy
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sim.params import DisplayParams, FabricationParams

Number = float | Tensor
_SEED_SALT = 0x9E3779B97F4A7C15  # golden-ratio constant: a fixed, arbitrary stream offset


def display_response(values: Tensor, gamma: float) -> Tensor:
    """Relative emitted intensity: the display clips drive values to [0, 1], then applies gamma."""
    return values.clamp(0, 1) ** gamma


def illumination_map(
    shape: tuple[int, int],
    falloff: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Vignetting-like relative illumination: 1 at the centre, 1 − falloff at the corners."""
    h, w = shape
    y = torch.arange(h, dtype=dtype, device=device) - (h - 1) / 2
    x = torch.arange(w, dtype=dtype, device=device) - (w - 1) / 2
    corner_r2 = ((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2
    if corner_r2 == 0:
        return torch.ones(h, w, dtype=dtype, device=device)
    return 1 - falloff * (y[:, None] ** 2 + x[None, :] ** 2) / corner_r2


def _scalar(value: Number, like: Tensor) -> Tensor:
    """Floats or 0-d tensors; a tensor keeps its graph, so the geometry can be fitted too."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def warp_points(
    xy: Tensor,
    shape: tuple[int, int],
    shift_px: Sequence[Number] = (0.0, 0.0),
    rotation_deg: Number = 0.0,
) -> Tensor:
    """Where display points (..., 2) as (x, y) land after the warp: the calibration ground truth."""
    h, w = shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    theta = torch.deg2rad(_scalar(rotation_deg, xy))
    cos, sin = torch.cos(theta), torch.sin(theta)
    x, y = xy[..., 0] - cx, xy[..., 1] - cy
    dx, dy = (_scalar(s, xy) for s in shift_px)
    return torch.stack((cx + cos * x + sin * y + dx, cy - sin * x + cos * y + dy), dim=-1)


def _unwarp_points(
    xy: Tensor, shape: tuple[int, int], shift_px: Sequence[Number], rotation_deg: Number
) -> Tensor:
    """Inverse of `warp_points`: undo the shift, then rotate back about the same centre."""
    shift = torch.stack([_scalar(s, xy) for s in shift_px])
    return warp_points(xy - shift, shape, (0.0, 0.0), -_scalar(rotation_deg, xy))


def _pixel_grid(shape: tuple[int, int], like: Tensor) -> Tensor:
    """(H, W, 2) of (x, y) pixel-centre coordinates."""
    h, w = shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=like.dtype, device=like.device),
        torch.arange(w, dtype=like.dtype, device=like.device),
        indexing="ij",
    )
    return torch.stack((xs, ys), dim=-1)


def warp_image(
    images: Tensor, shift_px: Sequence[Number] = (0.0, 0.0), rotation_deg: Number = 0.0
) -> Tensor:
    """The image (..., H, W) as the misaligned optic sees it; bilinear, zeros outside.

    Each output pixel pulls from the inverse-warped source position, so the forward map of
    content is exactly `warp_points`. With align_corners=False pixel i's centre sits at
    normalised (2i + 1)/size − 1, which is what the grid below is converted to.
    """
    h, w = images.shape[-2:]
    source = _unwarp_points(_pixel_grid((h, w), images), (h, w), shift_px, rotation_deg)
    size = torch.tensor([w, h], dtype=images.dtype, device=images.device)
    grid = (2 * source + 1) / size - 1
    # Every image and channel shares one grid: fold them all into channels of a single batch.
    flat = images.reshape(1, -1, h, w)
    warped = F.grid_sample(
        flat, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped.reshape(images.shape)


def _discrete_gaussian(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Lindeberg's discrete Gaussian e^{-t} I_n(t), t = σ²: exact variance σ² even for σ < 1.

    A sampled Gaussian is visibly too narrow at σ ≈ 0.5; this kernel is the inverse DFT of
    exp(t(cos ω − 1)), sampled finely enough that aliasing is negligible.
    """
    radius = math.ceil(5 * sigma) + 3
    n = torch.arange(-radius, radius + 1, dtype=torch.float64)
    omega = 2 * math.pi * torch.arange(4 * radius + 4, dtype=torch.float64) / (4 * radius + 4)
    spectrum = torch.exp(sigma**2 * (torch.cos(omega) - 1))
    kernel = (spectrum[None, :] * torch.cos(n[:, None] * omega[None, :])).mean(dim=1)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def blur_psfs(psfs: Tensor, sigma_px: float) -> Tensor:
    """Gaussian blur of PSFs (..., k, k), same size, zero outside the window.

    Zero padding (not renormalising at the border) keeps each PSF's sum whenever the blurred PSF
    still fits the window, and loses the light that would fall outside otherwise, as optics would.
    """
    if sigma_px == 0:
        return psfs
    kernel = _discrete_gaussian(sigma_px, psfs.dtype, psfs.device)
    radius = kernel.numel() // 2
    flat = psfs.reshape(-1, 1, *psfs.shape[-2:])
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1), padding=(0, radius))
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return flat.reshape(psfs.shape)


def perturb_psfs(
    psfs: Tensor,
    kernel_error: float,
    generator: torch.Generator | None = None,
    corr_px: float = 0.0,
) -> Tensor:
    """Fabrication error δ: a relative error of std `kernel_error` per pixel, clamped because
    light is ≥ 0. With `corr_px` > 0 the error is a Gaussian random field of that correlation
    length (std in pixels of the smoothing), as a fabrication bias that drifts across a
    sub-optic distorts its PSF's shape smoothly rather than pixel by pixel."""
    if kernel_error == 0:
        return psfs
    # Draw where the generator lives, so a CPU seed gives the same optic on any device.
    device = psfs.device if generator is None else generator.device
    if corr_px == 0:
        z = torch.randn(psfs.shape, generator=generator, dtype=psfs.dtype, device=device)
    else:
        g = _discrete_gaussian(corr_px, psfs.dtype, device)
        r = g.numel() // 2
        k = psfs.shape[-1]
        field = torch.randn(
            (*psfs.shape[:-2], k + 2 * r, k + 2 * r),
            generator=generator,
            dtype=psfs.dtype,
            device=device,
        ).reshape(-1, 1, k + 2 * r, k + 2 * r)
        field = F.conv2d(F.conv2d(field, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        z = field.reshape(psfs.shape) / g.square().sum()  # unit variance: Σ(g⊗g)² = (Σg²)²
    return (psfs * (1 + kernel_error * z.to(psfs.device))).clamp(min=0)


class Fabrication:
    """One fabricated frontend: its seed fixes δ, so a bench sees the same optic every run."""

    def __init__(
        self,
        params: FabricationParams,
        display: DisplayParams,
        grid_hw: tuple[int, int] | None = None,
    ) -> None:
        self.params = params
        self.display = display
        self.gain = params.gain
        self.background = params.background
        self.grid_shape = (display.height, display.width) if grid_hw is None else tuple(grid_hw)

    @property
    def display_shape(self) -> tuple[int, int]:
        return self.display.height, self.display.width

    def generator(self) -> torch.Generator:
        """A fresh generator from params.seed, so fabrication errors never depend on call order.

        The seed is salted: with an unsalted seed equal to the design seed, δ would replay the
        very draws that made the designed PSFs, correlating the error with the design.
        """
        return torch.Generator().manual_seed((self.params.seed + _SEED_SALT) % 2**64)

    def fabricate_psfs(self, psfs: Tensor) -> Tensor:
        """Designed PSFs → fabricated ones: perturb, then blur. Same seed, same result."""
        p = self.params
        perturbed = perturb_psfs(psfs, p.kernel_error, self.generator(), p.kernel_error_corr_px)
        return blur_psfs(perturbed, self.params.kernel_blur_px)

    def apply_to_display(self, values: Tensor) -> Tensor:
        """Drive values (..., H, W) → relative intensity leaving the display, with falloff."""
        if tuple(values.shape[-2:]) != self.display_shape:
            raise ValueError(f"expected (..., {self.display_shape}), got {tuple(values.shape)}")
        emitted = display_response(values, self.display.gamma)
        falloff = self.params.illumination_falloff
        return emitted * illumination_map(self.display_shape, falloff, values.dtype, values.device)

    def warp(self, images: Tensor) -> Tensor:
        return warp_image(images, self.params.shift_px, self.params.rotation_deg)

    def warp_points(self, xy: Tensor) -> Tensor:
        """Ground-truth landing points of input-grid points (x, y) for this optic's misalignment
        (the warp turns about the centre of `grid_shape`: the input grid, by default the display).
        """
        return warp_points(xy, self.grid_shape, self.params.shift_px, self.params.rotation_deg)
