"""Finding the sub-images: a bright-field frame's connected regions, counted against the design.

A lab knows how many sub-optics it fabricated, not where their images fall on the sensor; the
regions a white input grid lights are where they fall. A region too few means a sub-optic is
blocked or two sub-images merged; a region too many means stray light or a ghost: either way the
calibration stops and says what it saw.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from calibration.errors import CalibrationError


@dataclass(frozen=True)
class SubImage:
    """One lit region: its bounding box, intensity centroid, area and the area above half its
    own peak (≈ the input grid's image: the PSF's spread is outside it)."""

    box: tuple[int, int, int, int]  # (y0, x0, h, w)
    centre: tuple[float, float]  # (x, y)
    area_px: int
    half_max_area_px: int

    def scale(self, input_hw: tuple[int, int]) -> float:
        """Sensor px per input px, from the half-maximum area."""
        return math.sqrt(self.half_max_area_px / (input_hw[0] * input_hw[1]))

    def describe(self) -> str:
        y0, x0, h, w = self.box
        return f"({self.centre[0]:.0f}, {self.centre[1]:.0f}) {w}×{h} px"


class DiscoveryError(CalibrationError):
    """The sub-images found do not match the design; carries them for the picture."""

    def __init__(self, message: str, found: list[SubImage], frame: np.ndarray) -> None:
        super().__init__(message)
        self.found, self.frame = found, frame


def find_subimages(signal: np.ndarray, noise: np.ndarray, expected: int) -> list[SubImage]:
    """The lit regions of a bright-field signal (dark and stray light removed), in raster order
    of their centres; `noise` (H, W) is each pixel's σ in the same units.

    A pixel is lit 8 σ above zero, above 0.5% of the frame's bright level and above a fraction
    (½, then 0.7, then 0.85) of the brightest pixel within a window around it: sub-optics differ
    in throughput, and a dim sub-image beside a bright one's PSF tail is still the brightest
    thing near its own centre, while closely packed sub-images touch in their PSFs' tails and
    are told apart only by the dip between them. The window grows (5 px to 257 px) until the
    regions number as many as the design's tiles, all of about one size (the sub-optics share a
    magnification): too small a window cannot see across a gap, too large a one loses the
    dimmest sub-images; sub-images that overlap stay one region, or come apart in pieces of
    unequal size. Regions smaller than a tenth of the median are hot pixels or glints and are
    dropped. DiscoveryError names what was found when nothing gives the count.
    """
    bright = float(np.percentile(signal, 99.5))
    candidate = (signal > 8 * noise) & (signal > 0.005 * bright)
    tries = []
    for ratio in (0.5, 0.7, 0.85):
        for window in (5, 9, 17, 33, 65, 129, 257):
            local = ndimage.maximum_filter(signal, size=window, mode="nearest")
            found = _regions(signal, candidate & (signal >= ratio * local))
            if len(found) == expected and _alike(found):
                return found
            tries.append(found)
    closest = min(tries, key=lambda f: (abs(len(f) - expected), not _alike(f)))
    raise DiscoveryError(_message(expected, closest), closest, signal)


def _regions(signal: np.ndarray, lit: np.ndarray) -> list[SubImage]:
    lit = ndimage.binary_opening(lit, np.ones((2, 2), bool)).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(lit, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if not len(areas):
        return []
    keep = [i + 1 for i, a in enumerate(areas) if a >= 0.1 * np.median(areas)]
    found = sorted((_describe(signal, labels == i, stats[i]) for i in keep), key=_y)
    gaps = [b.centre[1] - a.centre[1] > _half_side(a) for a, b in itertools.pairwise(found)]
    rows = np.cumsum([0, *gaps])  # raster order: rows by the gaps between them, then x
    return [found[i] for i in np.lexsort(([s.centre[0] for s in found], rows))]


def _y(sub: SubImage) -> float:
    return sub.centre[1]


def _half_side(sub: SubImage) -> float:
    return 0.5 * min(sub.box[2], sub.box[3])


def _alike(found: list[SubImage]) -> bool:
    """Whether every region is about the median's size: sub-optics share one magnification."""
    areas = np.asarray([f.area_px for f in found], np.float64)
    return bool(len(areas)) and bool(np.all(np.abs(np.log(areas / np.median(areas))) < np.log(1.8)))


def _describe(signal: np.ndarray, region: np.ndarray, stat: np.ndarray) -> SubImage:
    x0, y0, w, h = (int(v) for v in stat[:4])
    values = np.where(region, signal, 0.0)
    ys, xs = np.nonzero(region)
    weights = values[ys, xs]
    centre = (
        float((xs * weights).sum() / weights.sum()),
        float((ys * weights).sum() / weights.sum()),
    )
    peak = float(np.percentile(weights, 95))
    return SubImage((y0, x0, h, w), centre, int(region.sum()), int((weights > peak / 2).sum()))


def _message(expected: int, found: list[SubImage]) -> str:
    n = len(found)
    what = f"found {n} sub-image{'s' if n != 1 else ''} on the sensor, the design has {expected}"
    if not found:
        return f"sub-images: {what}: nothing is lit; check the light, shutter and exposure"
    median = float(np.median([s.area_px for s in found]))
    big = [i for i, s in enumerate(found) if s.area_px > 1.6 * median]
    odd = [i for i, s in enumerate(found) if not 1 / 1.8 < s.area_px / median < 1.8]
    big += [i for i, s in enumerate(found) if max(s.box[2:]) > 1.5 * min(s.box[2:])]  # elongated
    big = sorted(set(big))
    listed = "; ".join(f"{i}: {s.describe()}" for i, s in enumerate(found[:24]))
    return f"sub-images: {what}{_hint(n, expected, big, odd)} (found: {listed})"


def _hint(n: int, expected: int, big: list[int], odd: list[int]) -> str:
    """What the count and the sizes of the regions suggest is wrong on the bench."""
    if big and n < expected:
        regions = ", ".join(map(str, big))
        return f" — region(s) {regions} larger or longer than a sub-image: sub-images overlap"
    if (big or odd) and n == expected:
        regions = ", ".join(map(str, sorted(set(big + odd))))
        what = "sub-images overlap, or a ghost"
        return f" — region(s) {regions} not a sub-image's size or shape: {what}"
    if n < expected:
        return " — a sub-optic may be blocked or outside the sensor"
    return " — stray light or a ghost image: check baffles and the display's surroundings"
