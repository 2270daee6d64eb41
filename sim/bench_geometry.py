"""Where each sub-optic images its feature map on the sensor, and the renderer that puts it there.

A real bench looks nothing like its packed design on the sensor: the glass magnifies (possibly
inverted), the sub-images sit in a rotated, jittered grid, barrel or pincushion distortion bends
them and vignetting darkens their corners. Conventions (the shared bench-geometry spec): a point
is (x, y) = (column, row), pixel centres at integers, rows down; R(θ) takes (x, y) to
(cos θ·x + sin θ·y, −sin θ·x + cos θ·y), counter-clockwise as displayed. For sub-optic p:

    u = c_p + M·(x − c_in),   M = (magnification·s)·R(θ),   c_in = ((w − 1)/2, (h − 1)/2)
    d = c_p + (u − c_p)·(1 + k1·|u − c_p|²/r²),   r = |magnification·s|·√(w² + h²)/2
    irradiance at u × (1 − v·|u − c_p|²/r²)

with x an input-grid point, u its undistorted and d its (distorted) sensor point. The frame is
F̃ (the bilinear interpolant of F, zero beyond the padded grid) pushed through x ↦ d with light
conserved and integrated over each sensor pixel; it is linear in F, so it is built once as a
sparse matrix and each frame is one sparse product.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from sim.layout import TileLayout
from sim.params import OpticsParams

JITTER_SALT = 0x6A09E667  # fixed, arbitrary stream ids: the jitter and the hot pixels never
HOT_PIXEL_SALT = 0xBB67AE85  # replay the fabrication's δ draws (nor each other's)
_CHUNK = 1 << 20  # sub-samples per vectorised block while building the matrix


def rotation(theta_deg: float) -> np.ndarray:
    """R(θ) as a 2×2 matrix acting on column vectors (x, y)."""
    t = math.radians(theta_deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, s], [-s, c]])


def seeded_rng(seed: int, salt: int) -> np.random.Generator:
    """A generator of its own stream for one kind of draw from the fabrication seed."""
    return np.random.default_rng([seed % 2**63, salt])


class BenchGeometry:
    """The tile grid of one bench: centres, the common linear part, distortion, vignetting.

    `layout` is the design's packed grid: its tile size is the input grid (h, w), its columns,
    gap and order say where sub-optic p sits (row p // cols, column p % cols).
    """

    def __init__(
        self,
        optics: OpticsParams,
        layout: TileLayout,
        display_scale: int = 1,
        sensor_hw: tuple[int | None, int | None] = (None, None),
        seed: int = 0,
        misalignment: tuple[tuple[float, float], float] = ((0.0, 0.0), 0.0),
    ) -> None:
        self.optics, self.layout = optics, layout
        (dx, dy), turn = misalignment
        self.misalign_shift, self.misalign_rotation = np.array([dx, dy], float), rotation(turn)
        h, w = self.grid_hw = (layout.tile_h, layout.tile_w)
        self.scale = optics.magnification * display_scale  # sensor px per input px, signed
        self.matrix = self.scale * rotation(optics.grid_rotation_deg)
        a, g = abs(self.scale), layout.gap_px
        px, py = optics.tile_pitch_px or (w * a + g, h * a + g)
        self.pitch_px = (float(px), float(py))
        sh, sw = sensor_hw
        self.frame_shape = (
            int(sh) if sh is not None else _ceil(g + layout.rows * py),
            int(sw) if sw is not None else _ceil(g + layout.cols * px),
        )
        fh, fw = self.frame_shape
        self.grid_center_px = np.array(optics.grid_center_px or ((fw - 1) / 2, (fh - 1) / 2))
        self.input_center = np.array([(w - 1) / 2, (h - 1) / 2])
        self.radius_px = a * math.hypot(w, h) / 2
        self.centres = self._centres(seed)

    def _centres(self, seed: int) -> np.ndarray:
        """(P, 2) tile centres: the rotated pitch grid about the grid centre, plus jitter."""
        lay, (px, py) = self.layout, self.pitch_px
        p = np.arange(lay.n_tiles)
        grid = np.stack(
            [px * (p % lay.cols - (lay.cols - 1) / 2), py * (p // lay.cols - (lay.rows - 1) / 2)],
            axis=1,
        )
        jitter = seeded_rng(seed, JITTER_SALT).normal(0.0, 1.0, (lay.n_tiles, 2))
        rot = rotation(self.optics.grid_rotation_deg)
        return self.grid_center_px + grid @ rot.T + self.optics.tile_jitter_px * jitter

    @property
    def n_tiles(self) -> int:
        return self.layout.n_tiles

    def centre_px(self, p: int) -> np.ndarray:
        """(x, y) sensor point of tile p's centre c_p: where the input grid's centre lands."""
        return self.centres[p].copy()

    # -- the map x (input grid) → u (undistorted) → d (sensor) and back ----------------------

    def misaligned(self, xy) -> np.ndarray:
        """W(x): where the image of input-grid point x sits on the sub-optics, after the
        fabrication's misalignment (`shift_px`, `rotation_deg` about the grid's centre, in
        input px; `sim.fabrication.warp_points`' convention)."""
        c = self.input_center
        xy = np.asarray(xy, dtype=np.float64)
        return c + (xy - c) @ self.misalign_rotation.T + self.misalign_shift

    def aligned(self, xy) -> np.ndarray:
        """W⁻¹: the input-grid point whose image sits at x."""
        c = self.input_center
        return c + (np.asarray(xy, np.float64) - self.misalign_shift - c) @ self.misalign_rotation

    def undistorted(self, p: int, xy) -> np.ndarray:
        """u = c_p + M·(W(x) − c_in) of input-grid points (..., 2)."""
        return self.centres[p] + (self.misaligned(xy) - self.input_center) @ self.matrix.T

    def distort(self, p: int, u) -> np.ndarray:
        """d = c_p + (u − c_p)·(1 + k1·|u − c_p|²/r²) of undistorted sensor points (..., 2)."""
        e = np.asarray(u, dtype=np.float64) - self.centres[p]
        q = np.sum(e**2, axis=-1, keepdims=True) / self.radius_px**2
        return self.centres[p] + e * (1 + self.optics.distortion_k1 * q)

    def to_sensor(self, p: int, xy) -> np.ndarray:
        """Sensor points (..., 2) of input-grid points (..., 2) through sub-optic p."""
        return self.distort(p, self.undistorted(p, xy))

    def undistort(self, p: int, d) -> tuple[np.ndarray, np.ndarray]:
        """Undistorted points u (..., 2) of sensor points d, and where d has a preimage.

        With k1 < 0 the radial map ρ ↦ ρ(1 + k1ρ²/r²) turns back at ρ* = r/√(3|k1|); only the
        inner branch is imaged (light from beyond ρ* is lost), so d beyond its image has none.
        """
        e = np.asarray(d, dtype=np.float64) - self.centres[p]
        rho_d = np.hypot(e[..., 0], e[..., 1])
        rho_u, valid = _undistort_radius(rho_d, self.optics.distortion_k1, self.radius_px)
        ratio = np.divide(rho_u, rho_d, out=np.ones_like(rho_d), where=rho_d > 0)
        return self.centres[p] + e * ratio[..., None], valid

    def from_sensor(self, p: int, d) -> np.ndarray:
        """Input-grid points (..., 2) that sub-optic p images at sensor points d (NaN: none)."""
        u, valid = self.undistort(p, d)
        x = self.aligned(self.input_center + (u - self.centres[p]) @ np.linalg.inv(self.matrix).T)
        return np.where(valid[..., None], x, np.nan)

    def vignetting(self, p: int, u) -> np.ndarray:
        """Relative irradiance 1 − v·|u − c_p|²/r² (≥ 0) at undistorted points u (..., 2)."""
        q = np.sum((np.asarray(u, np.float64) - self.centres[p]) ** 2, axis=-1) / self.radius_px**2
        return np.clip(1 - self.optics.tile_vignetting * q, 0.0, None)

    def sensor_per_input_area(self, p: int, u) -> np.ndarray:
        """|det ∂d/∂x| at undistorted points u: sensor area per input-grid area."""
        q = np.sum((np.asarray(u, np.float64) - self.centres[p]) ** 2, axis=-1) / self.radius_px**2
        k = self.optics.distortion_k1
        return self.scale**2 * (1 + 3 * k * q) * (1 + k * q)

    # -- the renderer ----------------------------------------------------------------------

    @property
    def subsamples(self) -> int:
        """Sub-samples per sensor pixel side: an input pixel spans ≥ 4 of them, and an even
        count puts a sub-sample edge on each pixel centre (exact at magnification 1)."""
        n = max(2, math.ceil(4 / abs(self.scale) - 1e-9))
        return n + n % 2

    def render_matrix(self, margin: int) -> sp.csr_matrix:
        """(H·W, P·Hp·Wp) CSR: sensor pixels ← feature maps F (P, Hp, Wp) on the input grid
        padded by `margin`, as light per input pixel; each entry integrates F̃'s bilinear weight
        × vignetting / |det ∂d/∂x| over a sensor pixel by the midpoint rule on sub-samples."""
        fh, fw = self.frame_shape
        padded = (self.grid_hw[0] + 2 * margin, self.grid_hw[1] + 2 * margin)
        shape = (fh * fw, self.n_tiles * padded[0] * padded[1])
        parts = []
        for p in range(self.n_tiles):  # each tile's duplicates summed before the next is built
            rows, cols, vals = self._tile_entries(p, margin)
            parts.append(sp.coo_matrix((vals, (rows, cols)), shape=shape).tocsr().tocoo())
        rows, cols = np.concatenate([c.row for c in parts]), np.concatenate([c.col for c in parts])
        vals = np.concatenate([c.data for c in parts])
        total = sp.csr_matrix((vals, (rows, cols)), shape=shape)
        total.eliminate_zeros()
        return total.astype(np.float32)

    def _footprint(self, p: int, margin: int) -> tuple[int, int, int, int] | None:
        """Sensor rows y0..y1, columns x0..x1 (inclusive) that tile p's padded grid can reach."""
        h, w = self.grid_hw
        lo, hi = (-margin - 1.0, -margin - 1.0), (w + margin, h + margin)
        t = np.linspace(0.0, 1.0, 257)
        edges = [
            np.stack([lo[0] + (hi[0] - lo[0]) * t, np.full_like(t, y)], 1) for y in (lo[1], hi[1])
        ] + [np.stack([np.full_like(t, x), lo[1] + (hi[1] - lo[1]) * t], 1) for x in (lo[0], hi[0])]
        u = self.undistorted(p, np.concatenate(edges))
        k, c = self.optics.distortion_k1, self.centres[p]
        pts = self.distort(p, u)
        if k < 0:  # beyond the turning radius: the image stays within its circle
            rho_star = self.radius_px / math.sqrt(3 * -k)
            far = np.hypot(*(u - c).T) > rho_star
            circle = c + (2 / 3) * rho_star * np.array([[-1, -1], [1, 1]])
            pts = np.concatenate([pts[~far], circle]) if far.any() else pts
        (x0, y0), (x1, y1) = np.floor(pts.min(0)) - 2, np.ceil(pts.max(0)) + 2
        fh, fw = self.frame_shape
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(int(x1), fw - 1), min(int(y1), fh - 1)
        return None if x0 > x1 or y0 > y1 else (y0, y1, x0, x1)

    def _tile_entries(self, p: int, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """COO (sensor pixel, feature-map element, weight) of tile p, duplicates not yet summed."""
        box = self._footprint(p, margin)
        if box is None:
            return (np.zeros(0, np.int64),) * 2 + (np.zeros(0),)
        y0, y1, x0, x1 = box
        n = self.subsamples
        sub = (np.arange(n) + 0.5) / n - 0.5
        sx = (np.arange(x0, x1 + 1)[:, None] + sub).ravel()
        per_row = max(1, _CHUNK // sx.size)
        out = []
        for start in range(y0, y1 + 1, per_row):
            ys = np.arange(start, min(start + per_row, y1 + 1))
            sy = (ys[:, None] + sub).ravel()
            pts = np.stack(np.broadcast_arrays(sx[None, :], sy[:, None]), -1).reshape(-1, 2)
            out.append(self._subsample_entries(p, margin, pts))
        rows, cols, vals = (np.concatenate(a) for a in zip(*out, strict=True))
        return rows, cols, vals / n**2

    def _subsample_entries(self, p: int, margin: int, pts: np.ndarray):
        """Bilinear weights × vignetting / |det| of sub-sample points (N, 2) on the padded grid."""
        (h, w), fw = self.grid_hw, self.frame_shape[1]
        hp, wp = h + 2 * margin, w + 2 * margin
        u, valid = self.undistort(p, pts)
        x = self.aligned(self.input_center + (u - self.centres[p]) @ np.linalg.inv(self.matrix).T)
        x = x + margin
        inside = valid & (x[:, 0] > -1) & (x[:, 0] < wp) & (x[:, 1] > -1) & (x[:, 1] < hp)
        pts, u, x = pts[inside], u[inside], x[inside]
        light = self.vignetting(p, u) / self.sensor_per_input_area(p, u)
        pixel = np.rint(pts[:, 1]).astype(np.int64) * fw + np.rint(pts[:, 0]).astype(np.int64)
        j0, i0 = np.floor(x[:, 0]).astype(np.int64), np.floor(x[:, 1]).astype(np.int64)
        fx, fy = x[:, 0] - j0, x[:, 1] - i0
        rows, cols, vals = [], [], []
        for di, dj, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                            (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):  # fmt: skip
            ii, jj = i0 + di, j0 + dj
            ok = (ii >= 0) & (ii < hp) & (jj >= 0) & (jj < wp) & (wgt > 0)
            rows.append(pixel[ok])
            cols.append(p * hp * wp + ii[ok] * wp + jj[ok])
            vals.append((wgt * light)[ok])
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def _ceil(value: float) -> int:
    """Round up, forgiving the last bit of a sum that is an integer on paper."""
    return math.ceil(value - 1e-9)


def _undistort_radius(rho_d: np.ndarray, k: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """ρ with ρ(1 + kρ²/r²) = ρ_d by Newton's method (monotone from ρ_d: the map is convex for
    k > 0, concave for k < 0), on the inner branch; and where such a ρ exists."""
    if k == 0:
        return rho_d.copy(), np.ones(rho_d.shape, bool)
    valid = np.ones(rho_d.shape, bool)
    if k < 0:
        rho_star = r / math.sqrt(-3 * k)
        valid = rho_d < (2 / 3) * rho_star
        rho_d = np.where(valid, rho_d, 0.0)
    rho = rho_d.copy()
    for _ in range(100):
        q = k * rho**2 / r**2
        step = (rho * (1 + q) - rho_d) / (1 + 3 * q)
        rho -= step
        if not step.size or np.abs(step).max() < 1e-12 * r:
            break
    return rho, valid
