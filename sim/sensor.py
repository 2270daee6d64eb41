"""Camera sensor: irradiance → electrons → noisy, quantised digital numbers (DN).

`capture` draws frames; `mean_dn` and `var_dn` are the closed-form photon-transfer model that
calibration fits, so the two agree wherever a pixel is neither clipped nor saturated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sim.params import SensorParams


def _straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """Forward `value`, backward as `surrogate`: for steps whose own derivative is 0 a.e."""
    return surrogate + (value - surrogate).detach()


def _draw_device(like: Tensor, generator: torch.Generator | None) -> torch.device:
    """Draw where the generator lives, so a CPU seed gives the same numbers on any device."""
    return like.device if generator is None else generator.device


def _poisson(rate: Tensor, generator: torch.Generator | None) -> Tensor:
    source = rate.detach().clamp(min=0).to(_draw_device(rate, generator))
    return torch.poisson(source, generator=generator).to(rate.device)


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = _draw_device(like, generator)
    noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device)
    return noise.to(like.device)


class Sensor:
    """A linear pixel with shot, dark and read noise, a full well and an offset ADC."""

    def __init__(self, params: SensorParams) -> None:
        self.params = params

    @property
    def max_dn(self) -> int:
        return 2**self.params.bit_depth - 1

    @property
    def gain_e_per_dn(self) -> float:
        """Electrons per DN, chosen so that a full well lands exactly on the top code."""
        return self.params.full_well_e / (self.max_dn - self.params.black_level_dn)

    def _exposure(self, exposure_s: float | None) -> float:
        return self.params.exposure_s if exposure_s is None else exposure_s

    def electrons(self, irradiance: Tensor, exposure_s: float | None = None) -> Tensor:
        """Mean signal electrons (without dark signal) for relative irradiance ≥ 0."""
        return irradiance * (self.params.flux_e_per_s * self._exposure(exposure_s))

    def capture(
        self,
        irradiance: Tensor,
        generator: torch.Generator | None = None,
        exposure_s: float | None = None,
    ) -> Tensor:
        """One frame in DN (float tensor of integers), differentiable w.r.t. irradiance."""
        p = self.params
        rate = self.electrons(irradiance, exposure_s) + p.dark_e
        # Shot noise, straight-through: d(sample)/d(rate) := 1 = dE[sample]/d(rate).
        collected = _straight_through(_poisson(rate, generator), rate)
        # Full-well clip: zero gradient where saturated, as the physical pixel has.
        collected = collected.clamp(max=p.full_well_e)
        read = p.read_noise_e * _normal(collected, generator)
        dn = (collected + read) / self.gain_e_per_dn + p.black_level_dn
        # ADC rounding, straight-through: its derivative is 0 a.e., the mean response is linear.
        dn = _straight_through(torch.round(dn), dn)
        return dn.clamp(0, self.max_dn)

    def mean_dn(self, irradiance: Tensor, exposure_s: float | None = None) -> Tensor:
        """Expected DN, ignoring clipping: the offset plus signal and dark electrons over gain."""
        electrons = self.electrons(irradiance, exposure_s) + self.params.dark_e
        return self.params.black_level_dn + electrons / self.gain_e_per_dn

    def var_dn(self, irradiance: Tensor, exposure_s: float | None = None) -> Tensor:
        """DN variance, ignoring clipping: shot + dark + read noise, plus 1/12 for quantisation."""
        p = self.params
        electrons = self.electrons(irradiance, exposure_s) + p.dark_e
        return (electrons + p.read_noise_e**2) / self.gain_e_per_dn**2 + 1.0 / 12.0

    def saturated_fraction(self, frame_dn: Tensor) -> Tensor:
        """Fraction of pixels at the top code, per frame (reduces the last two dims)."""
        dtype = frame_dn.dtype if frame_dn.is_floating_point() else torch.get_default_dtype()
        return (frame_dn >= self.max_dn).to(dtype).mean(dim=(-2, -1))
