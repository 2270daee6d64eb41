"""Parameters of the simulated optics, sensor and display: what the simulated world really does.

These pydantic models are the `[sim.*]` sections of a bench file: `hil.bench.config` composes
them, and the physics in `sim/` takes them directly, so a key has one name, one default and
one bound. What was designed (the `[frontend]` section) is not here: the world is built from the
design, which real and simulated benches share.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


def _no_bool(value: Any, annotation: Any) -> None:
    """pydantic reads true as 1 for a number; a bench file that says so is a mistake."""
    if isinstance(value, bool) and annotation not in (bool, bool | None):
        raise ValueError("a number, not true/false")
    if isinstance(value, list | tuple):
        for v in value:
            _no_bool(v, None)


class Section(BaseModel):
    """A bench-file section: unknown keys, inf, nan and true/false for numbers are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        _no_bool(value, cls.model_fields[info.field_name].annotation)
        return value


_Shift = Annotated[float, Field(ge=-1e3, le=1e3)]


class FabricationParams(Section):
    """How the fabricated optic differs from its design: y = α·(a shifted by β) ⊛ (k + δ) + ε."""

    gain: float = Field(0.9, gt=0, le=100, description="brightness gain α of the fabricated optic")
    shift_px: tuple[_Shift, _Shift] = Field(
        (1.4, -0.8), description="image-on-kernel misalignment β (x, y) in pixels"
    )
    rotation_deg: float = Field(0.6, ge=-45, le=45, description="image rotation on the kernels")
    kernel_error: float = Field(0.1, ge=0, le=1, description="relative kernel fabrication error δ")
    kernel_error_corr_px: float = Field(
        0.0, ge=0, le=20, description="correlation length of δ in pixels (0: independent pixels)"
    )
    kernel_blur_px: float = Field(0.5, ge=0, le=20, description="Gaussian blur σ of the PSFs")
    background: float = Field(
        0.01, ge=0, le=1, description="stray light, as a fraction of a white field's peak"
    )
    illumination_falloff: float = Field(
        0.05, ge=0, lt=1, description="relative illumination drop at the display's corners"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random fabrication errors")


MAX_SENSOR_PIXELS = 2**25  # 8192 x 4096: larger than any scientific CMOS a bench here uses


class SensorParams(Section):
    """The camera sensor: photons to electrons to digital numbers."""

    bit_depth: int = Field(12, ge=8, le=16, description="ADC bits")
    full_well_e: float = Field(10000.0, gt=0, le=1e7, description="full-well capacity in electrons")
    read_noise_e: float = Field(3.0, ge=0, le=1e4, description="read noise σ in electrons")
    dark_e: float = Field(5.0, ge=0, le=1e7, description="mean dark signal per frame in electrons")
    black_level_dn: int = Field(
        32, ge=0, le=2**15, description="ADC offset in DN, keeps read noise unclipped"
    )
    exposure_s: float = Field(0.01, gt=0, le=60, description="exposure time in seconds")
    fps_limit: float = Field(
        120.0, gt=0, le=1e4, description="maximum frame rate in frames per second"
    )
    flux_e_per_s: float = Field(
        1.0e6, gt=0, le=1e15, description="electrons per second per pixel for unit irradiance"
    )
    width: int | None = Field(
        None, ge=1, le=8192, description="sensor width in pixels; default: just fits the tiles"
    )
    height: int | None = Field(
        None, ge=1, le=8192, description="sensor height in pixels; default: just fits the tiles"
    )

    @model_validator(mode="after")
    def _a_sensor_the_simulation_can_run(self) -> SensorParams:
        pixels = (self.width or 1) * (self.height or 1)
        if pixels > MAX_SENSOR_PIXELS:  # 8192² took 12 s to set up, 268 MB per float32 frame
            raise ValueError(
                f"width x height {self.width} x {self.height} is {pixels / 1e6:.0f} MP; the "
                f"simulated sensor takes at most {MAX_SENSOR_PIXELS / 1e6:.1f} MP"
            )
        if self.black_level_dn >= 2**self.bit_depth // 2:
            raise ValueError(
                f"black_level_dn {self.black_level_dn} leaves no room for signal in "
                f"{self.bit_depth} bits; keep it below {2**self.bit_depth // 2}"
            )
        return self


class DisplayParams(Section):
    """The display or SLM that shows the input images."""

    width: int = Field(32, ge=1, le=8192, description="width in pixels")
    height: int = Field(32, ge=1, le=8192, description="height in pixels")
    gamma: float = Field(2.2, gt=0, le=5, description="emitted intensity = value ** gamma")
    bit_depth: int = Field(8, ge=1, le=16, description="bits per pixel the display accepts")


_Pitch = Annotated[float, Field(gt=0, le=1e5)]
_Position = Annotated[float, Field(ge=-1e5, le=1e5)]


class OpticsParams(Section):
    """Where the glass images each sub-optic on the sensor: the bench's physical geometry.

    Sensor px per physical display px, a grid of tile centres that may be rotated, jittered,
    distorted and vignetted, and hot pixels; see the geometry spec in `sim.bench_geometry`.
    """

    magnification: float = Field(
        1.0,
        ge=-100,
        le=100,
        description="sensor px per physical display px (negative: inverted image), |m| ≥ 0.01",
    )
    tile_pitch_px: tuple[_Pitch, _Pitch] | None = Field(
        None, description="[x, y] sensor px between tile centres; default: packed with the gap"
    )
    grid_center_px: tuple[_Position, _Position] | None = Field(
        None, description="[x, y] sensor px of the tile grid's centre; default: sensor centre"
    )
    grid_rotation_deg: float = Field(
        0.0, ge=-180, le=180, description="rotation of the tile grid and every image (ccw)"
    )
    tile_jitter_px: float = Field(
        0.0, ge=0, le=1e4, description="σ in sensor px of each tile centre's random offset"
    )
    distortion_k1: float = Field(
        0.0, ge=-0.3, le=0.3, description="radial distortion k1 at the grid's half-diagonal"
    )
    tile_vignetting: float = Field(
        0.0, ge=0, le=0.9, description="relative irradiance drop at each tile's corners"
    )
    hot_pixels: float = Field(
        0.0, ge=0, le=0.01, description="fraction of pixels with 0.2 full well of extra dark"
    )

    @field_validator("magnification")
    @classmethod
    def _magnification_not_tiny(cls, m: float) -> float:
        if not math.isfinite(m) or abs(m) < 0.01:
            raise ValueError(f"|magnification| must be in [0.01, 100], got {m}")
        return m


class SimParams(Section):
    """The simulated bench: its fabricated glass, sensor and display, or a replayed calibration."""

    replay: str | None = Field(
        None, description="calibration file (HDF5) whose measured bench to replay instead"
    )
    fabrication: FabricationParams = FabricationParams()
    sensor: SensorParams = SensorParams()
    display: DisplayParams = DisplayParams()
    optics: OpticsParams = OpticsParams()
