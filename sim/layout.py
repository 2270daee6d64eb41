"""Where the feature-map tiles sit on the sensor.

The meta-optic images the same scene through m (or 2m signed) sub-optics side by side, so one
camera frame holds every feature map as a tile in a grid with dark gaps between tiles. Signed pairs
sit next to each other in a row (positive first), so their aberrations and illumination are alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TileLayout:
    """A grid of `n_tiles` tiles of (tile_h, tile_w) px with `gap_px` between and around them."""

    n_tiles: int
    tile_h: int
    tile_w: int
    gap_px: int
    cols: int

    @classmethod
    def grid(cls, n_tiles: int, tile_hw: tuple[int, int], gap_px: int, signed: bool) -> TileLayout:
        """The most nearly square grid; with signed pairs an even number of columns."""
        cols = math.ceil(math.sqrt(n_tiles))
        if signed and cols % 2:
            cols += 1
        cols = min(cols, n_tiles)
        return cls(n_tiles, int(tile_hw[0]), int(tile_hw[1]), int(gap_px), cols)

    @property
    def rows(self) -> int:
        return math.ceil(self.n_tiles / self.cols)

    @property
    def frame_shape(self) -> tuple[int, int]:
        g = self.gap_px
        return g + self.rows * (self.tile_h + g), g + self.cols * (self.tile_w + g)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(y0, x0, h, w) of each tile on the sensor, in tile order."""
        g = self.gap_px
        return [
            (
                g + (i // self.cols) * (self.tile_h + g),
                g + (i % self.cols) * (self.tile_w + g),
                self.tile_h,
                self.tile_w,
            )
            for i in range(self.n_tiles)
        ]

    def place(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles (..., n_tiles, h, w) → frames (..., H, W) with zeros in the gaps."""
        lead, g = tiles.shape[:-3], self.gap_px
        spare = self.rows * self.cols - self.n_tiles
        t = F.pad(tiles, (0, g, 0, g))
        if spare:
            t = torch.cat([t, t.new_zeros(*lead, spare, *t.shape[-2:])], dim=-3)
        t = t.reshape(*lead, self.rows, self.cols, self.tile_h + g, self.tile_w + g)
        t = t.movedim(-3, -2).reshape(*lead, self.rows * (self.tile_h + g), -1)
        return F.pad(t, (g, 0, g, 0))

    def crop(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (..., H, W) → tiles (..., n_tiles, h, w) at the design boxes."""
        return torch.stack([frames[..., y : y + h, x : x + w] for y, x, h, w in self.boxes], -3)
