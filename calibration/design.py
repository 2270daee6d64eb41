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
    """The frontend as designed: how its tiles are arranged and what its PSFs should look like.

    Measured kernels are aligned to it: the translation a PSF and a misalignment share cannot be
    told apart, so each measured PSF keeps its design's centroid and the registration takes the
    rest. `psfs` are (P, C, k, k) float64, interleaved ± when signed; `hw` is the input grid the
    design was made for, which each tile images onto the sensor.
    """

    kernels: int
    kernel_size: int
    signed: bool
    channels: int
    # (y0, x0, h, w) of the designed packed grid, tile order: the arrangement and order the
    # sub-images are assigned by (calibration finds where they really land)
    tile_boxes: tuple[tuple[int, int, int, int], ...]
    psfs: np.ndarray
    hw: tuple[int, int]  # the input grid (h, w): what the student was trained on
    display_scale: int = 1  # physical display pixels per input pixel
    display_origin: tuple[int, int] | None = None  # (x, y) of the grid's top-left; None: centred

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
        if self.display_origin is not None:
            origin = (int(self.display_origin[0]), int(self.display_origin[1]))
            object.__setattr__(self, "display_origin", origin)

    @property
    def tiles(self) -> int:
        """P: one tile per kernel, two (positive, negative) per signed kernel."""
        return self.kernels * (2 if self.signed else 1)

    def centroid_offset(self, p: int) -> np.ndarray:
        """Design PSF centroid (x, y) minus the "same" window offset."""
        return psf_centroid(self.psfs[p]) - kernel_offset(self.kernel_size)

    def origin_on(self, display_hw: tuple[int, int]) -> tuple[int, int]:
        """(x, y) of the input grid's top-left display pixel; refuses a grid that does not fit."""
        (dh, dw), (h, w), s = display_hw, self.hw, self.display_scale
        if self.display_origin is None:
            x, y = (dw - s * w) // 2, (dh - s * h) // 2
        else:
            x, y = self.display_origin
        if x < 0 or y < 0 or x + s * w > dw or y + s * h > dh:
            raise ValueError(
                f"the {h}×{w} input grid at display_scale {s} ({s * h}×{s * w} display pixels) "
                f"at display_origin_px [{x}, {y}] does not fit the {dh}×{dw} display"
            )
        return x, y

    def on_display(self, image: np.ndarray, display_hw: tuple[int, int]) -> np.ndarray:
        """An input-grid image (h, w[, 3]) as the display shows it: each input pixel an s×s
        square of display pixels at the grid's origin, black around it. The one mapping every
        command that shows images uses."""
        image = np.asarray(image, np.float32)
        if image.shape[:2] != self.hw:
            raise ValueError(f"expected an input-grid image of {self.hw}, got {image.shape[:2]}")
        (x, y), s = self.origin_on(display_hw), self.display_scale
        big = np.repeat(np.repeat(image, s, axis=0), s, axis=1) if s > 1 else image
        out = np.zeros((*display_hw, *image.shape[2:]), np.float32)
        out[y : y + big.shape[0], x : x + big.shape[1]] = big
        return out
