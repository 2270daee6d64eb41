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
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


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


def _axis_positions(size: int, spacing: int, margin: int) -> np.ndarray:
    n = (size - 1 - 2 * margin) // spacing + 1
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


@dataclass(frozen=True, eq=False)
class Registration:
    """A tile's fitted display→frame map and how well the dots agree with it."""

    affine: np.ndarray  # (2, 3) display (x, y, 1) → frame (x, y)
    residuals_px: np.ndarray  # (M,) per grid dot, NaN where no spot was matched
    rms_px: float
    matched: int
    orientation: str  # which ORIENTATIONS variant of the guess the dots chose


@dataclass
class _Candidate:
    name: str
    affine: np.ndarray
    pairs: np.ndarray  # (M,) spot index per dot, -1 where unmatched
    rms: float
    matched: int
    against: int  # dots that should have been seen but were not, plus unexplained spots
    gap_lit: bool

    @property
    def support(self) -> int:
        return self.matched - self.against


def _match(pred: np.ndarray, tree: cKDTree, radius: float) -> np.ndarray:
    """Spot index per predicted dot within `radius`, one dot per spot (the nearest wins)."""
    dist, idx = tree.query(pred, distance_upper_bound=radius)
    pairs = np.where(np.isfinite(dist), idx, -1)
    for spot in np.unique(pairs[pairs >= 0]):
        rivals = np.flatnonzero(pairs == spot)
        if len(rivals) > 1:
            pairs[rivals[rivals != rivals[np.argmin(dist[rivals])]]] = -1
    return pairs


def _best_shift(pred: np.ndarray, spots: np.ndarray, tree: cKDTree, radius: float) -> np.ndarray:
    """The translation (up to a spacing) that lines the most predicted dots up with spots.

    A lattice matches itself at the true offset from every dot, so the offsets from the dots
    nearest the centre to the spots around them are the candidates; each scores by the dots it
    puts within half a match radius of a spot, then by their squared distances.
    """
    middle = pred[np.argsort(np.hypot(*(pred - pred.mean(axis=0)).T))[:16]]
    shifts = [np.zeros(2)]
    for p, near in zip(middle, tree.query_ball_point(middle, 2 * radius), strict=True):
        shifts.extend(spots[near] - p)
    best, best_score = shifts[0], (-1, 0.0)
    for t in shifts:
        dist, _ = tree.query(pred + t, distance_upper_bound=radius / 2)
        ok = np.isfinite(dist)
        score = (int(ok.sum()), -float((dist[ok] ** 2).sum()))
        if score > best_score:
            best, best_score = t, score
    return best


def _refit(grid: DotGrid, spots: np.ndarray, pairs: np.ndarray) -> np.ndarray | None:
    used = pairs >= 0
    if used.sum() < 3:
        return None
    try:
        return fit_affine(grid.points[used], spots[pairs[used]])
    except GeometryError:  # the matched dots lie on one line
        return None


def _errors(affine: np.ndarray, grid: DotGrid, spots: np.ndarray, pairs: np.ndarray):
    used = np.flatnonzero(pairs >= 0)
    return used, np.hypot(*(apply_affine(affine, grid.points[used]) - spots[pairs[used]]).T)


def _evidence_against(
    pred: np.ndarray,
    pairs: np.ndarray,
    spots: np.ndarray,
    radius: float,
    region: tuple[int, int, int, int] | None,
) -> int:
    """Dots a variant puts where a spot should have been seen but none was (a turned grid
    predicts one at the real gap), plus the spots it leaves unexplained (a grid shifted by a
    spacing leaves a row of them). Dots near the edge of the searched region (or, without one,
    outside the spots' bounding box) may just have been cut off."""
    if region is None:
        lo, hi = spots.min(axis=0) - radius / 2, spots.max(axis=0) + radius / 2
    else:
        y0, x0, h, w = region
        lo = np.array([x0 - 0.5, y0 - 0.5]) + 1.5 * radius
        hi = np.array([x0 + w - 0.5, y0 + h - 0.5]) - 1.5 * radius
    missed = int(((pairs < 0) & (pred >= lo).all(axis=1) & (pred <= hi).all(axis=1)).sum())
    return missed + len(spots) - int((pairs >= 0).sum())


def _fit_variant(
    name: str,
    start: np.ndarray,
    grid: DotGrid,
    spots: np.ndarray,
    tree: cKDTree,
    radius: float,
    outlier_px: float,
    region: tuple[int, int, int, int] | None,
) -> _Candidate | None:
    """Shift, match, fit and re-match one orientation of the guess; None if nothing fits."""
    affine = start.copy()
    affine[:, 2] += _best_shift(apply_affine(start, grid.points), spots, tree, radius)
    pairs = np.full(len(grid.points), -1)
    for _ in range(6):  # match → fit → re-match until the pairing settles
        new = _match(apply_affine(affine, grid.points), tree, radius)
        if np.array_equal(new, pairs):
            break
        pairs = new
        affine = _refit(grid, spots, pairs)
        if affine is None:
            return None
    if (pairs >= 0).sum() < 3:
        return None
    while True:  # drop the worst pair while it is clearly no dot of this grid (a stray spot)
        used, err = _errors(affine, grid, spots, pairs)
        # 5 σ of the rest (the median of a 2-D error's length is 1.18 σ), within [0.2, outlier_px]
        limit = min(outlier_px, max(5 * float(np.median(err)) / 1.18, 0.2))
        if len(used) <= 3 or err.max() <= limit:
            break
        pairs[used[np.argmax(err)]] = -1
        affine = _refit(grid, spots, pairs)
        if affine is None:
            return None
    used, err = _errors(affine, grid, spots, pairs)
    against = _evidence_against(apply_affine(affine, grid.points), pairs, spots, radius, region)
    gap_lit = False
    if grid.gap_point is not None:
        gap = apply_affine(affine, np.asarray([grid.gap_point]))[0]
        gap_lit = bool(np.isfinite(tree.query(gap, distance_upper_bound=limit)[0]))
    rms = float(np.sqrt(np.mean(err**2)))
    return _Candidate(name, affine, pairs, rms, len(used), against, gap_lit)


def _orientation_names(orientations: tuple[str, ...] | None) -> tuple[str, ...]:
    names = tuple(ORIENTATIONS) if orientations is None else tuple(orientations)
    if not names or any(n not in ORIENTATIONS for n in names):
        raise ValueError(f"orientations must be among {list(ORIENTATIONS)}, got {names}")
    return names


def _oriented(guess: np.ndarray, d: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """guess ∘ (x ↦ c + D (x − c)): the guess turned or mirrored about the grid centre."""
    shift = guess[:, :2] @ (centre - d @ centre) + guess[:, 2]
    return np.hstack([guess[:, :2] @ d, shift[:, None]])


def _choose(candidates: list[_Candidate], need: int, n_spots: int, n_dots: int) -> list:
    """The variants that match enough dots and leave the parity gap dark, best first (most
    support, then lowest RMS); GeometryError when there are none."""
    enough = [c for c in candidates if c.matched >= need]
    valid = [c for c in enough if not c.gap_lit]
    if not valid:
        if enough:
            raise GeometryError(
                f"ambiguous orientation: {len(enough)} orientation(s) match ≥ {need} dots but "
                "each finds a spot where the parity gap should be dark: check that the display "
                "shows the grid with its gap, and for stray spots"
            )
        best = max((c.matched for c in candidates), default=0)
        raise GeometryError(
            f"only {best} of {n_dots} dots matched ({n_spots} spots found), need {need}: "
            "check the guess (tile position, within a spacing), the exposure and the threshold"
        )
    return sorted(valid, key=lambda c: (-c.support, c.rms))


def _trusted(valid: list[_Candidate], max_rms_px: float) -> _Candidate:
    """The best variant, or GeometryError when another fits as well or its residuals are large."""
    best = valid[0]
    ties = [c.name for c in valid[1:] if c.support == best.support and c.rms <= max_rms_px]
    if ties and best.rms <= max_rms_px:
        raise GeometryError(
            f"ambiguous orientation: {best.name} and {', '.join(ties)} fit {best.matched} dots "
            "equally well: the parity gap is not seen (lost with the dots near it, or the grid "
            "has none); check the region searched, or pass the orientations you trust"
        )
    if best.rms > max_rms_px:
        raise GeometryError(
            f"residuals too large: RMS {best.rms:.2f} px over {best.matched} dots (limit "
            f"{max_rms_px} px): check for saturated or touching spots (show DotGrid.split "
            "frames), focus, or a distortion an affine map cannot follow"
        )
    return best


def register_tile(
    grid: DotGrid,
    spots: np.ndarray,
    guess: np.ndarray,
    *,
    min_matched: int = 6,
    max_rms_px: float = 0.5,
    outlier_px: float = 1.0,
    orientations: tuple[str, ...] | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> Registration:
    """Match detected spots (K, 2) to the grid's dots and fit the display→frame affine.

    `guess` (2, 3) needs to be right to within about a spacing in translation and a few degrees,
    but not in orientation: every turn and mirror of it about the grid centre (`orientations`,
    default all of ORIENTATIONS) is shifted onto the spots, matched (nearest spot within half a
    spacing), fitted and re-matched; pairs off the fit by more than 5 σ of the others (but at
    least 0.2 px) or by more than `outlier_px` are dropped as stray spots. A variant that finds a
    spot where the parity gap should be dark (as close as its dots are to their spots) is the
    grid turned or mirrored, and is rejected. Of the rest, the one with the most matched dots,
    less the dots that should have been seen but were not (a turned grid predicts one at the real
    gap) and the spots it leaves unexplained, wins; then the lowest RMS. `region` (y0, x0, h, w),
    the frame area the spots were searched in, tells which dots may have been lost at its edge
    (within 3/4 spacing); without it, dots outside the spots' bounding box may. A lost dot that a
    turn or mirror would put the gap on makes the orientation ambiguous: an error, not a guess.

    Raises GeometryError when the answer is not trustworthy: fewer than `min_matched` dots, more
    than one orientation fitting equally well, or an RMS above `max_rms_px`.
    """
    spots = np.asarray(spots, np.float64).reshape(-1, 2)
    guess = np.asarray(guess, np.float64)
    if guess.shape != (2, 3):
        raise ValueError(f"guess must be a (2, 3) affine, got shape {guess.shape}")
    names = _orientation_names(orientations)
    n_dots = len(grid.points)
    need = max(int(min_matched), 3)
    if len(spots) < need:
        raise GeometryError(
            f"found {len(spots)} spots, need at least {need} of the grid's {n_dots} dots: check "
            "that the light is on, the grid is shown, the exposure and the region searched"
        )
    scale = math.sqrt(abs(np.linalg.det(guess[:, :2])))
    if not scale > 0:
        raise ValueError("guess is singular")
    radius = 0.5 * grid.spacing * scale
    tree = cKDTree(spots)
    candidates = []
    for name in names:
        start = _oriented(guess, ORIENTATIONS[name], grid.centre)
        cand = _fit_variant(name, start, grid, spots, tree, radius, outlier_px, region)
        if cand is not None:
            candidates.append(cand)
    best = _trusted(_choose(candidates, need, len(spots), n_dots), max_rms_px)
    residuals = np.full(n_dots, np.nan)
    used, err = _errors(best.affine, grid, spots, best.pairs)
    residuals[used] = err
    return Registration(best.affine, residuals, best.rms, best.matched, best.name)


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
