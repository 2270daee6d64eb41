"""Fabrication-error augmentation: the student trained through a freshly "fabricated" optic every
batch, so the design tolerates the glass it will become (gain, shift, rotation, PSF errors, noise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from hil.errors import UserError
from hil.models.onn import ONN
from hil.models.views import SharedView
from sim.fabrication import perturb_psfs, warp_image
from sim.fftconv import conv2d_direct, conv2d_fft
from sim.params import FabricationParams
from sim.psf_frontend import DIRECT_MAX_KERNEL, PSFFrontend, signed_combine

__all__ = ["FabricatedStudent", "FabricationAugment", "OpticDraw", "draw_optic"]


@dataclass(frozen=True)
class FabricationAugment:
    """Sizes of the fabrication errors drawn afresh for every training batch, in the paper's
    model y = α·(a shifted by β) ⊛ (k + δ) + ε:

    - α = 1 + gain·z (one gain per batch, floored at 0: light is not negative);
    - β ~ N(0, shift_px²) pixels along x and y, and a rotation ~ N(0, rotation_deg²) degrees, both
      applied with `sim.fabrication.warp_image` (bilinear, zeros outside) to the displayed image;
    - δ: every PSF pixel times max(0, 1 + kernel_error·z), `sim.fabrication.perturb_psfs`;
    - ε: Gaussian per feature-map pixel, std = noise x the RMS of that sample's clean maps.

    α, β and δ are one "fabricated optic" per batch (the whole batch passes through one piece
    of glass); ε is drawn per sample. Draws are seeded by `seed` and the batch's sample indices,
    so a resumed run sees the same optics as an uninterrupted one.
    """

    gain: float = 0.1
    shift_px: float = 0.5
    rotation_deg: float = 0.0
    kernel_error: float = 0.1
    noise: float = 0.01
    seed: int = 0

    @classmethod
    def from_fabrication(cls, params: FabricationParams, noise: float = 0.01, seed: int = 0):
        """Errors the size of a simulated bench's (`[sim.fabrication]`): the gain's distance
        from 1, the RMS of its shift per axis, its rotation and its kernel error."""
        return cls(
            gain=abs(1 - params.gain),
            shift_px=float(np.sqrt(np.mean(np.square(params.shift_px)))),
            rotation_deg=abs(params.rotation_deg),
            kernel_error=params.kernel_error,
            noise=noise,
            seed=seed,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OpticDraw:
    """One fabricated optic: gain α, shift β (x, y), rotation, PSF factor 1 + δ/k (or None)."""

    gain: float
    shift_px: tuple[float, float]
    rotation_deg: float
    psf_factor: torch.Tensor | None


def draw_optic(
    augment: FabricationAugment, psf_shape: tuple[int, ...] | None, generator: torch.Generator
) -> OpticDraw:
    """A random optic. A zero size leaves its part exactly as designed (gain 1.0, shift 0.0, no
    PSF factor), so an all-zero augmentation trains bit for bit as none."""
    z = torch.randn(4, generator=generator, dtype=torch.float64).tolist()
    factor = None
    if augment.kernel_error > 0 and psf_shape is not None:
        factor = perturb_psfs(torch.ones(psf_shape), augment.kernel_error, generator)
    return OpticDraw(
        gain=max(0.0, 1 + augment.gain * z[0]),
        shift_px=(augment.shift_px * z[1], augment.shift_px * z[2]),
        rotation_deg=augment.rotation_deg * z[3],
        psf_factor=factor,
    )


class FabricatedStudent(SharedView):
    """The ONN seen through a fabricated optic (`draw`) in training mode; the plain ONN in eval
    mode or with no draw. Same parameter names as the ONN, so checkpoints and `params` lists
    carry over, and gradients reach the designed PSFs through the perturbed ones.

    With noise, the training input carries each sample's ε draws (standard normal, one per
    feature-map pixel) as extra channels after the image's: the kernel of NTKD is taken one
    sample at a time inside vmap, where nothing random may be drawn, and this way every sample
    sees the same noise in the kernel as in the loss.
    """

    def __init__(self, onn: ONN, augment: FabricationAugment) -> None:
        super().__init__(onn)
        psf = isinstance(onn.frontend, PSFFrontend)
        if augment.kernel_error > 0 and not psf:
            raise UserError("kernel-error augmentation needs a PSF frontend (sim has no 4f δ)")
        self.augment = augment
        self.psf_shape = tuple(onn.frontend.psfs.shape) if psf else None
        self.draw: OpticDraw | None = None

    def redraw(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Draw the optic for the batch `idx` (its images `x`); returns the input to train on."""
        entropy = [self.augment.seed, *(int(i) for i in idx)]
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        self.draw = draw_optic(self.augment, self.psf_shape, gen)
        if self.augment.noise == 0:
            return x
        m, (h, w) = self.inner.spec.kernels, x.shape[-2:]
        z = torch.randn((len(x), m, h, w), generator=gen, dtype=x.dtype).to(x.device)
        return torch.cat([x, z], dim=1)

    def fabricated_features(self, x: torch.Tensor) -> torch.Tensor:
        """α·(x shifted by β) ⊛ (k + δ) + ε for a training input (image channels, then ε's)."""
        d, frontend, c = self.draw, self.inner.frontend, self.inner.spec.channels
        assert d is not None
        x, z = x[:, :c], x[:, c:]
        if d.shift_px != (0.0, 0.0) or d.rotation_deg != 0.0:
            x = warp_image(x, d.shift_px, d.rotation_deg)
        if d.psf_factor is None:
            y = frontend(x)
        else:
            psfs = frontend.psfs * d.psf_factor.to(frontend.psfs.device)
            kernels = signed_combine(psfs, dim=0) if frontend.signed else psfs
            conv = conv2d_direct if frontend.kernel_size <= DIRECT_MAX_KERNEL else conv2d_fft
            y = conv(x, kernels.to(x.dtype), "same")
        if d.gain != 1.0:
            y = y * d.gain
        if self.augment.noise > 0:
            rms = y.detach().square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            y = y + self.augment.noise * rms * z
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.draw is None:
            return self.inner(x)
        return self.inner.backend(self.fabricated_features(x))
