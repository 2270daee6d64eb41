"""Frames into feature maps: the calibration's registration, dark and stray light undone.

What `hil capture` runs on every frame, and the display pre-compensation it shows images with.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from calibration import calfile


class FeatureExtractor:
    """Frame (DN) → feature maps on the design's grid (m, Hd, Wd), in the design's units.

    Each tile is sampled (bilinearly, edges clamped) at the registered position of every display
    pixel, so maps from all tiles line up with each other and with the simulated frontend's
    output; dividing by the bench's throughput (measured kernel sums over designed ones) puts them
    in its units. Sampling and the ± subtraction are one sparse matrix, built once, so a frame
    costs one product instead of a resampling per tile.
    """

    def __init__(self, cal: calfile.Calibration, design_psf_sums: np.ndarray) -> None:
        self.cal = cal
        h, w = cal.display_shape[:2]
        ys, xs = np.mgrid[:h, :w].astype(np.float64)
        points = np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)])
        sample = [bilinear_weights((a @ points)[::-1], cal.frame_shape) for a in cal.affines]
        if cal.signed:
            sample = [p - n for p, n in zip(sample[0::2], sample[1::2], strict=True)]
        self.weights = scipy.sparse.vstack(sample, format="csr")
        self.shape = (h, w)
        ratio = cal.psfs.sum(axis=(1, 2, 3)) / design_psf_sums
        self.scale = float(np.median(ratio))
        self._dark = cal.dark_dn.astype(np.float64).ravel()
        self._background = cal.background_dn_per_s.astype(np.float64).ravel()

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        signal = (frame.ravel() - self._dark) / self.cal.exposure_s - self._background
        maps = self.weights @ signal / self.scale
        return maps.reshape(-1, *self.shape).astype(np.float32)


def bilinear_weights(yx: np.ndarray, shape: tuple[int, int]) -> scipy.sparse.csr_matrix:
    """Rows of weights that sample an image of `shape` bilinearly at points (2, n) (y, x), clamped
    to the image like `scipy.ndimage.map_coordinates(order=1, mode="nearest")`."""
    h, w = shape
    y, x = np.clip(yx[0], 0, h - 1), np.clip(yx[1], 0, w - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
    fy, fx = y - y0, x - x0
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    rows = np.tile(np.arange(len(y)), 4)
    cols = np.concatenate([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    vals = np.concatenate([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(y), h * w))


def pre_compensate(levels: np.ndarray, cal: calfile.Calibration) -> np.ndarray:
    """Drive levels whose light is proportional to `levels`: the inverse display response."""
    return np.interp(levels, cal.display_response, cal.display_levels).astype(np.float32)
