"""Scalar diffraction in physical units: angular spectrum propagation, pupils, lenses and PSFs.

Everything is torch and differentiable w.r.t. the fields, phases and amplitudes, batched over the
leading dimensions of (..., H, W) arrays. Lengths are converted to micrometres internally, so a
wavelength in nm, a pitch in µm and a distance in mm can be mixed freely at the call sites.

Grid convention: sample (i, j) of an (H, W) grid sits at y = (i - H//2)·pitch (rows, downwards)
and x = (j - W//2)·pitch (columns, to the right), so the optical axis is the index (H//2, W//2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import Tensor

_COMPLEX = {
    torch.float16: torch.complex32,
    torch.float32: torch.complex64,
    torch.float64: torch.complex128,
}


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype that holds a field of the given real (or complex) precision."""
    return dtype if dtype.is_complex else _COMPLEX[dtype]


def coordinates_um(
    shape: Sequence[int],
    pitch_um: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, x) sample positions as (H, 1) and (1, W) columns, origin at index (H//2, W//2)."""
    h, w = shape[-2], shape[-1]
    y = (torch.arange(h, dtype=dtype, device=device) - h // 2) * pitch_um
    x = (torch.arange(w, dtype=dtype, device=device) - w // 2) * pitch_um
    return y[:, None], x[None, :]


@functools.lru_cache(maxsize=8)
def _transfer_function(
    shape: tuple[int, int],
    wavelength_nm: float,
    pitch_um: float,
    distance_mm: float,
    dtype: torch.dtype,
    device: str,
) -> Tensor:
    """Band-limited angular spectrum transfer function in FFT order.

    Built in float64: the phase 2π·z·kz reaches ~1e6 rad for mm distances, which float32 cannot
    resolve to better than a tenth of a radian; it is reduced modulo 2π before the cast.

    Band limit (Matsushima & Shimobaba, Opt. Express 17, 19662, 2009): on a grid of extent L the
    transfer function is sampled every Δf = 1/L in frequency, and its local frequency
    z·fx / sqrt(1/λ² - fx²) must stay below 1/(2Δf) = L/2 or it aliases (the light would wrap
    around the window). That holds for |fx| ≤ 1 / (λ·sqrt((2z/L)² + 1)), and likewise for fy;
    components beyond it are dropped, as are the evanescent ones (fx² + fy² ≥ 1/λ²).

    Built outside inference mode: a cached inference tensor could not be saved for backward by
    a later, differentiable call.
    """
    with torch.inference_mode(False):
        return _build_transfer_function(shape, wavelength_nm, pitch_um, distance_mm).to(
            device=device, dtype=dtype
        )


def _build_transfer_function(
    shape: tuple[int, int], wavelength_nm: float, pitch_um: float, distance_mm: float
) -> Tensor:
    h, w = shape
    wavelength_um = wavelength_nm * 1e-3
    z_um = distance_mm * 1e3
    fy = torch.fft.fftfreq(h, d=pitch_um, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, d=pitch_um, dtype=torch.float64)[None, :]
    kz_sq = 1.0 / wavelength_um**2 - fx**2 - fy**2
    phase = torch.remainder(2 * math.pi * z_um * torch.sqrt(kz_sq.clamp(min=0.0)), 2 * math.pi)

    def limit(n: int) -> float:
        return 1.0 / (wavelength_um * math.sqrt((2 * z_um / (n * pitch_um)) ** 2 + 1))

    keep = (kz_sq > 0) & (fx.abs() <= limit(w)) & (fy.abs() <= limit(h))
    return torch.polar(keep.to(torch.float64), phase)


def angular_spectrum(
    field: Tensor,
    wavelength_nm: float,
    pitch_um: float,
    distance_mm: float,
    pad: bool = True,
) -> Tensor:
    """Propagate a complex field (..., H, W) by distance_mm (negative: backwards).

    pad=True embeds the field in a zero frame of at least twice its size so light that spreads
    beyond the window is lost instead of wrapping around onto the other side; the band limit is
    then computed for the padded window. The result is cropped back to the input grid.
    """
    field = field.to(complex_dtype(field.dtype))
    h, w = field.shape[-2:]
    hp, wp = (next_fast_len(2 * h), next_fast_len(2 * w)) if pad else (h, w)
    top, left = (hp - h) // 2, (wp - w) // 2
    padded = F.pad(field, (left, wp - w - left, top, hp - h - top))
    transfer = _transfer_function(
        (hp, wp),
        float(wavelength_nm),
        float(pitch_um),
        float(distance_mm),
        field.dtype,
        str(field.device),
    )
    out = torch.fft.ifft2(torch.fft.fft2(padded) * transfer)
    return out[..., top : top + h, left : left + w]


def aperture(
    shape: Sequence[int],
    pitch_um: float,
    diameter_um: float,
    kind: Literal["circle", "square"] = "circle",
    dtype: torch.dtype = torch.float32,
    supersample: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Transmission of a pupil of the given diameter (or side) centred on the optical axis.

    supersample=1 gives a binary pupil (a sample is open when its centre is inside); s > 1
    averages s×s sub-pixel samples, an anti-aliased pupil whose open area tracks diameter_um
    continuously instead of in whole pixels.
    """
    y, x = coordinates_um(shape, pitch_um, device=device)
    offsets = (torch.arange(supersample, dtype=torch.float64, device=device) + 0.5) / supersample
    offsets = (offsets - 0.5) * pitch_um
    ys = y[..., None, None] + offsets[:, None]
    xs = x[..., None, None] + offsets[None, :]
    radius = diameter_um / 2
    if kind == "circle":
        inside = ys**2 + xs**2 <= radius**2
    elif kind == "square":
        inside = (ys.abs() <= radius) & (xs.abs() <= radius)
    else:
        raise ValueError(f"aperture kind must be 'circle' or 'square', not {kind!r}")
    return inside.to(torch.float64).mean(dim=(-2, -1)).to(dtype)


def thin_lens_phase(
    shape: Sequence[int],
    pitch_um: float,
    wavelength_nm: float,
    focal_mm: float,
    center_um: tuple[float, float] = (0.0, 0.0),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Paraxial lens phase −π·r²/(λf) about center_um = (x, y); an off-axis centre tilts the
    wavefront, so the focus moves by the same offset. Not wrapped: the caller may wrap it."""
    y, x = coordinates_um(shape, pitch_um, device=device)
    cx, cy = center_um
    r_sq = (x - cx) ** 2 + (y - cy) ** 2
    phase = -math.pi * r_sq / (wavelength_nm * 1e-3 * focal_mm * 1e3)
    return phase.to(dtype)


def _bin_factor(pitch_um: float, sensor_pitch_um: float | None) -> int:
    if sensor_pitch_um is None:
        return 1
    ratio = sensor_pitch_um / pitch_um
    factor = round(ratio)
    if factor < 1 or abs(ratio - factor) > 1e-6 * ratio:
        raise ValueError(
            f"sensor_pitch_um={sensor_pitch_um} must be an integer multiple of pitch_um={pitch_um}"
        )
    return factor


def _window(size: int, kernel_size: int, factor: int) -> tuple[int, int, int]:
    """(start, pad_before, pad_after) of the kernel_size·factor samples that bin into the kernel.

    The centre sensor pixel (kernel_size//2) covers samples c - factor//2 .. c - factor//2 +
    factor - 1 about the axis c = size//2, i.e. it is centred on the axis for odd factors.
    """
    start = size // 2 - factor // 2 - (kernel_size // 2) * factor
    stop = start + kernel_size * factor
    return start, max(0, -start), max(0, stop - size)


def bin_and_crop(intensity: Tensor, kernel_size: int, factor: int = 1) -> Tensor:
    """Sum factor×factor blocks (area integration by sensor pixels) of a window centred on the
    axis, giving (..., kernel_size, kernel_size); regions outside the grid count as dark."""
    h, w = intensity.shape[-2:]
    top, pad_top, pad_bottom = _window(h, kernel_size, factor)
    left, pad_left, pad_right = _window(w, kernel_size, factor)
    padded = F.pad(intensity, (pad_left, pad_right, pad_top, pad_bottom))
    top, left = top + pad_top, left + pad_left
    n = kernel_size * factor
    window = padded[..., top : top + n, left : left + n]
    blocks = window.reshape(*window.shape[:-2], kernel_size, factor, kernel_size, factor)
    return blocks.sum(dim=(-3, -1))


def psf_from_phase(
    phase: Tensor,
    wavelength_nm: float,
    pitch_um: float,
    distance_mm: float,
    kernel_size: int,
    amplitude: Tensor | None = None,
    sensor_pitch_um: float | None = None,
    pad: bool = True,
) -> Tensor:
    """Intensity PSF (..., kernel_size, kernel_size) a phase mask casts on a sensor distance_mm
    behind it, for a unit plane wave through amplitude (default: fully open).

    Normalised by the incident power, so sum(psf) is the fraction of light that reaches the kernel
    window (≤ 1): losses at the window edge are physical and stay visible to training.
    """
    factor = _bin_factor(pitch_um, sensor_pitch_um)
    if amplitude is None:
        amplitude = torch.ones_like(phase)
    amplitude = amplitude.to(phase.dtype)
    field = amplitude * torch.exp(1j * phase)
    out = angular_spectrum(field, wavelength_nm, pitch_um, distance_mm, pad=pad)
    intensity = out.real**2 + out.imag**2
    psf = bin_and_crop(intensity, kernel_size, factor)
    power_in = torch.broadcast_to(amplitude**2, field.shape).sum(dim=(-2, -1))
    return psf / power_in[..., None, None]


@dataclass(frozen=True)
class MaskOptics:
    """The fixed optics a phase mask works in: one wavelength per colour channel, the mask's
    sampling, the sensor distance_mm behind it (binned to sensor_pitch_um when given) and an
    optional aperture of diameter_um in front."""

    wavelengths_nm: Sequence[float]
    mask_shape: tuple[int, int]
    pitch_um: float
    distance_mm: float
    kernel_size: int
    diameter_um: float | None = None
    sensor_pitch_um: float | None = None
    aperture_kind: Literal["circle", "square"] = "circle"


class PhaseMaskPSF(torch.nn.Module):
    """Trainable phase masks (P, C, Hm, Wm), one wavelength per colour channel, each casting a
    PSF on a sensor behind fixed optics; forward() gives the PSFs (P, C, K, K).

    The phase starts as a lens focused on the sensor (a spot: a well-conditioned start, and
    the PSF lies inside the kernel window) plus small seeded noise so the P masks differ.
    """

    def __init__(
        self,
        num_psfs: int,
        optics: MaskOptics,
        *,
        seed: int = 0,
        init_noise_rad: float = 0.1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        mask_shape, pitch_um, distance_mm = optics.mask_shape, optics.pitch_um, optics.distance_mm
        sensor_pitch_um = optics.sensor_pitch_um
        _bin_factor(pitch_um, sensor_pitch_um)  # fail at construction, not at the first forward
        self.wavelengths_nm = tuple(float(wl) for wl in optics.wavelengths_nm)
        self.pitch_um = float(pitch_um)
        self.distance_mm = float(distance_mm)
        self.kernel_size = int(optics.kernel_size)
        self.sensor_pitch_um = sensor_pitch_um
        lenses = torch.stack(
            [
                thin_lens_phase(mask_shape, pitch_um, wl, distance_mm, dtype=torch.float64)
                for wl in self.wavelengths_nm
            ]
        )
        generator = torch.Generator().manual_seed(seed)
        shape = (num_psfs, len(self.wavelengths_nm), *mask_shape)
        noise = torch.randn(shape, generator=generator, dtype=torch.float64) * init_noise_rad
        wrapped = torch.remainder(lenses + noise + math.pi, 2 * math.pi) - math.pi
        self.phase = torch.nn.Parameter(wrapped.to(dtype))
        pupil = None
        if optics.diameter_um is not None:
            kind = optics.aperture_kind
            pupil = aperture(mask_shape, pitch_um, optics.diameter_um, kind, dtype=dtype)
        self.register_buffer("amplitude", pupil)

    def forward(self) -> Tensor:
        psfs = [
            psf_from_phase(
                self.phase[:, c],
                wl,
                self.pitch_um,
                self.distance_mm,
                self.kernel_size,
                amplitude=self.amplitude,
                sensor_pitch_um=self.sensor_pitch_um,
            )
            for c, wl in enumerate(self.wavelengths_nm)
        ]
        return torch.stack(psfs, dim=1)
