"""The simulated optical table: display → fabricated frontend → sensor, on one clock.

The simulated display, camera and light source are views of one `SimWorld`, so what the display
shows is what the camera sees, through glass that is wrong in the ways fabricated glass is wrong
(gain, misalignment, kernel error and blur, stray light, display gamma, uneven illumination).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sim.clock import RealClock, VirtualClock
from sim.fabrication import Fabrication
from sim.layout import TileLayout
from sim.params import SimParams
from sim.psf_frontend import PSFFrontend
from sim.sensor import Sensor


class SimWorld:
    """State the simulated devices share, built from the design it fabricates.

    `designed_psfs` (P, C, k, k) are the design's PSFs (interleaved ± pairs when `signed`) and
    `layout` its grid of P tiles on the sensor; the world fabricates its glass from them with the
    `[sim.fabrication]` errors. What was designed is the caller's to say: sim knows no bench file.
    """

    def __init__(
        self,
        params: SimParams,
        designed_psfs: torch.Tensor,
        signed: bool,
        layout: TileLayout,
        clock: RealClock | VirtualClock | None = None,
    ) -> None:
        self.params, self.clock = params, clock or RealClock()
        dp = params.display
        p, channels, k = designed_psfs.shape[0], designed_psfs.shape[1], designed_psfs.shape[-1]
        if layout.n_tiles != p:
            raise ValueError(f"{p} designed PSFs but {layout.n_tiles} tiles in the layout")
        kernels = p // 2 if signed else p
        self.designed = PSFFrontend(
            kernels, k, channels, signed, psfs=designed_psfs, trainable=False
        )
        self.fabrication = Fabrication(params.fabrication, dp)
        self.frontend = PSFFrontend(
            kernels,
            k,
            channels,
            signed,
            psfs=self.fabrication.fabricate_psfs(self.designed.psfs),
            trainable=False,
        )
        self.layout = layout
        self.sensor = Sensor(params.sensor)
        self.noise = torch.Generator().manual_seed(params.fabrication.seed * 1_000_003 + 17)
        self.levels = torch.zeros(channels, dp.height, dp.width)
        self.sources: dict[str, tuple[bool, float]] = {}

    @property
    def display_shape(self) -> tuple[int, ...]:
        dp = self.params.display
        return (dp.height, dp.width) if self.designed.channels == 1 else (dp.height, dp.width, 3)

    def set_source(self, name: str, on: bool, level: float) -> None:
        """A light source or shutter in the illumination path; light passes when all are on."""
        self.sources[name] = (bool(on), float(level))

    @property
    def light_level(self) -> float:
        """Relative illumination of the display: the product of every source's level, or 0."""
        if not self.sources or not all(on for on, _ in self.sources.values()):
            return 0.0
        return float(np.prod([level for _, level in self.sources.values()]))

    def show(self, levels: np.ndarray) -> None:
        """Display levels (H, W) or (H, W, 3) in [0, 1]."""
        t = torch.as_tensor(np.asarray(levels, np.float32))
        self.levels = t[None] if t.ndim == 2 else t.permute(2, 0, 1)

    @property
    def _warp_margin(self) -> int:
        """Pixels by which the misalignment can move light beyond the display's own grid."""
        fp, dp = self.params.fabrication, self.params.display
        theta = math.radians(abs(fp.rotation_deg))
        reach = max(abs(fp.shift_px[0]), abs(fp.shift_px[1]))
        reach += (math.sin(theta) + 1 - math.cos(theta)) * max(dp.height, dp.width) / 2
        return math.ceil(reach) + 1

    @torch.no_grad()
    def irradiance(self) -> torch.Tensor:
        """The noise-free irradiance (H, W) on the sensor, in units of a white field's PSF sum."""
        frame, light = torch.zeros(self.layout.frame_shape), self.light_level
        if light == 0:
            return frame
        m = self._warp_margin
        emitted = self.fabrication.apply_to_display(self.levels) * light
        # warp on a grid with margins, so light the misalignment moves off the display's own
        # pixel grid still reaches the sensor (the centre, and so the warp, stays the same)
        padded = torch.nn.functional.pad(emitted[None], (m, m, m, m))
        full = self.frontend.intensities(self.fabrication.warp(padded), mode="full")[0]
        k = self.frontend.kernel_size
        off = k - 1 - (k - 1) // 2  # where the "same" window starts inside the full result
        edge = k + m
        canvas = torch.zeros(frame.shape[0] + 2 * edge, frame.shape[1] + 2 * edge)
        for tile, (y, x, _, _) in zip(full, self.layout.boxes, strict=True):
            y0, x0 = y - off - m + edge, x - off - m + edge
            canvas[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] += tile
        frame = canvas[edge : edge + frame.shape[0], edge : edge + frame.shape[1]]
        frame = frame * self.fabrication.gain
        return frame + self.fabrication.background * light

    @torch.no_grad()
    def display_power(self) -> float:
        """Light leaving the display, relative to a full white field at full illumination."""
        emitted = self.fabrication.apply_to_display(self.levels) * self.light_level
        return float(emitted.mean())

    def capture(self, exposure_s: float) -> np.ndarray:
        """One noisy frame in DN (uint16) for the current display and light."""
        dn = self.sensor.capture(self.irradiance(), generator=self.noise, exposure_s=exposure_s)
        return dn.to(torch.int32).numpy().astype(np.uint16)
