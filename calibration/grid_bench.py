"""The bench as calibration addresses it: its display in the design's input-grid pixels.

Everything calibration shows is an input-grid image (what the student was trained on), put on
the physical display by the design's one mapping (`Design.on_display`); the display around the
grid stays black, so no light reaches the sensor that a capture would not show.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibration.design import Design


class GridDisplay:
    """A display whose pixels are the input grid's: `shape` is (h, w[, 3])."""

    def __init__(self, display: Any, design: Design) -> None:
        self.device, self.design = display, design
        self.physical_hw = tuple(display.shape[:2])
        design.origin_on(self.physical_hw)  # refuse a grid that does not fit, before any frame
        self.shape = (*design.hw, *display.shape[2:])
        self.bit_depth = display.bit_depth

    def show(self, image: np.ndarray) -> None:
        self.device.show(self.design.on_display(image, self.physical_hw))

    def blank(self) -> None:
        self.device.blank()


class GridBench:
    """The open bench with its display addressed in input-grid pixels; the rest passes through."""

    def __init__(self, bench: Any, design: Design) -> None:
        self.bench = bench
        self.display = GridDisplay(bench.display, design)
        self.camera = bench.camera
        self.light_sources = bench.light_sources
        self.simulated = bench.simulated

    def snapshot(self) -> dict:
        return self.bench.snapshot()
