"""A simulated bench rebuilt from a calibration file: a lab's bench, reproduced without the lab.

Set `replay = "calibration.h5"` in a bench file's `[sim]` section: the simulated devices then
record what the calibrated forward model predicts (measured kernels, registration, display
response, illumination, stray light and dark frame), with the measured sensor noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from calibration import calfile
from calibration.design import Design
from calibration.model import emitted_light, predict_signal, tile_models
from sim.clock import RealClock, VirtualClock
from sim.layout import TileLayout
from sim.params import SimParams
from sim.world import SimWorld


class ReplayWorld(SimWorld):
    """The simulated devices of a bench whose optic is `design`, recording what the calibration
    measured on it (refused when the calibration is of another design, camera or display)."""

    def __init__(
        self,
        params: SimParams,
        design: Design,
        layout: TileLayout,
        calibration: Path | str,
        clock: RealClock | VirtualClock | None = None,
    ) -> None:
        psfs = torch.from_numpy(design.psfs.astype(np.float32))
        super().__init__(
            params,
            psfs,
            design.signed,
            layout,
            clock,
            display_scale=design.display_scale,
            display_origin=design.display_origin,
        )
        inputs = calfile.fingerprint_inputs(
            design, self.frame_shape, self.display_shape, params.sensor.bit_depth
        )
        self.calibration = calfile.load(calibration, expect_fingerprint=inputs)
        self._rng = np.random.default_rng(params.fabrication.seed)
        self._models = None

    def _grid_levels(self) -> np.ndarray:
        """What the display shows on the input grid (1, h, w[, 3]): each s×s block's mean."""
        cal = self.calibration
        (h, w), s, (x, y) = cal.input_shape, cal.display_scale, cal.display_origin
        block = self.levels.numpy().astype(np.float64)[:, y : y + s * h, x : x + s * w]
        grid = block.reshape(block.shape[0], h, s, w, s).mean(axis=(2, 4))
        return grid[0][None] if grid.shape[0] == 1 else grid.transpose(1, 2, 0)[None]

    def mean_frame(self, exposure_s: float) -> np.ndarray:
        """Expected DN for what the display shows now, under the current light."""
        cal, light = self.calibration, self.light_level
        if self._models is None:
            self._models = tile_models(cal)
        emitted = emitted_light(cal, self._grid_levels()) * light
        signal = predict_signal(cal, emitted, self._models)[0]
        return cal.dark_dn + exposure_s * (cal.background_dn_per_s * light + signal)

    @torch.no_grad()
    def irradiance(self) -> torch.Tensor:
        """Scene signal in DN/s (the calibration's units, not a white field's)."""
        cal = self.calibration
        mean = self.mean_frame(cal.exposure_s)
        return torch.as_tensor((mean - cal.dark_dn) / cal.exposure_s, dtype=torch.float32)

    def capture(self, exposure_s: float) -> np.ndarray:
        cal = self.calibration
        mean = self.mean_frame(exposure_s)
        gain = cal.conversion_gain_e_per_dn
        electrons = self._rng.poisson(np.maximum(mean - cal.dark_dn, 0.0) * gain)
        dn = (
            cal.dark_dn
            + electrons / gain
            + self._rng.normal(0.0, 1.0, mean.shape) * (cal.read_noise_dn)
        )
        top = 2**cal.camera_bit_depth - 1
        return np.clip(np.round(dn), 0, top).astype(np.uint16)
