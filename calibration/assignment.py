"""Which sub-image is which kernel: the design's grid order, settled by the PSFs themselves.

The sub-images lie on a grid like the design's, but the camera may be turned, the image
inverted or mirrored: the found grid matches the designed one under any of the square's (or
rectangle's) symmetries. Each symmetry that maps found cells onto designed ones is one candidate
assignment; the one whose measured PSFs look most like the designed PSFs it assigns them to
wins, and the margin to the runner-up is its confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (row, col) → (row', col') on a grid of shape (R, C); the transposing ones swap the shape
_SYMMETRIES = {
    "identity": lambda r, c, R, C: (r, c),
    "rot180": lambda r, c, R, C: (R - 1 - r, C - 1 - c),
    "flip_rows": lambda r, c, R, C: (R - 1 - r, c),
    "flip_cols": lambda r, c, R, C: (r, C - 1 - c),
    "transpose": lambda r, c, R, C: (c, r),
    "rot90": lambda r, c, R, C: (C - 1 - c, r),
    "rot270": lambda r, c, R, C: (c, R - 1 - r),
    "anti_transpose": lambda r, c, R, C: (C - 1 - c, R - 1 - r),
}
_TRANSPOSING = {"transpose", "rot90", "rot270", "anti_transpose"}


@dataclass(frozen=True)
class Assignment:
    """`tile_of_region[r]` is the designed tile sub-image r images."""

    tile_of_region: tuple[int, ...]
    symmetry: str
    score: float  # mean PSF similarity of the chosen assignment (1 = identical shapes)
    runner_up: float  # the best other candidate's score (−1 when there is none)

    @property
    def confidence(self) -> float:
        """How far the chosen assignment's PSFs match better than the next candidate's."""
        return float(self.score - max(self.runner_up, -1.0))

    def record(self) -> dict:
        return {
            "symmetry": self.symmetry,
            "psf_similarity": round(self.score, 4),
            "runner_up_similarity": round(self.runner_up, 4),
            "confidence": round(self.confidence, 4),
        }


def grid_cells(centres: np.ndarray) -> tuple[np.ndarray, tuple[int, int], float]:
    """(row, col) of each centre (N, 2) on the grid they lie on, the grid's shape, and its
    rotation in degrees (within ±45°, counter-clockwise as displayed like `sim.fabrication`):
    centres are turned upright, then ranked by gaps."""
    centres = np.asarray(centres, np.float64)
    if len(centres) == 1:
        return np.zeros((1, 2), int), (1, 1), 0.0
    diff = centres[:, None] - centres[None]
    dist = np.hypot(diff[..., 0], diff[..., 1]) + np.eye(len(centres)) * 1e18
    nearest = diff[np.arange(len(centres)), dist.argmin(1)]
    angle = np.arctan2(nearest[:, 1], nearest[:, 0])
    theta = np.angle(np.mean(np.exp(4j * angle))) / 4  # the lattice's turn, modulo 90°
    c, s = np.cos(theta), np.sin(theta)
    upright = centres @ np.array([[c, -s], [s, c]])
    pitch = float(np.median(dist.min(1)))
    cols = _ranks(upright[:, 0], pitch)
    rows = _ranks(upright[:, 1], pitch)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    return np.stack([rows, cols], 1), shape, -float(np.degrees(theta))  # counter-clockwise


def _ranks(values: np.ndarray, pitch: float) -> np.ndarray:
    """Index of each value's cluster along one axis: a new cluster after a gap of half a pitch."""
    order = np.argsort(values)
    rank = np.zeros(len(values), int)
    rank[order] = np.concatenate([[0], np.cumsum(np.diff(values[order]) > pitch / 2)])
    return rank


def psf_similarity(measured: np.ndarray, designed: np.ndarray, reach: int = 2) -> float:
    """Pearson correlation of two PSFs (C, k, k) summed over channels, over their overlap at
    the best shift of up to `reach` px (the registration and the kernel share a translation)."""
    a, b = measured.sum(0), designed.sum(0)
    k = a.shape[-1]
    r = min(reach, k - 2)
    best = -1.0
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            x = a[max(dy, 0) : k + min(dy, 0), max(dx, 0) : k + min(dx, 0)].ravel()
            y = b[max(-dy, 0) : k + min(-dy, 0), max(-dx, 0) : k + min(-dx, 0)].ravel()
            if x.std() > 0 and y.std() > 0:
                best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def assign(
    cells: np.ndarray,
    found_shape: tuple[int, int],
    design_cells: np.ndarray,
    design_shape: tuple[int, int],
    measured: np.ndarray,
    designed: np.ndarray,
) -> Assignment:
    """The assignment of found sub-images (cells (N, 2), PSFs (N, C, k, k)) to designed tiles
    (cells (P, 2), PSFs (P, C, k, k)) under the grid symmetry whose PSFs match best."""
    where = {tuple(int(v) for v in cell): p for p, cell in enumerate(design_cells)}
    candidates = []
    for name, move in _SYMMETRIES.items():
        shape = design_shape[::-1] if name in _TRANSPOSING else design_shape
        if tuple(found_shape) != tuple(shape):
            continue
        # the found cell (r', c') holds the designed cell that the symmetry takes there
        inverse = {move(r, c, *design_shape): p for (r, c), p in where.items()}
        tiles = [inverse.get((int(r), int(c))) for r, c in cells]
        if None in tiles or len(set(tiles)) != len(tiles):
            continue
        score = np.mean([psf_similarity(measured[i], designed[t]) for i, t in enumerate(tiles)])
        candidates.append((float(score), name, tuple(tiles)))
    if not candidates:
        raise ValueError(
            f"the sub-images lie on a {found_shape[0]}×{found_shape[1]} grid, the design's is "
            f"{design_shape[0]}×{design_shape[1]}: no turn or mirror of it matches"
        )
    candidates.sort(key=lambda c: (-c[0], c[1] != "identity"))
    best = candidates[0]
    runner = candidates[1][0] if len(candidates) > 1 else -1.0
    return Assignment(best[2], best[1], best[0], runner)
