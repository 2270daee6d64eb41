"""The simulated optical table: display → fabricated frontend → bench geometry → sensor, on one
clock.

The simulated display, camera and light source are views of one `SimWorld`, so what the display
shows is what the camera sees, through glass that is wrong in the ways fabricated glass is wrong
(gain, misalignment, kernel error and blur, stray light, display gamma, uneven illumination) and
imaged the way a real bench images it (magnification, a rotated, jittered tile grid, distortion,
vignetting, hot pixels: `sim.bench_geometry`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sim.bench_geometry import HOT_PIXEL_SALT, BenchGeometry, seeded_rng
from sim.clock import RealClock, VirtualClock
from sim.fabrication import Fabrication, display_response, illumination_map
from sim.layout import TileLayout
from sim.params import SimParams
from sim.psf_frontend import PSFFrontend
from sim.sensor import Sensor

HOT_PIXEL_DARK = 0.2  # extra dark signal of a hot pixel, as a fraction of the full well


class SimWorld:
    """State the simulated devices share, built from the design it fabricates.

    `designed_psfs` (P, C, k, k) are the design's PSFs (interleaved ± pairs when `signed`) and
    `layout` its packed grid of P tiles: its tile size is the input grid (h, w), its order the
    sub-optics'. The input grid sits on the physical display (`[sim.display]`) as s×s blocks
    (`display_scale`) from `display_origin` (x, y) (None: centred). The world fabricates its
    glass with the `[sim.fabrication]` errors and images it with the `[sim.optics]` geometry.
    What was designed is the caller's to say: sim knows no bench file.
    """

    def __init__(
        self,
        params: SimParams,
        designed_psfs: torch.Tensor,
        signed: bool,
        layout: TileLayout,
        clock: RealClock | VirtualClock | None = None,
        *,
        display_scale: int = 1,
        display_origin: tuple[int, int] | None = None,
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
        self.layout, self.grid_hw = layout, (layout.tile_h, layout.tile_w)
        self.fabrication = Fabrication(params.fabrication, dp, grid_hw=self.grid_hw)
        self.frontend = PSFFrontend(
            kernels,
            k,
            channels,
            signed,
            psfs=self.fabrication.fabricate_psfs(self.designed.psfs),
            trainable=False,
        )
        self._place_grid(int(display_scale), display_origin)
        self.geometry = BenchGeometry(
            params.optics,
            layout,
            self.display_scale,
            (params.sensor.height, params.sensor.width),
            params.fabrication.seed,
            (params.fabrication.shift_px, params.fabrication.rotation_deg),
        )
        self.frame_shape: tuple[int, int] = self.geometry.frame_shape
        self.sensor = Sensor(params.sensor, dark_map_e=self._hot_pixel_map())
        self._build_renderer()
        self.seed_noise(params.fabrication.seed * 1_000_003 + 17)  # sets self.noise
        self.levels = torch.zeros(channels, dp.height, dp.width)
        self.sources: dict[str, tuple[bool, float]] = {}

    def _place_grid(self, scale: int, origin: tuple[int, int] | None) -> None:
        """The input grid on the display, and the padded block of display pixels the glass sees."""
        if scale < 1:
            raise ValueError(f"display_scale must be a whole number ≥ 1, got {scale}")
        (h, w), dp = self.grid_hw, self.params.display
        self.display_scale = scale
        if origin is None:
            origin = ((dp.width - scale * w) // 2, (dp.height - scale * h) // 2)
        self.display_origin = (int(origin[0]), int(origin[1]))
        k = self.frontend.kernel_size
        self.margin_px = self._warp_margin + k // 2  # light the warp and the PSFs move stays
        m = self.margin_px
        self.padded_hw = (h + 2 * m, w + 2 * m)
        falloff = self.params.fabrication.illumination_falloff
        illum = illumination_map(self.display_shape[:2], falloff)
        self._illumination = self._padded_block(illum[None])[0]

    @property
    def _warp_margin(self) -> int:
        """Input pixels by which the misalignment can move light beyond the input grid."""
        fp, (h, w) = self.params.fabrication, self.grid_hw
        theta = math.radians(abs(fp.rotation_deg))
        reach = max(abs(fp.shift_px[0]), abs(fp.shift_px[1]))
        reach += (math.sin(theta) + 1 - math.cos(theta)) * max(h, w) / 2
        return math.ceil(reach) + 1

    def _padded_block(self, image: torch.Tensor) -> torch.Tensor:
        """The display pixels (C, s·Hp, s·Wp) under the padded input grid, zero off the display."""
        s, m, (hp, wp) = self.display_scale, self.margin_px, self.padded_hw
        x0, y0 = self.display_origin[0] - m * s, self.display_origin[1] - m * s
        out = image.new_zeros(image.shape[0], hp * s, wp * s)
        dh, dw = image.shape[-2:]
        ys, xs = slice(max(y0, 0), min(y0 + hp * s, dh)), slice(max(x0, 0), min(x0 + wp * s, dw))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[:, ys, xs]
        return out

    def _hot_pixel_map(self) -> torch.Tensor | None:
        """Extra dark electrons per frame (H, W): a seeded `hot_pixels` fraction of the pixels
        at 0.2 full well; None without hot pixels."""
        fraction, (fh, fw) = self.params.optics.hot_pixels, self.frame_shape
        count = round(fraction * fh * fw)
        rng = seeded_rng(self.params.fabrication.seed, HOT_PIXEL_SALT)
        self._hot_index = np.sort(rng.choice(fh * fw, count, replace=False)) if count else None
        if self._hot_index is None:
            return None
        dark = torch.zeros(fh * fw)
        dark[torch.from_numpy(self._hot_index)] = HOT_PIXEL_DARK * self.params.sensor.full_well_e
        return dark.reshape(fh, fw)

    def _build_renderer(self) -> None:
        """The sparse render matrix, kept only for the sensor pixels any light (or a hot pixel's
        dark signal) can reach: every other pixel sees the stray light alone."""
        full = self.geometry.render_matrix(self.margin_px)
        lit = np.flatnonzero(np.diff(full.indptr))
        if self._hot_index is not None:
            lit = np.union1d(lit, self._hot_index)
        self.lit_pixels = lit  # flat sensor indices
        self._hot_lit = np.isin(lit, self._hot_index) if self._hot_index is not None else None
        self.render_lit = full[lit]  # CSR (lit pixels, P·Hp·Wp)

    def seed_noise(self, key: int) -> None:
        """Restart the sensor noise from `key`: the same key, the same frames."""
        self.noise = np.random.default_rng(int(key) % 2**63)

    @property
    def display_shape(self) -> tuple[int, ...]:
        dp = self.params.display
        return (dp.height, dp.width) if self.designed.channels == 1 else (dp.height, dp.width, 3)

    def display_to_input(self, xy) -> np.ndarray:
        """Input-grid points (..., 2) of display points (x, y): block centres go to integers."""
        s, origin = self.display_scale, np.asarray(self.display_origin, np.float64)
        return (np.asarray(xy, np.float64) - origin - (s - 1) / 2) / s

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
        """Physical display levels (H_d, W_d) or (H_d, W_d, 3) in [0, 1]."""
        t = torch.as_tensor(np.asarray(levels, np.float32))
        self.levels = t[None] if t.ndim == 2 else t.permute(2, 0, 1)

    @torch.no_grad()
    def feature_maps(self) -> torch.Tensor:
        """F (P, Hp, Wp): what each sub-optic records on the padded input grid, light per input
        pixel, before the bench geometry images it onto the sensor."""
        s, (hp, wp) = self.display_scale, self.padded_hw
        block = self._padded_block(self.levels)
        emitted = display_response(block, self.params.display.gamma) * self._illumination
        binned = (emitted * self.light_level).reshape(-1, hp, s, wp, s).mean(dim=(2, 4))
        return self.frontend.intensities(binned[None], mode="same")[0]

    def _lit_signal(self) -> np.ndarray:
        """The glass's irradiance (before gain and stray light) at the reachable pixels."""
        return self.render_lit @ self.feature_maps().numpy().ravel()

    @torch.no_grad()
    def irradiance(self) -> torch.Tensor:
        """The noise-free irradiance (H, W) on the sensor, in units of a white field's PSF sum
        per input pixel (a sensor pixel holds ≈ F/(magnification·s)²)."""
        light = self.light_level
        frame = np.zeros(self.frame_shape[0] * self.frame_shape[1], np.float32)
        if light == 0:
            return torch.from_numpy(frame.reshape(self.frame_shape))
        frame[self.lit_pixels] = self._lit_signal() * self.fabrication.gain
        frame += self.fabrication.background * light
        return torch.from_numpy(frame.reshape(self.frame_shape))

    @torch.no_grad()
    def display_power(self) -> float:
        """Light leaving the display, relative to a full white field at full illumination."""
        emitted = self.fabrication.apply_to_display(self.levels) * self.light_level
        return float(emitted.mean())

    def capture(self, exposure_s: float) -> np.ndarray:
        """One noisy frame in DN (uint16, `frame_shape`) for the current display and light.

        Pixels that no light reaches this frame (and no hot pixel) all follow one distribution,
        drawn from a table; only the others take a Poisson draw each (`Sensor.draw`).
        """
        light = self.light_level
        base = self.fabrication.background * light
        if light == 0:
            index = self._hot_index if self._hot_index is not None else np.zeros(0, np.int64)
            irr = np.full(index.shape, base)
        else:
            signal = self._lit_signal()
            pick = signal > 0
            if self._hot_lit is not None:
                pick |= self._hot_lit
            index, irr = self.lit_pixels[pick], signal[pick] * self.fabrication.gain + base
        return self.sensor.draw(self.noise, self.frame_shape, base, index, irr, exposure_s)
