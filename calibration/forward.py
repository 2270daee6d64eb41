"""The frontend's forward model per tile, and the kernel fitted through it.

Tile p records the light E leaving the input grid (display response × illumination, zero
around the grid) as

    F = K ⊛ E  (on the padded input grid, kernel in input pixels, "same" window at `off`),
    signal = vignetting · S F  (S: `calibration.tilemap.area_operator`, sensor pixels of its region)

which is linear in K, so many displayed patterns give a non-negative least-squares problem for
each tile's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.signal import fftconvolve

from calibration.psf import kernel_offset, solve_normal
from calibration.tilemap import PaddedGrid, TileMap, area_operator, sensor_region


@dataclass(frozen=True, eq=False)
class TileModel:
    """One tile's sensor region, its recording operator and its vignetting (per region pixel)."""

    map: TileMap
    region: tuple[int, int, int, int]  # (y0, x0, h, w) on the sensor
    operator: scipy.sparse.csr_matrix  # (h·w, padded grid pixels)
    radial: np.ndarray  # (h·w,) |u − c|²/r² at each pixel centre

    @classmethod
    def build(cls, tile: TileMap, grid: PaddedGrid, frame_hw: tuple[int, int]) -> TileModel:
        region = sensor_region(tile, grid, frame_hw, light_reach(grid.margin))
        y0, x0, h, w = region
        ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        radial = tile.radial(np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64))
        return cls(tile, region, area_operator(tile, grid, region), radial)

    def vignette(self, v: float) -> np.ndarray:
        return np.clip(1 - v * self.radial, 0.0, None)

    def window(self, frames: np.ndarray) -> np.ndarray:
        """Frames (N, H, W) → (N, h·w) of this tile's region."""
        y0, x0, h, w = self.region
        return frames[:, y0 : y0 + h, x0 : x0 + w].reshape(len(frames), -1)


def margin_for(kernel_size: int) -> int:
    """Padding of the input grid that holds all the light a kernel spreads beyond it (k // 2),
    plus room for the misalignment the design's centroid convention moves it by."""
    return kernel_size // 2 + 3


def light_reach(margin: int) -> int:
    """Input px beyond the grid that a tile's light can reach: the kernel's spread plus one."""
    return margin - 2


def convolve(emitted: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """F (N, Hp, Wp) = Σ_c K[c] ⊛ E[:, c] in the design's "same" window."""
    k = kernel.shape[-1]
    off = kernel_offset(k)
    full = fftconvolve(emitted, kernel[None], mode="full", axes=(-2, -1)).sum(axis=1)
    hp, wp = emitted.shape[-2:]
    return full[:, off : off + hp, off : off + wp]


def render(model: TileModel, emitted: np.ndarray, kernel: np.ndarray, v: float) -> np.ndarray:
    """The tile's signal (N, h·w) for padded-grid light (N, C, Hp, Wp)."""
    maps = convolve(emitted, kernel).reshape(len(emitted), -1)
    return (model.operator @ maps.T).T * model.vignette(v)


def render_all(models, emitted, kernels, vignetting, frame_hw) -> np.ndarray:
    """Every tile's light overlap-added on the frame: (N, H, W)."""
    out = np.zeros((len(emitted), *frame_hw))
    for model, kernel, v in zip(models, kernels, vignetting, strict=True):
        y0, x0, h, w = model.region
        out[:, y0 : y0 + h, x0 : x0 + w] += render(model, emitted, kernel, v).reshape(-1, h, w)
    return out


def shifted_taps(emitted: np.ndarray, k: int) -> np.ndarray:
    """(N, Hp·Wp, C·k²): E moved so that tap (c, a, b) reads E[y + off − a, x + off − b].
    The same for every tile of a frame: `estimate_kernel` takes it made once."""
    n, c, hp, wp = emitted.shape
    off = kernel_offset(k)
    big = np.pad(emitted, ((0, 0), (0, 0), (k, k), (k, k)))
    out = np.empty((n, hp, wp, c, k, k))
    for a in range(k):
        for b in range(k):
            dy, dx = k + off - a, k + off - b
            out[..., a, b] = big[:, :, dy : dy + hp, dx : dx + wp].transpose(0, 2, 3, 1)
    return out.reshape(n, hp * wp, c * k * k)


def estimate_kernel(
    model: TileModel,
    emitted: np.ndarray,
    signal: np.ndarray,
    k: int,
    mask: np.ndarray,
    v: float = 0.0,
    taps: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The tile's kernel (C, k, k) from padded-grid light (N, C, Hp, Wp) and its region's
    signal (N, h·w), over the region pixels `mask` (h·w,) that only this tile reaches;
    `taps`: `shifted_taps(emitted, k)`, when the caller fits many tiles to the same light.

    The normal equations are formed on the padded grid: with Q = Sᵀ W S (W the mask times the
    vignetting squared) AᵀA = Σ_n T_nᵀ Q T_n for each pattern's shifted copies T_n, far smaller
    than the rows of every sensor pixel of every pattern.
    """
    taps = shifted_taps(emitted, k) if taps is None else taps  # (N, n_pad, T)
    n, n_pad, t = taps.shape
    vig = model.vignette(v) * mask
    op = model.operator
    q = (op.T @ scipy.sparse.diags(vig * vig) @ op).tocsr()
    q_taps = (q @ taps.transpose(1, 0, 2).reshape(n_pad, n * t)).reshape(n_pad, n, t)
    flat = taps.reshape(n * n_pad, t)
    normal = flat.T @ q_taps.transpose(1, 0, 2).reshape(n * n_pad, t)
    z = op.T @ (signal * vig).T  # (n_pad, N)
    rhs = np.einsum("nit,in->t", taps, z)
    yty = float(np.sum((signal * mask) ** 2))
    kernel, rel = solve_normal(normal, rhs, yty)
    return kernel.reshape(emitted.shape[1], k, k), rel


def exclusive_masks(models: list[TileModel], frame_hw: tuple[int, int]) -> list[np.ndarray]:
    """Per tile, its region's pixels (h·w,) that no other tile's light reaches."""
    count = np.zeros(frame_hw, np.int32)
    for m in models:
        y0, x0, h, w = m.region
        count[y0 : y0 + h, x0 : x0 + w] += 1
    return [m.window(count[None])[0] == 1 for m in models]
