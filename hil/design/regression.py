"""The pieces of the NTK regression estimate (`hil.design.estimate`): kernel ridge regression
over a λ grid, the kernel in memory-bounded passes, the pooled-patch shortcut for fc backends and
the captured maps' sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from hil.models.onn import ONN, StudentSpec, pool_size
from hil.ntkd.factored import factored_ntk
from sim.fftconv import conv2d_direct
from sim.params import SensorParams

__all__ = [
    "DEFAULT_NOISE",
    "EXPOSURE_FILL",
    "MEMORY_BYTES",
    "POOLED_BLOCK",
    "KernelRegression",
    "MapNoise",
    "PooledONN",
    "bin_px",
    "noisy_inputs",
    "ntk_blocks",
    "pooled_patches",
    "samples_per_pass",
]


MEMORY_BYTES = 3 * 2**30  # per Jacobian pass, see samples_per_pass
EXPOSURE_FILL = 0.7  # white field at 70% of full scale: calibration.pipeline.Plan.target_fill
NOISE_SEED = 7919  # draws of map noise: seed s of an initialisation uses NOISE_SEED + s
POOLED_BLOCK = 4096  # samples per Jacobian pass on pooled patches (~60 kB each at 16 kernels)


class KernelRegression:
    """Kernel ridge regression for a whole λ grid from one eigendecomposition of Θ(X_tr, X_tr).

    ``alpha(λ) = U diag(1/(e + λ)) Uᵀ (Y - ȳ)``; predictions ``ȳ + Θ(X, X_tr) alpha``.
    """

    def __init__(self, k_train: Tensor, y_train: Tensor, centre: bool = True) -> None:
        k = k_train.double()
        y = y_train.double()
        k = (k + k.T) / 2  # float32 Jacobian products are symmetric only to rounding
        self.mean = y.mean(0, keepdim=True) if centre else torch.zeros_like(y[:1])
        self.scale = float(k.diagonal().mean())
        # One thread: the tridiagonal reduction is ~N dependent BLAS-2 steps, so a second thread
        # gains little, and on shared cores each step's barrier can wait out a time slice
        # (1078 samples, 2 busy cores: 0.16-0.3 s on one thread, 0.6-4 s on two).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.eigvals, self.eigvecs = torch.linalg.eigh(k)
        finally:
            torch.set_num_threads(threads)
        self.proj = self.eigvecs.T @ (y - self.mean)

    def alpha(self, lam: float) -> Tensor:
        return self.eigvecs @ (self.proj / (self.eigvals + lam)[:, None])

    def predict(self, k_eval: Tensor, lam: float) -> Tensor:
        """Predictions for rows of ``k_eval`` = Θ(X, X_tr), with absolute ridge ``lam``."""
        return self.mean + k_eval.double() @ self.alpha(lam)


def samples_per_pass(spec: StudentSpec, memory_bytes: int = MEMORY_BYTES) -> int:
    """How many samples one Jacobian pass may hold within ``memory_bytes``.

    vmap over jacrev keeps, per sample, about 1.6 x (classes x PSFs x channels x H x W) float32
    cotangents of the frontend (measured: 2.1 MB per sample at 16 signed kernels on 32x32, 10
    classes), counted here as 2 x for headroom; the kernel and the parameter Jacobians are small
    beside it.
    """
    psfs = spec.kernels * (2 if spec.signed else 1)
    per = 2 * 4 * spec.classes * psfs * spec.channels * spec.image_size**2
    return max(16, int(memory_bytes // per))


def pooled_patches(images: Tensor, kernel_size: int, pool: int, block: int = 256) -> Tensor:
    """(N, pool², C·k²): every sample's pooled map under each single-pixel kernel.

    The frontend is linear in its kernel and the fc backends average-pool its maps before
    anything else (`MapAffine` commutes with the pooling), so a pooled map is exactly this times
    the flattened kernel. The NTK is then taken on a pool² x C·k² input instead of the
    full-resolution image: the same kernel (to float rounding), and the Jacobian of the
    frontend no longer carries a classes x PSFs x H x W cotangent per sample.
    """
    c, k = images.shape[1], int(kernel_size)
    eye = torch.eye(c * k * k, dtype=images.dtype).reshape(c * k * k, c, k, k)
    out = []
    for i in range(0, len(images), block):
        maps = conv2d_direct(images[i : i + block], eye, "same")  # the frontend's convolution
        out.append(nn.functional.adaptive_avg_pool2d(maps, pool).flatten(2).transpose(1, 2))
    return torch.cat(out)


def bin_px(size: int, pool: int) -> Tensor:
    """Pixels in each of the pool x pool bins of `AdaptiveAvgPool2d` on a size x size map."""
    edges = [(math.floor(i * size / pool), math.ceil((i + 1) * size / pool)) for i in range(pool)]
    side = torch.tensor([b - a for a, b in edges], dtype=torch.float64)
    return (side[:, None] * side[None, :]).flatten()


class PooledONN(nn.Module):
    """The PSF ONN with an fc backend as a function of `pooled_patches` and pooled map noise.

    Input (N, pool², C·k² + m): the patches, then one additive noise value per pooled map value
    (zeros without noise), so each sample carries its own draw into the per-sample Jacobians.
    Same parameter objects and names as the ONN, so its NTK is the ONN's.
    """

    def __init__(self, onn: ONN) -> None:
        super().__init__()
        self.frontend, self.backend = onn.frontend, onn.backend
        self.pool = pool_size(onn.spec.image_size)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.frontend.kernel.flatten(1)  # (m, C·k²)
        z = x[..., : kernel.shape[1]] @ kernel.T + x[..., kernel.shape[1] :]
        return self.backend(z.transpose(-1, -2).unflatten(-1, (self.pool, self.pool)))


@dataclass(frozen=True)
class MapNoise:
    """Sensor noise in captured feature maps, in the design's units (unit = a white display
    through the brightest designed PSF, as `hil capture` returns them).

    Calibration sets the exposure so that the white field fills ``EXPOSURE_FILL`` of the usable
    range (`calibration.photometry.find_exposure`): one design unit is then ``e_per_unit`` =
    fill x full well electrons, whatever the light source, sub-optic size or kernel count, until
    the exposure hits its limit. A pixel of irradiance I has variance (E·I + floor)/E² (shot noise,
    and dark shot + read noise + ADC rounding); a signed map subtracts two tiles, so the variances
    add; pooling a bin of n independent pixels divides by n. Each captured sample gets one draw.
    """

    e_per_unit: float
    floor_e2: float

    @classmethod
    def from_sensor(cls, sensor: SensorParams, fill: float = EXPOSURE_FILL) -> MapNoise:
        e_per_dn = sensor.full_well_e / (2**sensor.bit_depth - 1 - sensor.black_level_dn)
        floor = sensor.dark_e + sensor.read_noise_e**2 + e_per_dn**2 / 12
        return cls(fill * sensor.full_well_e, floor)

    def std(self, light: Tensor, bin_px: Tensor, signed: bool) -> Tensor:
        """Std of pooled maps (N, m, Q) from pooled tile irradiance ``light`` (N, P, Q)."""
        e = self.e_per_unit
        var = (e * light.double().clamp_min(0) + self.floor_e2) / (e * e * bin_px)
        return (var[:, 0::2] + var[:, 1::2] if signed else var).sqrt()

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_NOISE = MapNoise.from_sensor(SensorParams())


def noisy_inputs(
    model: ONN, patches: Tensor, noise: MapNoise | None, bins: Tensor, seed: int
) -> tuple[Tensor, float]:
    """`PooledONN` inputs for ``patches`` with one noise draw per sample, and the maps' SNR
    (RMS of the clean pooled maps over the RMS noise); inf without noise."""
    m = model.spec.kernels
    if noise is None:
        return torch.cat([patches, patches.new_zeros(*patches.shape[:2], m)], -1), math.inf
    with torch.no_grad():
        psfs = model.frontend.psfs.flatten(1)  # (P, C·k²)
        std = noise.std(torch.einsum("nqj,pj->npq", patches, psfs), bins, model.spec.signed)
        gen = torch.Generator().manual_seed(NOISE_SEED + seed)
        draw = (std * torch.randn(std.shape, generator=gen, dtype=std.dtype)).to(patches.dtype)
        clean = torch.einsum("nqj,mj->nmq", patches, model.frontend.kernel.flatten(1))
    snr = float(clean.double().pow(2).mean().sqrt() / std.pow(2).mean().sqrt())
    return torch.cat([patches, draw.transpose(1, 2)], -1), snr


def _cpu64(k: Tensor) -> Tensor:
    return k.to("cpu").double()


def ntk_blocks(
    model: torch.nn.Module, x_train: Tensor, x_eval: Tensor, block: int = 2048
) -> tuple[Tensor, Tensor]:
    """(Θ(X_tr, X_tr), Θ(X_ev, X_tr)) in float64 on the CPU, Jacobian passes of at most
    ``block`` samples on the device of the model and the inputs (float64 after each pass: MPS
    has none).

    When everything fits one pass, one call takes each sample's Jacobian once (the unused eval x
    eval part is a cheap contraction). Otherwise rows and columns go in chunks of ``block``:
    `factored_ntk` takes the two sides' Jacobians one after the other, so a call's peak is one
    chunk's pass, at the price of recomputing the training Jacobians once per row chunk.
    """
    model.eval()
    n_tr, step = len(x_train), max(1, int(block))
    with torch.no_grad():  # jacrev inside still differentiates; no graph to the parameters
        if n_tr + len(x_eval) <= step:
            k = _cpu64(factored_ntk(model, torch.cat([x_train, x_eval])))
            return k[:n_tr, :n_tr], k[n_tr:, :n_tr]

        def cross(rows: Tensor, same: bool) -> Tensor:
            if same and len(rows) <= step:
                return _cpu64(factored_ntk(model, rows))
            out = torch.empty(len(rows), n_tr, dtype=torch.float64)
            for i in range(0, len(rows), step):
                for j in range(0, n_tr, step):
                    out[i : i + step, j : j + step] = _cpu64(
                        factored_ntk(model, rows[i : i + step], x2=x_train[j : j + step])
                    )
            return out

        return cross(x_train, True), cross(x_eval, False)
