"""Camera sensor: irradiance → electrons → noisy, quantised digital numbers (DN).

`capture` draws frames (differentiably, in torch); `draw` draws the same distribution fast for
the simulated camera; `mean_dn` and `var_dn` are the closed-form photon-transfer model that
calibration fits, so they agree wherever a pixel is neither clipped nor saturated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtr
from scipy.stats import poisson
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


_TABLE_MAX = 4_000_000  # Poisson counts × DN codes beyond which `draw` tabulates nothing
_GUIDE_BITS = 16  # guide table of the inverse CDF: 2**16 bins of the unit interval
_OPEN = 65535  # a guide bin that straddles a CDF step (or the top 16-bit code): search it


class Sensor:
    """A linear pixel with shot, dark and read noise, a full well and an offset ADC.

    `dark_map_e` (H, W), if given, is extra dark signal per pixel and frame (hot pixels), on top
    of `dark_e`: it enters every frame-shaped draw and the photon-transfer model alike.
    """

    def __init__(self, params: SensorParams, dark_map_e: Tensor | None = None) -> None:
        self.params = params
        self.dark_map_e = dark_map_e
        self._tables: dict[float, tuple[int, np.ndarray, np.ndarray]] = {}

    def dark_electrons(self, like: Tensor) -> Tensor | float:
        """Mean dark electrons per pixel for frames shaped like `like` (broadcast)."""
        if self.dark_map_e is None:
            return self.params.dark_e
        return self.params.dark_e + self.dark_map_e.to(like.dtype)

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
        rate = self.electrons(irradiance, exposure_s) + self.dark_electrons(irradiance)
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
        electrons = self.electrons(irradiance, exposure_s) + self.dark_electrons(irradiance)
        return self.params.black_level_dn + electrons / self.gain_e_per_dn

    def var_dn(self, irradiance: Tensor, exposure_s: float | None = None) -> Tensor:
        """DN variance, ignoring clipping: shot + dark + read noise, plus 1/12 for quantisation."""
        p = self.params
        electrons = self.electrons(irradiance, exposure_s) + self.dark_electrons(irradiance)
        return (electrons + p.read_noise_e**2) / self.gain_e_per_dn**2 + 1.0 / 12.0

    def saturated_fraction(self, frame_dn: Tensor) -> Tensor:
        """Fraction of pixels at the top code, per frame (reduces the last two dims)."""
        dtype = frame_dn.dtype if frame_dn.is_floating_point() else torch.get_default_dtype()
        return (frame_dn >= self.max_dn).to(dtype).mean(dim=(-2, -1))

    # -- fast exact draws for the simulated camera (numpy, no gradient) -------------------

    def draw(
        self,
        rng: np.random.Generator,
        shape: tuple[int, int],
        base: float,
        index: np.ndarray,
        irradiance: np.ndarray,
        exposure_s: float | None = None,
    ) -> np.ndarray:
        """One frame (H, W) of DN (uint16) where every pixel has irradiance `base` except the
        flat `index` pixels, which have `irradiance`; every hot pixel must be among them.

        The same distribution as `capture`, drawn fast: a pixel at `base` without extra dark
        has one fixed distribution of DN codes, drawn from a table by its inverse CDF with one
        uniform number; only the other pixels go through Poisson and Gaussian draws.
        """
        size = shape[0] * shape[1]
        rate0 = float(self.electrons(base, exposure_s)) + self.params.dark_e
        table = self._code_table(rate0)
        if table is None:  # no table worth making: every pixel its own draw
            full = np.full(size, base, np.float64)
            full[index] = irradiance
            index, irradiance, frame = np.arange(size), full, np.empty(size, np.uint16)
        else:
            frame = _inverse_cdf_draw(rng, size, *table)
        rate = self.electrons(np.asarray(irradiance, np.float64), exposure_s) + self.params.dark_e
        if self.dark_map_e is not None:
            rate = rate + self.dark_map_e.numpy().ravel()[index]
        frame[index] = self._dn_of_rate(rng, rate)
        return frame.reshape(shape)

    def _dn_of_rate(self, rng: np.random.Generator, rate: np.ndarray) -> np.ndarray:
        """`capture`'s steps in numpy: shot noise, full well, read noise, offset ADC."""
        p = self.params
        collected = np.minimum(rng.poisson(np.maximum(rate, 0.0)), p.full_well_e)
        read = p.read_noise_e * rng.standard_normal(rate.shape)
        dn = np.rint((collected + read) / self.gain_e_per_dn + p.black_level_dn)
        return np.clip(dn, 0, self.max_dn).astype(np.uint16)

    def _code_table(self, rate: float) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(first code, CDF over codes, guide table) of one pixel's DN at a mean of `rate`
        electrons; None when the table would be too large to be worth it. Cached per rate."""
        if rate not in self._tables:
            if len(self._tables) > 16:
                self._tables.clear()
            self._tables[rate] = self._tabulate(rate)
        return self._tables[rate]

    def _tabulate(self, rate: float) -> tuple[int, np.ndarray, np.ndarray] | None:
        p, g = self.params, self.gain_e_per_dn
        values, probs = _clipped_poisson(rate, p.full_well_e)
        sigma = p.read_noise_e
        lo = math.floor((values[0] - 10 * sigma) / g + p.black_level_dn) - 1
        hi = math.ceil((values[-1] + 10 * sigma) / g + p.black_level_dn) + 1
        lo, hi = max(lo, 0), min(hi, self.max_dn)
        if values.size * (hi - lo + 1) > _TABLE_MAX:
            return None
        codes = np.arange(lo, hi + 1)
        upper = (codes + 0.5 - p.black_level_dn) * g  # electrons rounding to ≤ code
        if sigma > 0:
            below = ndtr((upper[None, :] - values[:, None]) / sigma)
        else:  # no read noise: round exactly as `_dn_of_rate` does
            dn = np.clip(np.rint(values / g + p.black_level_dn), 0, self.max_dn)
            below = (dn[:, None] <= codes[None, :]).astype(np.float64)
        cdf = probs @ below
        cdf[-1] = 1.0  # the top code collects what is above; the bottom what is below
        cdf = np.maximum.accumulate(np.clip(cdf, 0.0, 1.0))
        bins = np.arange(2**_GUIDE_BITS) / 2**_GUIDE_BITS
        first = np.searchsorted(cdf, bins, side="right")  # the code at a bin's start, and at
        last = np.searchsorted(cdf, bins + 2.0**-_GUIDE_BITS, side="left")  # its end
        guide = np.where(first == np.minimum(last, cdf.size - 1), lo + first, _OPEN)
        return lo, cdf, guide.astype(np.uint16)


def _clipped_poisson(rate: float, full_well: float) -> tuple[np.ndarray, np.ndarray]:
    """Values min(N, full well) of N ~ Poisson(rate) and their probabilities, tails < 1e-17
    (below float64's step) left out (the full well collects all the mass above it)."""
    # Chernoff bounds: P(N ≤ λ − t) ≤ exp(−t²/2λ), P(N ≥ λ + t) ≤ exp(−t²/(2(λ + t/3))),
    # both below 1e-17 at these t
    cap, spread = math.ceil(full_well), 9 * math.sqrt(rate)
    n_lo, n_hi = max(0, math.floor(rate - spread)), math.ceil(rate + spread + 30)
    if n_lo >= cap:
        return np.array([float(full_well)]), np.array([1.0])
    n = np.arange(n_lo, min(n_hi, cap) + 1)
    probs = poisson.pmf(n, rate)
    if n[-1] == cap:
        probs[-1] = poisson.sf(cap - 1, rate)
    values = np.minimum(n, full_well).astype(np.float64)
    return values, probs / probs.sum()


def _inverse_cdf_draw(rng: np.random.Generator, size: int, lo: int, cdf, guide) -> np.ndarray:
    """`size` codes lo + i with P(≤ lo + i) = cdf[i], one uniform u each: the guide table (by
    u's leading bits) answers most outright, a binary search the few in bins that straddle a
    step of the CDF. u is `rng.random()`'s double, from the same raw 64 bits."""
    raw = rng.bit_generator.random_raw(size)
    code = np.take(guide, (raw >> np.uint64(64 - _GUIDE_BITS)).view(np.intp))
    open_ = np.flatnonzero(code == _OPEN)
    u = (raw[open_] >> np.uint64(11)) * 2.0**-53
    code[open_] = lo + np.searchsorted(cdf, u, side="right")
    return code
