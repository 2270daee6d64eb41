"""Spot centroids in a dark-subtracted frame of a dot grid (see `calibration.geometry` for why
spots must not touch, and `DotGrid.split` for showing a dense grid so that they do not)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from calibration.geometry import GeometryError


def _box(img: np.ndarray, cy: int, cx: int, half: int) -> tuple[np.ndarray, int, int]:
    """The box of half-width `half` around (cy, cx), cut by the image edge, and its corner.

    Cut, not shrunk: an off-centre PSF's light lies mostly to one side of its centroid, and a box
    shrunk to stay centred would clip it there.
    """
    y0, x0 = max(cy - half, 0), max(cx - half, 0)
    return img[y0 : cy + half + 1, x0 : cx + half + 1], y0, x0


def _cut_off(signal, total, y0, x0, shape, noise) -> bool:
    """Whether the spot's light runs into an image edge that cut its box: then part is lost."""
    h, w = shape
    edges = []
    if y0 == 0:
        edges.append(signal[0])
    if x0 == 0:
        edges.append(signal[:, 0])
    if y0 + signal.shape[0] == h:
        edges.append(signal[-1])
    if x0 + signal.shape[1] == w:
        edges.append(signal[:, -1])
    return any(e.sum() > 0.01 * total + 4 * noise * math.sqrt(e.size) for e in edges)


def _default_window(min_separation: float) -> int:
    """The largest odd box that stops short of halfway to a spot min_separation away."""
    w = int(math.floor(min_separation)) - 1
    return max(w - (w % 2 == 0), 3)


def _spot_input(image, min_separation: float, window: int | None) -> tuple[np.ndarray, int]:
    """The image as float64 and the centroid box's half-width, or ValueError naming the input."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if not min_separation >= 2:
        raise ValueError(f"min_separation must be ≥ 2 px, got {min_separation}")
    win = _default_window(min_separation) if window is None else int(window)
    if win < 3 or win % 2 == 0:
        raise ValueError(f"window must be odd and ≥ 3, got {window}")
    if not np.isfinite(img).all():
        raise ValueError("the image has non-finite pixels (NaN or inf): mask them with 0")
    return img, win // 2


def _dark_noise(img: np.ndarray, smooth: np.ndarray) -> float:
    """Noise σ of the dark between spots (the darkest quarter), from what the smoothing removed
    so that spot structure does not count: 0.87 σ for white noise, of which 0.28 σ stays in the
    smoothed image."""
    fine = (img - smooth)[smooth <= np.percentile(smooth, 25)]
    return 1.4826 * float(np.median(np.abs(fine - np.median(fine)))) / 0.87


def _peaks(smooth: np.ndarray, min_separation: float, threshold, noise: float) -> np.ndarray:
    """(row, col) of the smoothed image's local maxima above the threshold, brightest first."""
    med = float(np.median(smooth))
    height = float(smooth.max()) - med
    if height <= 0:
        return np.zeros((0, 2), int)
    if threshold is None:
        threshold = max(5 * 0.28 * noise, 0.1 * height)
    radius = max(1, int(min_separation // 2))
    peaks_mask = smooth == ndimage.maximum_filter(smooth, size=2 * radius + 1, mode="nearest")
    peaks = np.argwhere(peaks_mask & (smooth > med + float(threshold)))
    order = np.argsort(-smooth[peaks[:, 0], peaks[:, 1]], kind="stable")
    return peaks[order]


@dataclass(frozen=True, eq=False)
class _Settled:
    """A centroid box that stopped moving, and what the checks on it need."""

    xy: tuple[float, float]  # the centroid
    centre: tuple[int, int]  # (row, col) the last box was centred on
    corner: tuple[int, int]  # (y0, x0) of the last box
    signal: np.ndarray  # the box less the median of its border
    total: float  # the signal's clipped sum
    border: float  # the median of the box's border pixels: local stray light
    peak: float  # the box's brightest pixel


def _settle(img: np.ndarray, cy: int, cx: int, half: int) -> _Settled | None:
    """Centroid of the box around a peak, re-centred on it until it stops moving; None when the
    box holds no light or keeps moving (no single spot in it)."""
    h, w = img.shape
    seen = set()
    for _ in range(8):
        box, y0, x0 = _box(img, cy, cx, half)
        ring = np.concatenate([box[0], box[-1], box[1:-1, 0], box[1:-1, -1]])
        border = np.median(ring)
        signal = box - border
        weights = np.clip(signal, 0, None)
        total = weights.sum()
        if total <= 0:
            return None
        xy = (
            x0 + float(weights.sum(axis=0) @ np.arange(box.shape[1])) / total,
            y0 + float(weights.sum(axis=1) @ np.arange(box.shape[0])) / total,
        )
        seen.add((cx, cy))
        nx, ny = min(max(round(xy[0]), 0), w - 1), min(max(round(xy[1]), 0), h - 1)
        if (nx, ny) in seen:  # settled, or flipping between two boxes on a half pixel
            centre, corner = (int(cy), int(cx)), (y0, x0)
            return _Settled(xy, centre, corner, signal, total, float(border), float(box.max()))
        cx, cy = nx, ny
    return None


def _distinct(spots: np.ndarray, min_separation: float) -> np.ndarray:
    """Spots at least min_separation / 2 apart (two boxes may still settle a pixel apart on one
    spot, a centroid near a half pixel), the first of each kept, sorted by row then column."""
    keep: list[int] = []
    for i in range(len(spots)):
        if all(np.hypot(*(spots[i] - spots[j])) >= min_separation / 2 for j in keep):
            keep.append(i)
    spots = spots[keep]
    return spots[np.lexsort((spots[:, 0], spots[:, 1]))]


def find_spots(
    image: np.ndarray,
    min_separation: float,
    threshold: float | None = None,
    window: int | None = None,
) -> np.ndarray:
    """Sub-pixel (x, y) intensity centroids (K, 2) of the spots in a dark-subtracted image.

    Peaks are local maxima of the image smoothed by a σ = 1 px Gaussian (so that noise does not
    make peaks), at least `min_separation` / 2 apart, more than `threshold` above the smoothed
    image's median. The default is the larger of 5 σ of the noise left after smoothing (a robust
    σ of the darkest quarter of the image) and a tenth of the brightest peak.

    Each spot's centroid is taken over a `window` × `window` box (odd; default the largest odd
    size below min_separation, as wide as a spot may be without reaching its neighbour) that is
    re-centred on the centroid until it stops moving, after removing the median of the box's
    border pixels (local stray light) and clipping weights at 0. At the image edge the box is cut
    rather than shrunk, and a spot whose light reaches the edge is dropped: part of it is lost,
    so its centroid would be biased. Crop regions with a margin of about window // 2. A spot whose
    box border is lit well above the image's dark level (5th percentile) touches a neighbour and
    is dropped too; GeometryError when that is true of many (more than 2 and a third of the
    rest): the grid's spots touch and no window can separate them.

    The centroid is exact when the spot's light lies inside the box and no other spot's does; see
    the module docstring for grids whose spots touch.
    """
    img, half = _spot_input(image, min_separation, window)
    if min(img.shape) < 3:
        return np.zeros((0, 2))
    smooth = ndimage.gaussian_filter(img, 1.0, mode="nearest")
    noise = _dark_noise(img, smooth)
    floor = float(np.percentile(img, 5))  # the dark between spots, less ~1.6 σ of noise
    found: dict[tuple[int, int], tuple[float, float]] = {}
    touching = 0
    for cy, cx in _peaks(smooth, min_separation, threshold, noise):
        spot = _settle(img, cy, cx, half)
        if spot is None or _cut_off(spot.signal, spot.total, *spot.corner, img.shape, noise):
            continue
        # A box whose border is lit well above the dark between spots holds part of a
        # neighbour: that spot touches this one, and both centroids are pulled.
        if spot.border - floor > 0.01 * (spot.peak - spot.border) + 3 * noise:
            touching += 1
            continue
        found.setdefault(spot.centre, spot.xy)  # peaks of one spot converge on one box
    if touching > max(2, len(found) // 3):
        raise GeometryError(
            f"{touching} spots have a neighbour's light in their {2 * half + 1} px window: the "
            "spots touch, so their centroids would be pulled by up to a pixel; show the grid as "
            "DotGrid.split(2) frames (min_separation = 2 spacings) or use a larger spacing"
        )
    spots = np.array(list(found.values()), dtype=np.float64).reshape(-1, 2)
    return _distinct(spots, min_separation)
