"""A coherent 4f optical frontend with trainable Fourier-plane masks.

The image is shown on an amplitude SLM under coherent (laser) illumination, lens 1 Fourier
transforms it, a complex mask M_k per kernel filters the spectrum, lens 2 transforms back, and the
sensor records the intensity |u ⊛ h_k|², h_k = IFFT(M_k): a complex convolution followed by a
square-law nonlinearity, for free.

Conventions: the field amplitude is the image value (not its square root), so an all-pass mask
images I = image²; this keeps the optical layer a plain convolution of the displayed values and
lets signed inputs stand for a π phase. Lens 2 is taken as an inverse transform, i.e. the sensor
image is read out un-inverted. Fourier-plane arrays are centred: index (Hp//2, Wp//2) is the
optical axis (zero frequency), and index i sits at (i - Hp//2)·fourier_pitch_um.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import Tensor

from sim.propagation import complex_dtype

_RAW_LIMIT = 40.0  # sigmoid(±40) is exactly 1 (and ~4e-18) in float32 and float64


class Fourier4fFrontend(torch.nn.Module):
    """m trainable Fourier masks M_k = sigmoid(a_k)·exp(iφ_k) on a zero-padded frequency grid.

    The grid is next_fast_len(2H-1) × next_fast_len(2W-1) so every coherent kernel, whatever its
    extent, acts as a linear (not circular) convolution on the H×W output: offsets up to H-1 are
    all that reach it, and they do not alias on a grid of at least 2H-1 samples.

    The masks start near all-pass (amplitude ≈ 0.95, phase noise ~0.5 rad, seeded), so the
    untrained frontend images the input and the kernels differ only by their noise.
    """

    def __init__(
        self,
        kernels: int,
        image_size: tuple[int, int],
        wavelength_nm: float,
        pitch_um: float,
        focal_mm: float,
        seed: int = 0,
        init_phase_std_rad: float = 0.5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.wavelength_nm = float(wavelength_nm)
        self.pitch_um = float(pitch_um)
        self.focal_mm = float(focal_mm)
        h, w = self.image_size
        self.padded_size = (next_fast_len(2 * h - 1), next_fast_len(2 * w - 1))
        generator = torch.Generator().manual_seed(seed)
        shape = (kernels, *self.padded_size)
        raw = 3.0 + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        phase = init_phase_std_rad * torch.randn(shape, generator=generator, dtype=torch.float64)
        self.amplitude_raw = torch.nn.Parameter(raw.to(dtype))
        self.phase = torch.nn.Parameter(phase.to(dtype))

    @property
    def fourier_pitch_um(self) -> tuple[float, float]:
        """(row, column) sample pitch λf/(N·pitch) of the masks in the Fourier plane."""
        scale = self.wavelength_nm * 1e-3 * self.focal_mm * 1e3 / self.pitch_um
        return scale / self.padded_size[0], scale / self.padded_size[1]

    def fourier_mask(self) -> Tensor:
        """Complex masks M_k (m, Hp, Wp), centred layout; amplitude in [0, 1] (a passive mask)."""
        return torch.polar(torch.sigmoid(self.amplitude_raw), self.phase)

    @torch.no_grad()
    def set_fourier_mask(self, mask: Tensor) -> None:
        """Load complex masks (m, Hp, Wp), centred layout; |mask| is clipped to [0, 1]."""
        amplitude = mask.abs().to(torch.float64).clamp(0.0, 1.0)
        raw = torch.logit(amplitude).clamp(-_RAW_LIMIT, _RAW_LIMIT)
        self.amplitude_raw.copy_(raw)
        self.phase.copy_(torch.angle(mask.to(torch.complex128)))

    def coherent_kernels(self) -> Tensor:
        """Complex spatial kernels h_k = IFFT(M_k) (m, Hp, Wp), origin at (Hp//2, Wp//2)."""
        mask = torch.fft.ifftshift(self.fourier_mask(), dim=(-2, -1))
        return torch.fft.fftshift(torch.fft.ifft2(mask), dim=(-2, -1))

    def sensor_plane(self, x: Tensor) -> Tensor:
        """Intensity (N, m, Hp, Wp) on the whole padded sensor plane, image centred in it."""
        h, w = self.image_size
        if x.shape[-3:] != (1, h, w):
            raise ValueError(f"expected images (N, 1, {h}, {w}), got {tuple(x.shape)}")
        hp, wp = self.padded_size
        top, left = (hp - h) // 2, (wp - w) // 2
        field = x.to(complex_dtype(self.phase.dtype))
        field = F.pad(field, (left, wp - w - left, top, hp - h - top))
        mask = torch.fft.ifftshift(self.fourier_mask(), dim=(-2, -1))
        out = torch.fft.ifft2(torch.fft.fft2(field) * mask)  # (N, 1, .) * (m, .) -> (N, m, .)
        return out.real**2 + out.imag**2

    def forward(self, x: Tensor) -> Tensor:
        """Sensor intensity (N, m, H, W) on the image's own footprint ("same" convolution)."""
        h, w = self.image_size
        hp, wp = self.padded_size
        top, left = (hp - h) // 2, (wp - w) // 2
        return self.sensor_plane(x)[..., top : top + h, left : left + w]

    def extra_repr(self) -> str:
        pitch = ", ".join(f"{p:.3g}" for p in self.fourier_pitch_um)
        return (
            f"kernels={self.phase.shape[0]}, image_size={self.image_size}, "
            f"padded_size={self.padded_size}, fourier_pitch_um=({pitch}), "
            f"wavelength_nm={self.wavelength_nm}, focal_mm={self.focal_mm}"
        )
