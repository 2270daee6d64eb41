"""Achievable accuracy by NTK regression, without training (stage 1 of NTKD: design).

For an ONN with m kernels at initialisation, kernel ridge regression with its empirical NTK Θ,

    y_test = Θ(X_te, X_tr) (Θ(X_tr, X_tr) + λI)^-1 Y_tr,

is what training the linearised network to convergence under a squared loss predicts. λ is picked
on the validation split from a grid relative to the mean diagonal of Θ(X_tr, X_tr); the estimate
is the test accuracy at that λ. It is a diagnostic for choosing the kernel count before
fabrication, and never part of a loss.

Choices, and why:

- **Width.** NTK theory is about width, but the kernel count m is the very width we want to
  measure: it is the optical bottleneck (m feature maps) and stays as designed. The digital hidden
  layer is free, so it is widened (``hidden=1024`` by default, against 64 in `hil train`): the
  kernel then depends on the random backend less (on digits, the std of the estimate over 3
  initialisations was 0.3-0.6 points for 1-16 kernels at hidden 1024, 0.3-1.3 at 64).
- **Initialisations.** The estimate is the mean test accuracy of several initialisations, each
  regressed with its own kernel. Averaging the *kernels* instead would be wrong here: the mean
  Θ over random frontends is the kernel of infinitely many random kernels, so it would erase the
  dependence on m that the estimate exists to show (S initialisations of m kernels average to
  roughly one of S·m kernels). One λ serves all initialisations of a kernel count: the grid point
  with the best mean validation accuracy, ties to the lower validation squared error.
- **Targets** are one-hot, centred on the training class frequencies (the mean is added back), so
  λ shrinks predictions towards the class prior rather than towards zero.
- **Kernel** over every parameter (PSFs, map gains, backend) at initialisation, by
  `hil.ntkd.factored.factored_ntk`. With an fc backend it is taken on `pooled_patches` through
  `PooledONN`: the same function of the same parameters, so the same kernel, at a fraction of
  the cost (other backends take the full-resolution image in passes within ``memory_bytes``).
- **Sensor noise** (`MapNoise`, default: the simulated bench's sensor): captured maps carry shot,
  dark, read and ADC noise, independent per map, so more maps are more independent looks. One
  draw per sample and initialisation enters the kernel as the captured maps would. At the
  exposure calibration sets, the pooled maps' SNR is ~90 on digits and the estimate moves by
  at most 0.4 points, within seed noise; at 1/100 of the light (70 e per unit) every count
  loses ~1.5 points. The table reports the SNR, so a design whose light cannot fill the well
  (the exposure at its limit) shows it.
- **Training subset.** At most ``train_size`` samples of the training split, class-balanced and
  fixed: on digits the whole split, the data `hil train` learns from (on 800 of its 1078
  samples the 16-kernel estimate fell 0.5-1.1 points below the 8-kernel one; on all of them it
  does not), and on larger sets a subset that keeps four kernel counts within a minute on 2 CPU
  cores. Validation and test splits are capped at ``eval_size`` each (digits: whole).

Flat on digits, and why that is right: on the default 32x32 display a pooled map is 8x8, the
digits' own resolution, so 2 signed kernels already pass 128 numbers of a 64-pixel image and the
kernel count does not bind. Trained students agree (96.2/96.1/96.5/96.3 % for 2/4/8/16 kernels,
`hil train --method none`, 5 seeds). Checked, and not the cause: sensor noise (above), seeds (8
initialisations on the whole training split: 98.6/98.8/98.7/98.7 %), λ selection (the best λ in
hindsight is within 0.3 points of the chosen one, and as flat) and the subset (800 or all 1078).
Where the count binds, as on a 16x16 display (pooled maps 4x4), the estimate rises with it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hil.data.datasets import Dataset, load_dataset
from hil.data.placement import to_display
from hil.design.layout import _pair, _positive, design_layout, layout_for_kernels
from hil.errors import UserError
from hil.models.onn import ONN, StudentSpec, _pool_size
from hil.ntkd.factored import factored_ntk
from sim.fftconv import conv2d_direct
from sim.params import SensorParams

__all__ = [
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_HIDDEN",
    "DEFAULT_NOISE",
    "DEFAULT_SEEDS",
    "DEFAULT_TRAIN_SIZE",
    "EXPOSURE_FILL",
    "LAMBDA_GRID",
    "KernelRegression",
    "MapNoise",
    "PooledONN",
    "estimate",
    "format_table",
    "ntk_blocks",
    "pooled_patches",
    "run_estimate",
    "samples_per_pass",
    "save_curve_png",
    "train_subset",
]

DEFAULT_TRAIN_SIZE = 1200  # all of digits' 1078; a class-balanced subset of larger sets
DEFAULT_SEEDS = 3
DEFAULT_HIDDEN = 1024
DEFAULT_EVAL_SIZE = 2000  # per split; bounds Θ(X_ev, X_tr) on MNIST/CIFAR-sized test sets
LAMBDA_GRID = tuple(float(v) for v in np.logspace(-6, 1, 15))  # × mean diag Θ(X_tr, X_tr)
MEMORY_BYTES = 3 * 2**30  # per Jacobian pass, see samples_per_pass
SUBSET_SEED = 0
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


def _bin_px(size: int, pool: int) -> Tensor:
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
        self.pool = _pool_size(onn.spec.image_size)

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


def _noisy_inputs(
    model: ONN, patches: Tensor, noise: MapNoise | None, bin_px: Tensor, seed: int
) -> tuple[Tensor, float]:
    """`PooledONN` inputs for ``patches`` with one noise draw per sample, and the maps' SNR
    (RMS of the clean pooled maps over the RMS noise); inf without noise."""
    m = model.spec.kernels
    if noise is None:
        return torch.cat([patches, patches.new_zeros(*patches.shape[:2], m)], -1), math.inf
    with torch.no_grad():
        psfs = model.frontend.psfs.flatten(1)  # (P, C·k²)
        std = noise.std(torch.einsum("nqj,pj->npq", patches, psfs), bin_px, model.spec.signed)
        gen = torch.Generator().manual_seed(NOISE_SEED + seed)
        draw = (std * torch.randn(std.shape, generator=gen, dtype=std.dtype)).to(patches.dtype)
        clean = torch.einsum("nqj,mj->nmq", patches, model.frontend.kernel.flatten(1))
    snr = float(clean.double().pow(2).mean().sqrt() / std.pow(2).mean().sqrt())
    return torch.cat([patches, draw.transpose(1, 2)], -1), snr


def ntk_blocks(
    model: torch.nn.Module, x_train: Tensor, x_eval: Tensor, block: int = 2048
) -> tuple[Tensor, Tensor]:
    """(Θ(X_tr, X_tr), Θ(X_ev, X_tr)) in float64, Jacobian passes of at most ``block`` samples.

    When everything fits one pass, one call takes each sample's Jacobian once (the unused eval x
    eval part is a cheap contraction). Otherwise rows and columns go in chunks of ``block``:
    `factored_ntk` takes the two sides' Jacobians one after the other, so a call's peak is one
    chunk's pass, at the price of recomputing the training Jacobians once per row chunk.
    """
    model.eval()
    n_tr, step = len(x_train), max(1, int(block))
    with torch.no_grad():  # jacrev inside still differentiates; no graph to the parameters
        if n_tr + len(x_eval) <= step:
            k = factored_ntk(model, torch.cat([x_train, x_eval])).double()
            return k[:n_tr, :n_tr], k[n_tr:, :n_tr]

        def cross(rows: Tensor, same: bool) -> Tensor:
            if same and len(rows) <= step:
                return factored_ntk(model, rows).double()
            out = torch.empty(len(rows), n_tr, dtype=torch.float64)
            for i in range(0, len(rows), step):
                for j in range(0, n_tr, step):
                    out[i : i + step, j : j + step] = factored_ntk(
                        model, rows[i : i + step], x2=x_train[j : j + step]
                    ).double()
            return out

        return cross(x_train, True), cross(x_eval, False)


def train_subset(labels: np.ndarray, indices: np.ndarray, size: int | None) -> np.ndarray:
    """A fixed, class-balanced subset of ``indices`` (all of them when ``size`` is None or more).

    Fixed (seeded) so estimates for different kernel counts and runs see the same samples;
    balanced so a small subset still has every class.
    """
    if size is None or size >= len(indices):
        return np.asarray(indices)
    order = np.random.default_rng(SUBSET_SEED).permutation(indices)
    rank = np.zeros(len(order), np.int64)  # position of each sample within its class
    for c in np.unique(labels[order]):
        where = labels[order] == c
        rank[where] = np.arange(where.sum())
    return np.sort(order[np.argsort(rank, kind="stable")[:size]])


def _load(name: str, root: Path | str | None) -> Dataset:
    return load_dataset(name) if root is None else load_dataset(name, root)


def _seed_list(seeds: int | Iterable[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise UserError(f"seeds must be >= 1 (got {seeds})")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise UserError("seeds: give at least one")
    return out


def _kernel_list(kernels: Iterable[int]) -> list[int]:
    out = sorted({int(m) for m in kernels})
    if not out or out[0] < 1:
        raise UserError(f"kernel counts must be >= 1 (got {list(kernels)})")
    return out


def estimate(
    dataset: str | Dataset = "digits",
    kernels: Sequence[int] = (2, 4, 8, 16),
    kernel_size: int = 7,
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    hidden: int = DEFAULT_HIDDEN,
    image_size: int = 32,
    backend: str = "fc2",
    signed: bool = True,
    lambdas: Sequence[float] = LAMBDA_GRID,
    centre: bool = True,
    memory_bytes: int = MEMORY_BYTES,
    eval_size: int | None = DEFAULT_EVAL_SIZE,
    data_root: Path | str | None = None,
    noise: MapNoise | None = DEFAULT_NOISE,
) -> dict[str, Any]:
    """Estimated test accuracy of the PSF ONN for each kernel count, by NTK regression.

    ``train_size``: training samples (None: the whole training split); ``eval_size`` caps the
    validation and the test split each (digits: 359 and 360, both whole). ``seeds``: a number of
    initialisations (0..n-1) or the seeds themselves. ``noise``: the captured maps' sensor noise
    (None: noiseless maps, the paper's estimate). ``progress(row)`` is called after each
    kernel count with its finished row. Returns a JSON-ready dict; ``rows`` holds, per kernel
    count, ``accuracy`` (mean test accuracy over initialisations) and ``accuracy_std``,
    ``val_accuracy``, ``lambda`` (relative to the mean diagonal of Θ(X_tr, X_tr)),
    ``lambda_abs`` (its mean absolute value), ``lambda_at_edge``, ``map_snr`` (RMS of the pooled
    maps over that of their noise; None without noise) and ``seconds``.
    """
    t_start = time.perf_counter()
    data = dataset if isinstance(dataset, Dataset) else _load(dataset, data_root)
    if data.task != "classification":
        raise UserError(f"{data.name}: the NTK estimate needs a classification dataset")
    counts, seed_list = _kernel_list(kernels), _seed_list(seeds)
    if train_size is not None and train_size < data.classes:
        raise UserError(f"train size {train_size} is below the {data.classes} classes")
    grid = sorted(float(v) for v in lambdas)
    if not grid or grid[0] <= 0:
        raise UserError("the λ grid needs positive values")
    pooled = backend in ("fc2", "fc3")
    if noise is not None and not pooled:
        raise UserError(
            f"sensor noise is modelled on pooled maps: backend fc2 or fc3, not {backend}"
        )
    idx_tr = train_subset(data.labels, data.split("train"), train_size)
    idx_va = train_subset(data.labels, data.split("val"), eval_size)
    idx_te = train_subset(data.labels, data.split("test"), eval_size)
    shown = to_display(data.images, (image_size, image_size))
    x_tr = torch.as_tensor(shown[idx_tr])
    x_ev = torch.as_tensor(shown[np.concatenate([idx_va, idx_te])])
    y = torch.as_tensor(data.labels)
    y_tr = torch.nn.functional.one_hot(y[idx_tr], data.classes)
    y_va, y_te, n_va = y[idx_va], y[idx_te], len(idx_va)
    onehot_va = torch.nn.functional.one_hot(y_va, data.classes).double()
    if pooled:  # one (pool², C·k²) input per sample serves every kernel count and seed
        pool = _pool_size(image_size)
        patches = pooled_patches(torch.cat([x_tr, x_ev]), kernel_size, pool)
        bin_px = _bin_px(image_size, pool)

    rows = []
    for m in counts:
        t0 = time.perf_counter()
        val = np.zeros((len(seed_list), len(grid)))
        mse = np.zeros_like(val)
        test = np.zeros_like(val)
        scales, snrs = [], []
        for i, s in enumerate(seed_list):
            spec = StudentSpec(
                kernels=m,
                kernel_size=kernel_size,
                signed=signed,
                channels=int(data.images.shape[1]),
                image_size=image_size,
                backend=backend,
                classes=data.classes,
                hidden=hidden,
                seed=s,
            )
            with torch.random.fork_rng(devices=[]):  # ONN() reseeds the global generator
                model = ONN(spec)
            if pooled:
                inputs, snr = _noisy_inputs(model, patches, noise, bin_px, s)
                net, block = PooledONN(model), POOLED_BLOCK
                x_a, x_b = inputs[: len(x_tr)], inputs[len(x_tr) :]
                if noise is not None:
                    snrs.append(snr)
            else:
                net, x_a, x_b, block = model, x_tr, x_ev, samples_per_pass(spec, memory_bytes)
            k_tt, k_et = ntk_blocks(net, x_a, x_b, block)
            reg = KernelRegression(k_tt, y_tr, centre)
            scales.append(reg.scale)
            for j, rel in enumerate(grid):
                pred = reg.predict(k_et, rel * reg.scale)
                p_va, p_te = pred[:n_va], pred[n_va:]
                val[i, j] = float((p_va.argmax(1) == y_va).double().mean())
                mse[i, j] = float((p_va - onehot_va).pow(2).sum(1).mean())
                test[i, j] = float((p_te.argmax(1) == y_te).double().mean())
        mean_val, mean_mse = val.mean(0), mse.mean(0)
        best = max(range(len(grid)), key=lambda j: (mean_val[j], -mean_mse[j]))
        row = {
            "kernels": m,
            "accuracy": float(test[:, best].mean()),
            "accuracy_std": float(test[:, best].std(ddof=1)) if len(seed_list) > 1 else 0.0,
            "val_accuracy": float(mean_val[best]),
            "lambda": grid[best],
            "lambda_abs": grid[best] * float(np.mean(scales)),
            "lambda_at_edge": best in (0, len(grid) - 1),
            "map_snr": float(np.mean(snrs)) if snrs else None,
            "seconds": time.perf_counter() - t0,
            "per_seed": [
                {
                    "seed": s,
                    "test_accuracy": float(test[i, best]),
                    "val_accuracy": float(val[i, best]),
                }
                for i, s in enumerate(seed_list)
            ],
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    return {
        "dataset": data.name,
        "classes": data.classes,
        "kernel_size": kernel_size,
        "signed": signed,
        "image_size": image_size,
        "backend": backend,
        "hidden": hidden,
        "seeds": seed_list,
        "train_size": len(idx_tr),
        "val_size": len(idx_va),
        "test_size": len(idx_te),
        "centred": centre,
        "noise": noise.to_dict() if noise is not None else None,
        "lambda_grid": grid,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }


def format_table(result: dict[str, Any]) -> str:
    """The estimate as a Markdown table (with the layout columns when layouts were designed)."""
    with_layout = any("layout" in r for r in result["rows"])
    with_noise = result.get("noise") is not None
    head = ["kernels", "estimated test accuracy", "val accuracy", "λ / mean diag Θ", "s"]
    if with_noise:
        head.insert(4, "map SNR")
    if with_layout:
        head += ["grid", "fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for r in result["rows"]:
        edge = " (grid edge)" if r["lambda_at_edge"] else ""
        cells = [
            str(r["kernels"]),
            f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} %",
            f"{100 * r['val_accuracy']:.2f} %",
            f"{r['lambda']:.2g}{edge}",
            f"{r['seconds']:.1f}",
        ]
        if with_noise:
            cells.insert(4, f"{r['map_snr']:.0f}")
        if with_layout:
            lay = r.get("layout") or {}
            grid = lay.get("grid")
            cells += [f"{grid[0]} x {grid[1]}" if grid else "-", "yes" if lay.get("fits") else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = len(result["seeds"])
    noise = result.get("noise")
    maps = f"sensor noise at {noise['e_per_unit']:.0f} e per unit" if noise else "noiseless maps"
    lines.append(
        f"\n{result['dataset']}: NTK regression of the ONN at initialisation (hidden "
        f"{result['hidden']}, {maps}), {result['train_size']} training / {result['val_size']} "
        f"validation / {result['test_size']} test samples, mean ± std over {n_seeds} "
        f"initialisation{'s' if n_seeds > 1 else ''}, {result['seconds']:.0f} s"
    )
    return "\n".join(lines)


def save_curve_png(result: dict[str, Any], path: Path | str) -> Path:
    """Estimated test accuracy against the kernel count (log2 axis), written atomically."""
    from hil.output.figures import plt, save_figure

    path = Path(path)
    rows = result["rows"]
    m = [r["kernels"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    err = [100 * r["accuracy_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.errorbar(m, acc, yerr=err, marker="o", capsize=3, label="NTK regression estimate")
    misfits = [
        (k, a)
        for r, k, a in zip(rows, m, acc, strict=True)
        if r.get("layout", {}).get("fits", True) is False
    ]
    if misfits:
        ax.plot(*zip(*misfits, strict=True), "x", color="red", ms=10, label="does not fit")
    low, high = min(a - e for a, e in zip(acc, err, strict=True)), max(acc) + max(err)
    if high - low < 5:  # at least 5 points tall, so noise does not look like a trend
        mid = (high + low) / 2
        low, high = mid - 2.5, mid + 2.5
    ax.set_ylim(low - 0.5, min(100.5, high + 0.5))
    ax.set_xscale("log", base=2)
    ax.set_xticks(m, [str(k) for k in m])
    ax.minorticks_off()
    sign = "signed " if result["signed"] else ""
    ks = result["kernel_size"]
    ax.set_xlabel(f"number of {sign}{ks}x{ks} kernels")
    ax.set_ylabel("estimated test accuracy (%)")
    ax.set_title(
        f"{result['dataset']}: NTK regression, {result['train_size']} train, "
        f"{len(result['seeds'])} inits",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _layout_entry(m: int, physical: dict[str, Any], kernel_um: float | None) -> dict[str, Any]:
    try:
        if kernel_um is None:
            layout = layout_for_kernels(m, **physical)
        else:
            ms, d = physical.pop("metasurface_um"), physical.pop("spacing_um")
            layout = design_layout(ms, kernel_um, d, kernels=m, **physical)
    except UserError as e:
        return {"fits": False, "reason": str(e)}
    return {"fits": True, **layout.to_dict()}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def run_estimate(
    dataset: str = "digits",
    kernels: Sequence[int] = (2, 4, 8, 16),
    kernel_size: int = 7,
    out: Path | str = Path("estimate-output"),
    *,
    metasurface_um: tuple[float, float] | None = None,
    spacing_um: float | None = None,
    magnification: float = 1.0,
    pixel_um: float | None = None,
    sensor_px: tuple[int, int] | None = None,
    kernel_um: float | None = None,
    signed: bool = True,
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    progress: Callable[[dict[str, Any]], None] | None = None,
    data_root: Path | str | None = None,
    noise: MapNoise | None = DEFAULT_NOISE,
    image_size: int = 32,
) -> dict[str, Any]:
    """`hil estimate`: the estimate per kernel count, each candidate's layout, and the curve.

    With the physical constraints (``metasurface_um``, ``spacing_um``, ``pixel_um``,
    ``sensor_px``; ``magnification`` defaults to 1) each row gets ``layout``: ``fits`` and either
    the layout (`Layout.to_dict`: grid, tile boxes, ``frontend_toml``) or the ``reason`` it does
    not fit. The sub-optic side is ``kernel_um`` when given, else the largest that holds the
    candidate (`layout_for_kernels`). Bad input, or constraints no candidate fits (the smallest
    one's binding constraint is named), raise `UserError` before any computation.
    Writes into ``out`` ``estimate.md`` (the table), ``estimate.png``, ``estimate.json`` and, with
    a layout, ``layouts.json`` and ``frontend-M.toml`` per candidate that fits; the result has
    ``table`` (text) and ``files``. ``data_root``: where datasets that read files (mnist,
    cifar10) find them; ``image_size``: the side of the display the images are shown on.
    ``noise``: as in `estimate`.
    """
    counts = _kernel_list(kernels)
    given = {
        "--metasurface-um": metasurface_um,
        "--spacing-um": spacing_um,
        "--pixel-um": pixel_um,
        "--sensor-px": sensor_px,
    }
    physical: dict[str, Any] | None = None
    if any(v is not None for v in given.values()) or kernel_um is not None:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"the layout needs {', '.join(missing)} as well")
        ms = _pair("metasurface", metasurface_um, "µm")
        sensor = _pair("sensor", sensor_px, "px")
        if any(v != int(v) for v in sensor):
            raise UserError(f"sensor size must be whole pixels (got {sensor_px!r})")
        physical = {
            "metasurface_um": ms,
            "spacing_um": _positive("spacing", spacing_um, allow_zero=True),
            "magnification": _positive("magnification", magnification, unit=""),
            "pixel_um": _positive("pixel pitch", pixel_um),
            "sensor_px": (int(sensor[0]), int(sensor[1])),
            "signed": signed,
            "kernel_size_px": kernel_size,
        }
        if kernel_um is not None:
            _positive("kernel side", kernel_um)
    data = _load(dataset, data_root)
    layouts: dict[int, dict[str, Any]] = {}
    if physical is not None:
        physical["channels"] = int(data.images.shape[1])
        layouts = {m: _layout_entry(m, dict(physical), kernel_um) for m in counts}
        if not any(lay["fits"] for lay in layouts.values()):
            first = counts[0]
            raise UserError(
                f"no candidate fits ({', '.join(map(str, counts))} kernels); "
                f"{first} kernels: {layouts[first]['reason']}"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = estimate(
        data,
        counts,
        kernel_size,
        train_size=train_size,
        seeds=seeds,
        progress=progress,
        signed=signed,
        noise=noise,
        image_size=image_size,
    )
    if physical is not None:
        result["constraints"] = {
            k: v for k, v in physical.items() if k not in ("signed", "channels")
        } | {"kernel_um": kernel_um}
        for row in result["rows"]:
            row["layout"] = layouts[row["kernels"]]
    result["table"] = format_table(result)
    files = {k: out / n for k, n in (("table", "estimate.md"), ("curve", "estimate.png"))}
    _write_text(files["table"], result["table"] + "\n")
    save_curve_png(result, files["curve"])
    if physical is not None:
        files["layouts"] = out / "layouts.json"
        _write_json(files["layouts"], {str(r["kernels"]): r["layout"] for r in result["rows"]})
        for row in result["rows"]:
            if row["layout"]["fits"]:
                key, name = f"frontend_{row['kernels']}", f"frontend-{row['kernels']}.toml"
                files[key] = out / name
                _write_text(files[key], row["layout"]["frontend_toml"])
    files["result"] = out / "estimate.json"
    result["files"] = {k: str(v) for k, v in files.items()}
    _write_json(files["result"], result)
    return result
