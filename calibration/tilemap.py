"""Where one sub-optic puts the input grid on the sensor, and the light it carries there.

A tile's map takes input-grid points (x, y) to sensor points: an affine map A (scale, rotation,
inversion, shear, shift) to the undistorted point u, then radial distortion about the sub-image's
centre c, d = c + (u − c)·(1 + k1·|u − c|²/r²), with r the half-diagonal of the mapped grid, so
k1 is the relative displacement at the sub-image's corner.

The sensor records each feature map F (light per input pixel, on the input grid padded by a
margin) as its bilinear interpolant pushed through the map with light conserved and integrated
over every sensor pixel's square. `area_operator` is that recording as one sparse matrix, written
by hand because it is the forward model itself: no library resamples with area integration
through an arbitrary nonlinear map. Calibration fits kernels through it, the forward model
predicts frames with it and capture inverts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.optimize import least_squares


@dataclass(frozen=True, eq=False)
class TileMap:
    """Input-grid (x, y) → sensor (x, y) of one tile: affine (2, 3), then radial distortion."""

    affine: np.ndarray
    k1: float
    centre: np.ndarray  # (x, y) on the sensor the distortion is radial about
    radius: float  # sensor px at which the distortion's relative displacement is k1

    @classmethod
    def from_affine(cls, affine: np.ndarray, input_hw: tuple[int, int], k1: float = 0.0):
        """Distortion about the image of the grid's centre, r the mapped half-diagonal."""
        affine = np.asarray(affine, np.float64)
        h, w = input_hw
        centre = affine @ np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
        return cls(affine, float(k1), centre, scale_of(affine) * math.hypot(w, h) / 2)

    def with_affine(self, affine: np.ndarray) -> TileMap:
        """The same distortion (centre and radius stay on the sensor) after another affine."""
        return TileMap(np.asarray(affine, np.float64), self.k1, self.centre, self.radius)

    def undistorted(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, np.float64)
        return xy @ self.affine[:, :2].T + self.affine[:, 2]

    def distort(self, u: np.ndarray) -> np.ndarray:
        q = u - self.centre
        return self.centre + q * (1 + self.k1 * np.sum(q * q, -1, keepdims=True) / self.radius**2)

    def to_sensor(self, xy: np.ndarray) -> np.ndarray:
        """Sensor points (N, 2) of input-grid points (N, 2)."""
        return self.distort(self.undistorted(xy))

    def undistort(self, d: np.ndarray) -> np.ndarray:
        """Inverse of `distort`: the radius ρ solving ρ(1 + k1ρ²/r²) = |d − c| by Newton (from
        ρ = |d − c|, quadratic convergence: a few steps unless the distortion is extreme)."""
        q = np.asarray(d, np.float64) - self.centre
        rho_d = np.hypot(q[..., 0], q[..., 1])
        if self.k1 == 0:
            return d
        a = self.k1 / self.radius**2
        rho = rho_d.copy()
        for _ in range(8):
            step = (rho + a * rho**3 - rho_d) / (1 + 3 * a * rho**2)
            rho -= step
            if float(np.max(np.abs(step), initial=0.0)) <= 1e-12 * (1 + self.radius):
                break
        ratio = np.divide(rho, rho_d, out=np.ones_like(rho), where=rho_d > 0)
        return self.centre + q * ratio[..., None]

    def to_input(self, d: np.ndarray) -> np.ndarray:
        """Input-grid points of sensor points: undistort, then undo the affine."""
        return self.input_of_undistorted(self.undistort(d))

    def input_of_undistorted(self, u: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine[:, :2])
        return (u - self.affine[:, 2]) @ inv.T

    def sensor_per_input(self, d: np.ndarray) -> np.ndarray:
        """|det ∂d/∂x| at sensor points: sensor area per input-grid area (light conservation)."""
        return self.sensor_per_input_undistorted(self.undistort(d))

    def sensor_per_input_undistorted(self, u: np.ndarray) -> np.ndarray:
        rho2 = np.sum((u - self.centre) ** 2, -1) / self.radius**2
        f = 1 + self.k1 * rho2
        return abs(np.linalg.det(self.affine[:, :2])) * f * (f + 2 * self.k1 * rho2)

    def radial(self, d: np.ndarray) -> np.ndarray:
        """|u − c|²/r² at sensor points: 1 at the sub-image's corner (for vignetting)."""
        return np.sum((self.undistort(d) - self.centre) ** 2, -1) / self.radius**2


def scale_of(affine: np.ndarray) -> float:
    """Sensor px per input px: the square root of the linear part's area ratio."""
    return math.sqrt(abs(np.linalg.det(np.asarray(affine, np.float64)[:, :2])))


@dataclass(frozen=True)
class PaddedGrid:
    """The input grid (h, w) grown by `margin` input px on every side: where feature maps live
    (light the kernel spreads beyond the grid still reaches the sensor)."""

    h: int
    w: int
    margin: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.h + 2 * self.margin, self.w + 2 * self.margin

    def pad(self, images: np.ndarray) -> np.ndarray:
        """Input-grid images (..., h, w) → (..., h + 2m, w + 2m), zeros around."""
        m = self.margin
        return np.pad(images, [(0, 0)] * (images.ndim - 2) + [(m, m), (m, m)])

    def crop(self, maps: np.ndarray) -> np.ndarray:
        m = self.margin
        return maps[..., m : m + self.h, m : m + self.w]


def sensor_region(
    tile: TileMap, grid: PaddedGrid, frame_hw: tuple[int, int], reach: int | None = None
) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the sensor pixels that light within `reach` input px of the grid
    (default: the whole padded grid) can reach, clipped to the frame."""
    m = grid.margin if reach is None else reach
    lo, (hi_x, hi_y) = -m - 1.0, (grid.w + m, grid.h + m)  # where the interpolant reaches zero
    t = np.linspace(0, 1, 33)
    xs, ys = lo + t * (hi_x - lo), lo + t * (hi_y - lo)
    edge = np.concatenate(
        [
            np.stack([xs, np.full_like(xs, lo)], 1),
            np.stack([xs, np.full_like(xs, hi_y)], 1),
            np.stack([np.full_like(ys, lo), ys], 1),
            np.stack([np.full_like(ys, hi_x), ys], 1),
        ]
    )
    pts = tile.to_sensor(edge)
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int)
    fh, fw = frame_hw
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, fw - 1), min(y1, fh - 1)
    return int(y0), int(x0), max(int(y1 - y0 + 1), 0), max(int(x1 - x0 + 1), 0)


def subsamples_per_axis(tile: TileMap) -> int:
    """Enough sub-samples that each input pixel spans at least four of them along each axis;
    even, so that at magnification 1 the bilinear interpolant's kinks fall between sub-samples
    and the integration is exact."""
    n = math.ceil(4 / max(scale_of(tile.affine), 1e-6))
    return int(np.clip(n + n % 2, 4, 32))


def area_operator(
    tile: TileMap, grid: PaddedGrid, region: tuple[int, int, int, int], n: int | None = None
) -> scipy.sparse.csr_matrix:
    """(region pixels, padded-grid pixels): the sensor signal of a region for a feature map.

    Each sensor pixel is split into n × n sub-samples; each carries its share of the pixel's
    area times the input area it sees (1 / sensor_per_input) and reads the bilinear interpolant
    of F at its input-grid point (zero outside the padded grid).
    """
    n = subsamples_per_axis(tile) if n is None else n
    y0, x0, h, w = region
    hp, wp = grid.shape
    offs = (np.arange(n) + 0.5) / n - 0.5
    ys = (np.arange(y0, y0 + h)[:, None] + offs[None, :]).ravel()
    xs = (np.arange(x0, x0 + w)[:, None] + offs[None, :]).ravel()
    yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (h·n, w·n)
    d = np.stack([xx.ravel(), yy.ravel()], axis=1)
    u = tile.undistort(d)  # once for both: the Newton solve is most of the operator's cost
    weight = 1.0 / (n * n * tile.sensor_per_input_undistorted(u))
    src = tile.input_of_undistorted(u) + grid.margin  # padded-grid pixel coordinates
    rows = (np.arange(h).repeat(n)[:, None] * w + np.arange(w).repeat(n)[None, :]).ravel()
    cols, vals, keep = _bilinear(src, (hp, wp), weight)
    return scipy.sparse.csr_matrix(
        (vals[keep], (np.tile(rows, 4)[keep], cols[keep])), shape=(h * w, hp * wp)
    )


def _bilinear(src: np.ndarray, shape: tuple[int, int], weight: np.ndarray):
    """Column indices, values and validity of the 4 bilinear taps per point (zero outside)."""
    hp, wp = shape
    fx, fy = np.floor(src[:, 0]), np.floor(src[:, 1])
    ax, ay = src[:, 0] - fx, src[:, 1] - fy
    fx, fy = fx.astype(np.int64), fy.astype(np.int64)
    cols, vals, keep = [], [], []
    taps = (
        (0, 0, (1 - ay) * (1 - ax)),
        (0, 1, (1 - ay) * ax),
        (1, 0, ay * (1 - ax)),
        (1, 1, ay * ax),
    )
    for dy, dx, v in taps:
        yy, xx = fy + dy, fx + dx
        ok = (yy >= 0) & (yy < hp) & (xx >= 0) & (xx < wp)
        cols.append(np.where(ok, yy * wp + xx, 0))
        vals.append(v * weight)
        keep.append(ok & (v > 0))
    return np.concatenate(cols), np.concatenate(vals), np.concatenate(keep)


def fit_tilemap(
    src: np.ndarray, dst: np.ndarray, affine: np.ndarray, input_hw: tuple[int, int]
) -> tuple[TileMap, np.ndarray]:
    """The affine and k1 that take input-grid points `src` (N, 2) closest to sensor points `dst`,
    starting from `affine`; (map, residual length per point). Distortion needs more points
    than its 7 parameters, else the affine alone is kept."""

    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)

    def tile(p: np.ndarray) -> TileMap:
        return TileMap.from_affine(p[:6].reshape(2, 3), input_hw, p[6] if len(p) > 6 else 0.0)

    def residual(p: np.ndarray) -> np.ndarray:
        return (tile(p).to_sensor(src) - dst).ravel()

    p0 = np.asarray(affine, np.float64).ravel()
    if len(src) >= 8:
        p0 = np.append(p0, 0.0)
    fit = least_squares(residual, p0, method="lm", x_scale="jac")
    best = tile(fit.x)
    return best, np.hypot(*(best.to_sensor(src) - dst).T)
