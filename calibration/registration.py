"""A tile's display→frame affine from the spots of a dot grid: every turn and mirror of the guess
is tried, and the grid's parity gap rejects the wrong ones (see `calibration.geometry`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from calibration.geometry import (
    ORIENTATIONS,
    DotGrid,
    GeometryError,
    apply_affine,
    fit_affine,
)


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
    search: tuple[tuple[int, int, int, int], float] | None,
) -> int:
    """Dots a variant puts where a spot should have been seen but none was (a turned grid
    predicts one at the real gap), plus the spots it leaves unexplained (a grid shifted by a
    spacing leaves a row of them). Dots near the edge of the searched region (or, without one,
    outside the spots' bounding box) may just have been cut off."""
    if search is None:
        lo, hi = spots.min(axis=0) - radius / 2, spots.max(axis=0) + radius / 2
    else:
        (y0, x0, h, w), edge = search
        lo = np.array([x0 - 0.5, y0 - 0.5]) + edge
        hi = np.array([x0 + w - 0.5, y0 + h - 0.5]) - edge
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
    search: tuple[tuple[int, int, int, int], float] | None,
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
    against = _evidence_against(apply_affine(affine, grid.points), pairs, spots, radius, search)
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
    region: tuple[int, int, int, int] | tuple[tuple[int, int, int, int], float] | None = None,
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
    (within 3/4 spacing, or the distance given as `region = (box, edge_px)`: as far as a
    spot's centroid window reaches); without it, dots outside the spots' bounding box may. A
    lost dot that a turn or mirror would put the gap on makes the orientation ambiguous: an
    error, not a guess.

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
    search = region if region is None or len(region) == 2 else (region, 1.5 * radius)
    candidates = []
    for name in names:
        start = _oriented(guess, ORIENTATIONS[name], grid.centre)
        cand = _fit_variant(name, start, grid, spots, tree, radius, outlier_px, search)
        if cand is not None:
            candidates.append(cand)
    best = _trusted(_choose(candidates, need, len(spots), n_dots), max_rms_px)
    residuals = np.full(n_dots, np.nan)
    used, err = _errors(best.affine, grid, spots, best.pairs)
    residuals[used] = err
    return Registration(best.affine, residuals, best.rms, best.matched, best.name)
