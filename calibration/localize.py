"""Registering a found sub-image: its dot-grid spots → an affine map plus radial distortion.

Nothing about where the sub-image should be is assumed: its scale comes from the spacing of its
own spots, its turn (modulo 90°) from the directions between them, its centre from their mean;
`register_tile` then tries every turn and mirror of that guess and the grid's parity gap picks
the one that is right, and `fit_tilemap` adds the distortion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from calibration.discovery import SubImage
from calibration.geometry import ORIENTATIONS, DotGrid, GeometryError
from calibration.registration import register_tile
from calibration.spots import find_spots
from calibration.tilemap import TileMap, fit_tilemap


@dataclass(frozen=True, eq=False)
class Registered:
    """One sub-image's map and the dots it was fitted to (input-grid points, sensor spots)."""

    map: TileMap
    points: np.ndarray  # (M, 2) input-grid (x, y) the map takes to the spots: dot + PSF lead
    spots: np.ndarray  # (M, 2) sensor (x, y) of their spots
    residual_px: np.ndarray  # (M,) sensor px
    orientation: str

    @property
    def rms_px(self) -> float:
        return float(np.sqrt(np.mean(self.residual_px**2)))

    def record(self) -> dict:
        """Where each dot's spot is on the sensor and how far the map misses it (px)."""
        miss = self.spots - self.map.to_sensor(self.points)
        return {"spots_px": np.round(self.spots, 3).tolist(), "miss_px": np.round(miss, 4).tolist()}

    def refit(self, lead: np.ndarray, input_hw: tuple[int, int]) -> Registered:
        """The map with the PSF's centroid `lead` (input px) taken out of the translation: the
        spots sit at the dots' images plus the PSF's centroid, and the kernel keeps the latter."""
        shifted = self.points + lead
        tile, err = fit_tilemap(shifted, self.spots, self.map.affine, input_hw)
        return Registered(tile, shifted, self.spots, err, self.orientation)


def spot_region(sub: SubImage, scale: float, reach_px: float, frame_hw) -> tuple:
    """The sub-image's box grown by `reach_px` input px (at `scale`), clipped to the frame."""
    pad = math.ceil(reach_px * scale) + 2
    y0, x0, h, w = sub.box
    y1, x1 = min(y0 + h + pad, frame_hw[0]), min(x0 + w + pad, frame_hw[1])
    y0, x0 = max(y0 - pad, 0), max(x0 - pad, 0)
    return y0, x0, y1 - y0, x1 - x0


def region_spots(
    frames: np.ndarray, region, separation_px: float, window: int, centres: np.ndarray, own: int
) -> list[np.ndarray]:
    """Spots (K, 2) in frame coordinates of each split-grid frame, within `region`, searched
    only where sub-image `own` is the nearest of `centres` (N, 2): a neighbour's dots reach
    into the region, and a bright neighbour's would set the threshold for a dim one's."""
    y0, x0, h, w = region
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    d2 = (xs[..., None] - centres[:, 0]) ** 2 + (ys[..., None] - centres[:, 1]) ** 2
    foreign = np.argmin(d2, axis=-1) != own
    out = []
    for f in frames:
        crop = f[y0 : y0 + h, x0 : x0 + w].copy()
        crop[foreign] = np.median(crop[~foreign])
        out.append(find_spots(crop, separation_px, window=window) + [x0, y0])
    return out


def guess_affine(grid: DotGrid, per_frame: list[np.ndarray], spacing_in_frame: float):
    """Input → sensor guess from the spots alone: scale from their nearest-neighbour distance
    (dots of one split frame are `spacing_in_frame` input px apart), turn modulo 90° from the
    directions to those neighbours, translation putting the grid's mean dot on the spots' mean."""
    vectors = []
    for spots in per_frame:
        if len(spots) >= 2:
            dist, idx = cKDTree(spots).query(spots, k=2)
            vectors.append(spots[idx[:, 1]] - spots)
    if not vectors:
        raise GeometryError("fewer than 2 spots per frame: the dots are too dim or off the sensor")
    v = np.vstack(vectors)
    scale = float(np.median(np.hypot(v[:, 0], v[:, 1]))) / spacing_in_frame
    observed = np.angle(np.mean(np.exp(4j * np.arctan2(v[:, 1], v[:, 0])))) / 4
    c, s = math.cos(-observed), math.sin(-observed)  # sim's convention: R(θ) (1, 0) = (c, −s)
    linear = scale * np.array([[c, s], [-s, c]])
    spots = np.vstack(per_frame)
    shift = spots.mean(axis=0) - linear @ grid.points.mean(axis=0)
    return np.hstack([linear, shift[:, None]]), scale


def _closest_orientation(guess: np.ndarray, grid: DotGrid, prefer: np.ndarray) -> str:
    """The turn or mirror of the guess whose linear part is nearest `prefer` (both unit scale)."""
    unit = guess[:, :2] / np.sqrt(abs(np.linalg.det(guess[:, :2])))
    target = prefer / np.sqrt(abs(np.linalg.det(prefer)))
    return min(ORIENTATIONS, key=lambda n: float(np.linalg.norm(unit @ ORIENTATIONS[n] - target)))


def register_region(
    grid: DotGrid,
    frames: np.ndarray,
    region,
    scale: float,
    psf_reach: float,
    centres: np.ndarray,
    own: int,
    prefer: np.ndarray | None = None,
) -> Registered:
    """Register sub-image `own` (of those centred at `centres` (N, 2)) from its split-grid
    frames (dark removed); GeometryError if it cannot be trusted. Spots' centroid windows hold
    the light `psf_reach` input px around a spot's centroid at this scale (a cut spot's centroid
    is biased), and no more: in a tightly packed layout a neighbouring
    sub-image's dot can be nearer than two spacings. `prefer` (2, 2), a linear part the
    sub-image's map should resemble (its neighbours': one optic turns or mirrors all its
    sub-images alike), settles an orientation the parity gap cannot (its dots lost at an edge)."""
    separation = max(0.9 * 2 * grid.spacing * scale, 2.0)
    window = 2 * math.ceil(psf_reach * scale + 1) + 1
    input_hw = (grid.image.shape[0], grid.image.shape[1])
    per_frame = region_spots(frames, region, separation, window, centres, own)
    guess, scale = guess_affine(grid, per_frame, 2 * grid.spacing)
    spots = np.vstack(per_frame)
    spacing_px = grid.spacing * scale
    reg = register_tile(
        grid,
        spots,
        guess,
        orientations=None if prefer is None else (_closest_orientation(guess, grid, prefer),),
        region=(region, window / 2 + 1),
        max_rms_px=max(0.5, 0.1 * spacing_px),
        outlier_px=max(1.0, 0.25 * spacing_px),
    )
    predicted = grid.points @ reg.affine[:, :2].T + reg.affine[:, 2]
    dist, idx = cKDTree(spots).query(predicted, distance_upper_bound=0.3 * spacing_px)
    ok = np.isfinite(dist) & ~np.isnan(reg.residuals_px)
    tile, err = fit_tilemap(grid.points[ok], spots[idx[ok]], reg.affine, input_hw)
    return Registered(tile, grid.points[ok], spots[idx[ok]], err, reg.orientation)
