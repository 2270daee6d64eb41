"""The incoherent PSF-engineered frontend: a meta-optic whose PSFs are the convolution kernels.

Under incoherent light each sub-optic records `intensity ⊛ PSF`; PSFs are non-negative, so a signed
kernel is a positive and a negative PSF whose tiles are subtracted after capture. The same module is
the ONN's trainable first layer and the simulated bench's fixed (fabricated) glass.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sim.fftconv import Mode, conv2d_direct, conv2d_fft, fft_shape, kernel_spectrum

# On a CPU oneDNN's direct convolution beats FFT for small kernels, and for every kernel size when
# no gradient is needed; FFT wins for large kernels in training (benchmarks/optics_speed.py).
DIRECT_MAX_KERNEL = 11


def signed_combine(maps: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Interleaved ± maps (2m along `dim`) → m signed maps, positive minus negative."""
    pairs = maps.unflatten(dim, (-1, 2))
    axis = dim + 1 if dim >= 0 else dim
    return pairs.select(axis, 0) - pairs.select(axis, 1)


def split_signed(kernels: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Signed kernels (m, C, k, k) → interleaved non-negative PSF pairs (2m, C, k, k).

    `floor` adds the same light to both PSFs of a pair: it cancels in the subtraction, and keeps a
    softplus parametrisation away from its flat zero.
    """
    pos, neg = kernels.clamp_min(0) + floor, (-kernels).clamp_min(0) + floor
    return torch.stack([pos, neg], dim=1).flatten(0, 1)


def normalise_energy(psfs: torch.Tensor) -> torch.Tensor:
    """Scale PSFs so the brightest one passes all incident light: a passive optic gains none."""
    return psfs / psfs.sum(dim=(-2, -1)).amax().clamp_min(torch.finfo(psfs.dtype).tiny)


SEPARABLE_FROM = 63  # kernel side above which the 2-D smoothing would take seconds


def random_kernels(
    kernels: int, channels: int, size: int, generator: torch.Generator, dtype=torch.float32
) -> torch.Tensor:
    """Smooth random signed kernels (m, C, k, k): white noise low-passed and windowed to a disc."""
    noise = torch.randn(kernels * channels, 1, size, size, generator=generator, dtype=dtype)
    sigma = max(size / 8, 0.5)
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    if size <= SEPARABLE_FROM:  # the designs every existing seed made, bit for bit
        smooth = conv2d_direct(noise, (g[:, None] * g[None, :])[None, None], mode="same")
    else:  # the Gaussian is separable: two 1-D passes, O(k³) rather than O(k⁴)
        lo = (size - 1) // 2
        padded = F.pad(noise, (lo, size - 1 - lo, lo, size - 1 - lo))
        smooth = F.conv2d(F.conv2d(padded, g.reshape(1, 1, -1, 1)), g.reshape(1, 1, 1, -1))
    window = ((r[:, None] ** 2 + r[None, :] ** 2) <= ((size + 1) / 2) ** 2).to(dtype)
    k = (smooth * window).reshape(kernels, channels, size, size)
    return k / k.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)


class PSFFrontend(nn.Module):
    """m kernels as non-negative PSFs (2m interleaved ± PSFs when signed) over C input channels.

    `psfs` gives fixed or initial PSFs (P, C, k, k); otherwise a seeded random design. Trainable
    PSFs are stored as softplus pre-activations so that they stay non-negative under any optimiser.
    """

    def __init__(
        self,
        kernels: int,
        kernel_size: int,
        channels: int = 1,
        signed: bool = True,
        *,
        psfs: torch.Tensor | None = None,
        trainable: bool = True,
        seed: int = 0,
        method: Literal["auto", "fft", "direct"] = "auto",
    ) -> None:
        super().__init__()
        self.kernels, self.kernel_size = int(kernels), int(kernel_size)
        self.channels, self.signed, self.method = int(channels), bool(signed), method
        expected = (self.n_psfs, self.channels, self.kernel_size, self.kernel_size)
        if psfs is None:
            gen = torch.Generator().manual_seed(seed)
            k = random_kernels(self.kernels, self.channels, self.kernel_size, gen)
            psfs = split_signed(k, floor=0.05) if signed else k.abs() + 0.05
            psfs = normalise_energy(psfs)
        psfs = torch.as_tensor(psfs, dtype=torch.get_default_dtype()).detach().clone()
        if tuple(psfs.shape) != expected:
            raise ValueError(f"PSFs must have shape {expected}, got {tuple(psfs.shape)}")
        if (psfs < 0).any():
            raise ValueError("PSFs are intensities and must be non-negative")
        if trainable:
            tiny = torch.finfo(psfs.dtype).tiny
            self.raw = nn.Parameter(
                psfs.clamp_min(1e-6) + torch.log(-torch.expm1(-psfs.clamp_min(tiny)))
            )
        else:
            self.register_buffer("fixed", psfs)
        self._spectra: dict = {}

    @property
    def n_psfs(self) -> int:
        return 2 * self.kernels if self.signed else self.kernels

    @property
    def psfs(self) -> torch.Tensor:
        """The non-negative PSFs (P, C, k, k), interleaved ± when signed."""
        return F.softplus(self.raw) if hasattr(self, "raw") else self.fixed

    @property
    def kernel(self) -> torch.Tensor:
        """The effective kernels (m, C, k, k) the frontend convolves with."""
        return signed_combine(self.psfs, dim=0) if self.signed else self.psfs

    def _convolve(self, x: torch.Tensor, which: str, mode: Mode) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"input must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        kernels = self.psfs if which == "psfs" else self.kernel
        training = torch.is_grad_enabled() and (kernels.requires_grad or x.requires_grad)
        direct = self.method == "direct" or (
            self.method == "auto" and (self.kernel_size <= DIRECT_MAX_KERNEL or not training)
        )
        if direct:
            return conv2d_direct(x, kernels.to(x.dtype), mode)
        return conv2d_fft(x, kernels, mode, spectrum=self._spectrum(x, kernels, which, mode))

    def _spectrum(self, x, kernels, which: str, mode: Mode) -> torch.Tensor | None:
        """Cached kernel spectrum while the PSFs are fixed; None (recompute) while they train."""
        if kernels.requires_grad and torch.is_grad_enabled():
            return None
        source = self.raw if hasattr(self, "raw") else self.fixed
        shape = fft_shape(tuple(x.shape[-2:]), (self.kernel_size, self.kernel_size), mode)
        key = (which, shape, x.dtype, x.device, source._version, source.data_ptr())
        if key not in self._spectra:
            self._spectra.clear()
            self._spectra[key] = kernel_spectrum(kernels.detach().to(x.dtype), shape)
        return self._spectra[key]

    def intensities(self, x: torch.Tensor, mode: Mode = "same") -> torch.Tensor:
        """What each sub-optic records: x (N, C, H, W) ⊛ every PSF → (N, P, Ho, Wo)."""
        return self._convolve(x, "psfs", mode)

    def forward(self, x: torch.Tensor, mode: Mode = "same") -> torch.Tensor:
        """Feature maps (N, m, Ho, Wo); by linearity a ± pair takes one convolution, not two."""
        return self._convolve(x, "kernel", mode)
