"""The optic as designed: what calibration, capture and the calibration file's fingerprint need.

It lives here, not in `hil`, because calibration imports neither `hil` nor `sim`; `hil.bench.design`
builds it from the bench file's `[frontend]` section (and the design checkpoint), never from a
simulated world, so a real bench and its simulated twin calibrate against the same design.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.psf import kernel_offset, psf_centroid


@dataclass(frozen=True, eq=False)
class Design:
    """The frontend as designed: where its tiles should be and what its PSFs should look like.

    Measured kernels are aligned to it: the translation a PSF and a misalignment share cannot be
    told apart, so each measured PSF keeps its design's centroid and the registration takes the
    rest. `psfs` are (P, C, k, k) float64, interleaved ± when signed; `hw` is the input grid the
    design was made for, which each tile images onto the sensor.
    """

    kernels: int
    kernel_size: int
    signed: bool
    channels: int
    tile_boxes: tuple[tuple[int, int, int, int], ...]  # (y0, x0, h, w) on the sensor, tile order
    psfs: np.ndarray
    hw: tuple[int, int]

    def __post_init__(self) -> None:
        psfs = np.array(self.psfs, dtype=np.float64)  # a private copy: the design is frozen
        psfs.setflags(write=False)
        boxes = tuple(tuple(int(v) for v in box) for box in self.tile_boxes)
        k = self.kernel_size
        want = (self.tiles, self.channels, k, k)
        if psfs.shape != want:
            raise ValueError(f"design PSFs must have shape {want}, got {psfs.shape}")
        if len(boxes) != self.tiles or any(len(b) != 4 for b in boxes):
            raise ValueError(f"the design needs {self.tiles} tile boxes (y0, x0, h, w)")
        object.__setattr__(self, "psfs", psfs)
        object.__setattr__(self, "tile_boxes", boxes)
        object.__setattr__(self, "hw", (int(self.hw[0]), int(self.hw[1])))

    @property
    def tiles(self) -> int:
        """P: one tile per kernel, two (positive, negative) per signed kernel."""
        return self.kernels * (2 if self.signed else 1)

    def centroid_offset(self, p: int) -> np.ndarray:
        """Design PSF centroid (x, y) minus the "same" window offset."""
        return psf_centroid(self.psfs[p]) - kernel_offset(self.kernel_size)
