"""Measured kernels: each tile's PSF by non-negative regularised least squares on known patterns.

The frontend's forward model per tile is linear in its kernel K (k x k per channel):

    frame(t) = Σ_j K[j] · E(A⁻¹(t + off − j)),   off = k − 1 − (k − 1) // 2,

where E is the light leaving the display (drive levels through the display response, times its
illumination) and A the tile's display→frame registration, sampled bilinearly. Many displayed
patterns give many equations per unknown; the solution is regularised towards zero and kept
non-negative because a PSF is an intensity.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.linalg import cholesky, solve_triangular
from scipy.ndimage import map_coordinates
from scipy.optimize import nnls
from scipy.signal import fftconvolve


def kernel_offset(k: int) -> int:
    """Where the design's "same" window starts inside the full convolution."""
    return k - 1 - (k - 1) // 2


def psf_centroid(psf: np.ndarray) -> np.ndarray:
    """(x, y) intensity centroid of a PSF (C, k, k), summed over channels."""
    img = psf.sum(axis=0)
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()


def warp_to_frame(
    images: np.ndarray, affine: np.ndarray, region: tuple[int, int, int, int]
) -> np.ndarray:
    """Display images (N, C, Hd, Wd) seen through `affine`, sampled on a frame region (y0, x0, h,
    w): bilinear, zero outside the display (the same sampling the simulated bench uses)."""
    y0, x0, h, w = region
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    m = np.vstack([affine, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(m)
    u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    coords = np.stack([v.ravel(), u.ravel()])
    n, c = images.shape[:2]
    out = np.empty((n, c, h, w), np.float64)
    for i in range(n):
        for ch in range(c):
            out[i, ch] = map_coordinates(
                images[i, ch], coords, order=1, mode="grid-constant", cval=0.0
            ).reshape(h, w)
    return out


def design_rows(warped: np.ndarray, k: int) -> np.ndarray:
    """Rows of the linear system: for each output pixel of the region shrunk by k − 1, the k x k
    window of warped light that the kernel weighs, flipped (true convolution). (N·h'·w', C·k²)."""
    windows = sliding_window_view(warped, (k, k), axis=(-2, -1))  # (N, C, h', w', k, k)
    windows = windows[..., ::-1, ::-1]
    n, c, hh, ww = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * hh * ww, c * k * k)


def solve_nonnegative(
    rows: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None, ridge: float = 1e-6
) -> tuple[np.ndarray, float]:
    """argmin_{K ≥ 0} ||W^½ (rows K − values)||² + λ||K||², λ = ridge · mean diagonal.

    Returns (K, relative residual ||A K − y|| / ||y||); see `solve_normal`.
    """
    w = np.ones(len(values)) if weights is None else weights
    aw = rows * w[:, None]
    return solve_normal(rows.T @ aw, aw.T @ values, float(np.sum(w * values**2)), ridge)


def solve_normal(
    normal: np.ndarray, rhs: np.ndarray, yty: float, ridge: float = 1e-6
) -> tuple[np.ndarray, float]:
    """argmin_{K ≥ 0} of the least-squares problem with normal equations AᵀA = `normal`,
    Aᵀy = `rhs`, yᵀy = `yty`, plus λ||K||², λ = ridge · mean diagonal.

    With R the Cholesky factor of AᵀA + λI the objective equals ||R K − R⁻ᵀ Aᵀy||² up to a
    constant, which `nnls` takes directly, so the tall system itself is never needed.
    Returns (K, relative residual ||A K − y|| / ||y||).
    """
    normal = np.array(normal, np.float64)
    lam = ridge * float(np.mean(np.diag(normal)))
    fit_normal = normal.copy()
    fit_normal[np.diag_indices_from(fit_normal)] += lam
    r = cholesky(fit_normal, lower=False)
    z = solve_triangular(r, rhs, trans="T")
    kernel, _ = nnls(r, z, maxiter=50 * len(z))
    sq = float(kernel @ normal @ kernel - 2 * kernel @ rhs + yty)
    return kernel, float(np.sqrt(max(sq, 0.0) / yty)) if yty > 0 else 0.0


def fit_region(affine: np.ndarray, display_hw: tuple[int, int], k: int, frame_hw) -> tuple:
    """Frame pixels that can receive light from this tile: the mapped display, grown by the
    kernel's reach (off before, k − 1 − off after)."""
    h, w = display_hw
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    mapped = corners @ affine[:, :2].T + affine[:, 2]
    off = kernel_offset(k)
    x0 = int(np.floor(mapped[:, 0].min())) - off
    x1 = int(np.ceil(mapped[:, 0].max())) + (k - 1 - off)
    y0 = int(np.floor(mapped[:, 1].min())) - off
    y1 = int(np.ceil(mapped[:, 1].max())) + (k - 1 - off)
    y0, x0 = max(y0, 0), max(x0, 0)
    y1, x1 = min(y1, frame_hw[0] - 1), min(x1, frame_hw[1] - 1)
    return y0, x0, y1 - y0 + 1, x1 - x0 + 1


def exclusive_masks(regions: list[tuple[int, int, int, int]], frame_hw) -> np.ndarray:
    """(P, H, W) masks of the pixels only one tile's light reaches: crosstalk-free equations."""
    count = np.zeros(frame_hw, np.int32)
    masks = np.zeros((len(regions), *frame_hw), bool)
    for p, (y, x, h, w) in enumerate(regions):
        masks[p, y : y + h, x : x + w] = True
        count[y : y + h, x : x + w] += 1
    return masks & (count == 1)


def estimate_kernel(
    emitted: np.ndarray,
    frames: np.ndarray,
    affine: np.ndarray,
    k: int,
    region: tuple[int, int, int, int],
    mask: np.ndarray,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """One tile's kernel (C, k, k) from display light (N, C, Hd, Wd) and signal frames (N, H, W)
    (dark and stray light removed) over the masked pixels of `region`."""
    off = kernel_offset(k)
    y0, x0, h, w = region
    lead = k - 1 - off  # pixel t weighs warped light at t + off − j: a window from t + off − k + 1
    warped = warp_to_frame(emitted, affine, (y0 - lead, x0 - lead, h + k - 1, w + k - 1))
    rows = design_rows(warped, k)
    sel = mask[y0 : y0 + h, x0 : x0 + w].ravel()

    def pick(a: np.ndarray) -> np.ndarray:
        return a[:, y0 : y0 + h, x0 : x0 + w].reshape(len(a), -1)[:, sel].ravel()

    keep = np.tile(sel, len(frames))
    wts = None if weights is None else pick(weights)
    kernel, rel = solve_nonnegative(rows[keep], pick(frames), wts)
    return kernel.reshape(emitted.shape[1], k, k), rel


def render_tile(emitted: np.ndarray, affine: np.ndarray, kernel: np.ndarray, frame_hw) -> tuple:
    """Forward model of one tile: (region, signal (N, h, w)) for display light (N, C, Hd, Wd)."""
    k = kernel.shape[-1]
    region = fit_region(affine, emitted.shape[-2:], k, frame_hw)
    off, (y0, x0, h, w) = kernel_offset(k), region
    lead = k - 1 - off
    warped = warp_to_frame(emitted, affine, (y0 - lead, x0 - lead, h + k - 1, w + k - 1))
    out = fftconvolve(warped, kernel[None], mode="valid", axes=(-2, -1)).sum(axis=1)
    return region, out


def render_tiles(emitted: np.ndarray, affines, kernels, frame_hw) -> np.ndarray:
    """Every tile's light overlap-added on the frame: (N, H, W), in the kernels' units."""
    out = np.zeros((len(emitted), *frame_hw))
    for affine, kernel in zip(affines, kernels, strict=True):
        (y, x, h, w), tile = render_tile(emitted, affine, kernel, frame_hw)
        out[:, y : y + h, x : x + w] += tile
    return out


def as_emitted(patterns: np.ndarray, illumination: np.ndarray, channels: int) -> np.ndarray:
    """Binary patterns are display-response free: 0 and 1 map to 0 and 1 by definition."""
    light = patterns[:, None] * illumination
    return np.repeat(light, channels, axis=1) if channels > 1 else light


def illumination_basis(display_hw: tuple[int, int]) -> np.ndarray:
    """Quadratic polynomials over the display, 1 at its centre for the constant term: (6, H, W)."""
    h, w = display_hw
    ys, xs = np.mgrid[:h, :w].astype(np.float64)
    x = (xs - (w - 1) / 2) / max((w - 1) / 2, 1)
    y = (ys - (h - 1) / 2) / max((h - 1) / 2, 1)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y])


def fit_illumination(white, affines, psfs, masks, display_hw, channels) -> np.ndarray:
    """The display's relative illumination (1 at the centre) from a white field, given kernels."""
    basis = illumination_basis(display_hw)
    use = masks.any(axis=0)
    columns = []
    for b in basis:
        light = np.repeat(b[None, None], channels, axis=1)
        columns.append(render_tiles(light, affines, psfs, white.shape)[0][use])
    coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), white[use], rcond=None)
    illumination = np.tensordot(coef / coef[0], basis, axes=1)
    return np.clip(illumination, 1e-3, None)
