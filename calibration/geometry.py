"""Geometry of the tiles: where each sub-optic puts the display, from a grid of single lit dots.

Each lit display pixel appears in every tile as a PSF-shaped spot. The spot's intensity centroid is
the dot's geometric image plus the PSF's own centroid offset, so fitting an affine map to the
centroids gives each tile's display→frame map with that offset included (the two are one
translation and cannot be told apart from dots alone).

Conventions follow `sim.fabrication`: a point is (x, y) = (column, row) in pixels, pixel centres at
integers, rows pointing down; an affine `A` (2, 3) maps display points to frame points as
A @ [x, y, 1].

One dot of the grid is left dark (the parity gap): a square lattice looks the same after a
90° turn or a mirror flip, the gap does not, so the registration cannot silently come out turned
or mirrored.

Spots must not touch: a centroid is only the dot's position if its window holds all of that
spot's light and none of its neighbours'. A dot's spot is as wide as the PSF plus one pixel (a
sub-pixel position spreads a dot over 2×2 pixels), so with a spacing of k + 1 or less the spots of
a single grid tile the frame without a dark pixel between them. Show such a grid as
`DotGrid.split(2)`: four frames, each with every other dot in both directions.

This module holds the grid and the affine maps; `calibration.spots` finds the spots and
`calibration.registration` matches them to the grid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


class GeometryError(ValueError):
    """The dots do not give a trustworthy map; the message says what to check on the bench."""


# The dihedral group of the square as display-space maps about the grid centre (rows point down,
# so "rot90" is counter-clockwise as displayed, like `sim.fabrication`'s positive rotation).
ORIENTATIONS: dict[str, np.ndarray] = {
    "identity": np.array([[1.0, 0.0], [0.0, 1.0]]),
    "rot90": np.array([[0.0, 1.0], [-1.0, 0.0]]),
    "rot180": np.array([[-1.0, 0.0], [0.0, -1.0]]),
    "rot270": np.array([[0.0, -1.0], [1.0, 0.0]]),
    "flip_x": np.array([[-1.0, 0.0], [0.0, 1.0]]),
    "flip_y": np.array([[1.0, 0.0], [0.0, -1.0]]),
    "transpose": np.array([[0.0, 1.0], [1.0, 0.0]]),
    "anti_transpose": np.array([[0.0, -1.0], [-1.0, 0.0]]),
}


@dataclass(frozen=True, eq=False)
class DotGrid:
    """A dot-grid display image and where its lit dots are (display pixels, (x, y))."""

    image: np.ndarray  # (H_d, W_d) float32, 1.0 at the dots
    points: np.ndarray  # (M, 2) float64 (x, y) of the lit dots
    lattice: np.ndarray  # (M, 2) int (row, col) lattice index of each lit dot
    gap_point: tuple[float, float] | None  # (x, y) of the dark dot, None without a gap
    spacing: int

    @property
    def centre(self) -> np.ndarray:
        """Centre (x, y) of the lattice, gap included: the point the orientations turn about."""
        pts = self.points if self.gap_point is None else np.vstack([self.points, self.gap_point])
        return (pts.min(axis=0) + pts.max(axis=0)) / 2

    def split(self, step: int = 2) -> list[np.ndarray]:
        """step² images that together show every dot once, `step`·spacing apart in each.

        For PSFs as wide as the spacing: spots that touch bias every centroid, spots in separate
        frames do not. Find the spots of each frame with min_separation = step·spacing and
        register their union against this grid.
        """
        if step < 1:
            raise ValueError(f"step must be ≥ 1, got {step}")
        images = []
        for a, b in itertools.product(range(step), repeat=2):
            img = np.zeros_like(self.image)
            pick = (self.lattice[:, 0] % step == a) & (self.lattice[:, 1] % step == b)
            xy = self.points[pick].astype(int)
            img[xy[:, 1], xy[:, 0]] = 1.0
            images.append(img)
        return images


def dots_per_axis(size: int, spacing: int, margin: int | None = None) -> int:
    """How many dots `dot_grid` puts along an axis of `size` px at this spacing."""
    margin = (spacing - 1) // 2 if margin is None else margin
    return (size - 1 - 2 * margin) // spacing + 1


def _axis_positions(size: int, spacing: int, margin: int) -> np.ndarray:
    n = dots_per_axis(size, spacing, margin)
    if n < 2:
        raise ValueError(
            f"a display of {size} px holds fewer than 2 dots at spacing {spacing} and margin "
            f"{margin}: use a smaller spacing or margin"
        )
    start = (size - 1 - (n - 1) * spacing) // 2  # centred; ≥ margin by the choice of n
    return start + spacing * np.arange(n)


def dot_grid(
    display_hw: tuple[int, int],
    spacing: int,
    margin: int | None = None,
    gap: tuple[int, int] | None = (0, 1),
) -> DotGrid:
    """Single lit pixels on a square lattice centred on the display, one left dark for parity.

    `margin` is the least distance (px) from the first and last pixel centres to a dot; the
    default (spacing − 1) // 2 lets every dot own a spacing-wide cell inside the display, so a
    display of W px holds W // spacing dots a row. `gap` (row, col) is the dark dot; (0, 1) sits
    where no turn or flip of a lattice of 4 × 4 or more maps it onto itself. None lights every dot
    (no parity: the registration can then only trust the guess's orientation).
    """
    h, w = (int(s) for s in display_hw)
    spacing = int(spacing)
    if spacing < 1:
        raise ValueError(f"spacing must be ≥ 1 px, got {spacing}")
    margin = (spacing - 1) // 2 if margin is None else int(margin)
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0 px, got {margin}")
    ys, xs = _axis_positions(h, spacing, margin), _axis_positions(w, spacing, margin)
    rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    lattice = np.stack([rows.ravel(), cols.ravel()], axis=1)
    gap_point = None
    if gap is not None:
        gr, gc = (int(g) for g in gap)
        if not (0 <= gr < len(ys) and 0 <= gc < len(xs)):
            raise ValueError(f"gap {gap} is outside the {len(ys)} × {len(xs)} lattice")
        gap_point = (float(xs[gc]), float(ys[gr]))
        lattice = lattice[~((lattice[:, 0] == gr) & (lattice[:, 1] == gc))]
    points = np.stack([xs[lattice[:, 1]], ys[lattice[:, 0]]], axis=1).astype(np.float64)
    image = np.zeros((h, w), np.float32)
    image[ys[lattice[:, 0]], xs[lattice[:, 1]]] = 1.0
    return DotGrid(image, points, lattice.astype(int), gap_point, spacing)


def fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares affine (2, 3) with dst ≈ A @ [x, y, 1]; needs 3 points not on one line."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
        raise ValueError(f"src and dst must both be (N, 2), got {src.shape} and {dst.shape}")
    design = np.hstack([src, np.ones((len(src), 1))])
    if weights is not None:
        root = np.sqrt(np.clip(np.asarray(weights, np.float64), 0, None))[:, None]
        design, dst = design * root, dst * root
    coef, _, rank, _ = np.linalg.lstsq(design, dst, rcond=None)
    if rank < 3:
        raise GeometryError(
            f"an affine needs at least 3 points not on one line, got {len(src)} (rank {rank})"
        )
    return coef.T


def apply_affine(A: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 2) mapped by A (2, 3)."""
    A, pts = np.asarray(A, np.float64), np.asarray(points, np.float64)
    return pts @ A[:, :2].T + A[:, 2]


def invert_affine(A: np.ndarray) -> np.ndarray:
    """The affine (2, 3) that undoes A: frame points back to display points."""
    A = np.asarray(A, np.float64)
    inv = np.linalg.inv(A[:, :2])
    return np.hstack([inv, -inv @ A[:, 2:]])


def affine_params(A: np.ndarray) -> dict[str, float]:
    """A as rotation · (scale and shear) + shift, for reports.

    The linear part is R(θ) @ [[scale_x, shear·scale_y], [0, scale_y]] with R(θ) the rotation
    `sim.fabrication` uses (counter-clockwise as displayed); a mirror shows as scale_y < 0. The
    shift is where the display's pixel (0, 0) lands.
    """
    A = np.asarray(A, np.float64)
    m = A[:, :2]
    theta = math.atan2(-m[1, 0], m[0, 0])
    c, s = math.cos(theta), math.sin(theta)
    upper = np.array([[c, -s], [s, c]]) @ m  # R(θ)⁻¹ m, upper triangular
    return {
        "rotation_deg": math.degrees(theta),
        "scale_x": float(upper[0, 0]),
        "scale_y": float(upper[1, 1]),
        "shear": float(upper[0, 1] / upper[1, 1]) if upper[1, 1] else math.inf,
        "shift_x": float(A[0, 2]),
        "shift_y": float(A[1, 2]),
    }


def tile_box(
    A: np.ndarray, display_hw: tuple[int, int], frame_hw: tuple[int, int], pad: int = 0
) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the frame pixels the mapped display touches, padded, clipped to the frame.

    Display pixels span [−0.5, W_d − 0.5] × [−0.5, H_d − 0.5]; a frame pixel i spans
    [i − 0.5, i + 0.5], so the box holds every pixel the mapped rectangle reaches into.
    """
    h, w = display_hw
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    mapped = apply_affine(A, corners)
    eps = 1e-9  # a corner exactly on a pixel edge (the identity map) must not add a pixel
    x0, y0 = np.floor(mapped.min(axis=0) + 0.5 + eps).astype(int) - pad
    x1, y1 = np.ceil(mapped.max(axis=0) - 0.5 - eps).astype(int) + pad
    fh, fw = frame_hw
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, fw - 1), min(y1, fh - 1)
    if x1 < x0 or y1 < y0:
        raise GeometryError(
            f"the mapped display lies outside the {fh} × {fw} frame: check the affine"
        )
    return int(y0), int(x0), int(y1 - y0 + 1), int(x1 - x0 + 1)
