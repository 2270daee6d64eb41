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
  Both are `hil.data.sampling.balanced_subset`.

Flat on digits, and why that is right: on the default 32x32 display a pooled map is 8x8, the
digits' own resolution, so 2 signed kernels already pass 128 numbers of a 64-pixel image and the
kernel count does not bind. Trained students agree (96.2/96.1/96.5/96.3 % for 2/4/8/16 kernels,
`hil train --method none`, 5 seeds). Checked, and not the cause: sensor noise (above), seeds (8
initialisations on the whole training split: 98.6/98.8/98.7/98.7 %), λ selection (the best λ in
hindsight is within 0.3 points of the chosen one, and as flat) and the subset (800 or all 1078).
Where the count binds, as on a 16x16 display (pooled maps 4x4), the estimate rises with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hil.data.datasets import Dataset, load_dataset
from hil.data.placement import to_display
from hil.data.sampling import balanced_subset
from hil.design.defaults import DEFAULT_SEEDS, DEFAULT_TRAIN_SIZE
from hil.design.regression import (
    DEFAULT_NOISE,
    MEMORY_BYTES,
    POOLED_BLOCK,
    KernelRegression,
    MapNoise,
    PooledONN,
    bin_px,
    noisy_inputs,
    ntk_blocks,
    pooled_patches,
    samples_per_pass,
)
from hil.errors import UserError
from hil.models.onn import ONN, StudentSpec, pool_size

__all__ = [
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_HIDDEN",
    "DEFAULT_SEEDS",
    "DEFAULT_TRAIN_SIZE",
    "LAMBDA_GRID",
    "EstimateSettings",
    "estimate",
    "format_table",
    "kernel_list",
    "load",
    "save_curve_png",
]

DEFAULT_HIDDEN = 1024
DEFAULT_EVAL_SIZE = 2000  # per split; bounds Θ(X_ev, X_tr) on MNIST/CIFAR-sized test sets
LAMBDA_GRID = tuple(float(v) for v in np.logspace(-6, 1, 15))  # × mean diag Θ(X_tr, X_tr)
SUBSET_SEED = 0


@dataclass(frozen=True)
class EstimateSettings:
    """What `estimate` computes: the candidates (kernel counts on an ONN of this shape), the
    samples and initialisations it regresses with, and the λ grid.

    ``train_size``: training samples (None: the whole training split); ``eval_size`` caps the
    validation and the test split each (digits: 359 and 360, both whole). ``seeds``: a number of
    initialisations (0..n-1) or the seeds themselves. ``noise``: the captured maps' sensor noise
    (None: noiseless maps, the paper's estimate). ``image_size``: the side of the display the
    images are shown on. ``device``: where the Jacobian passes run; the noise draws and the
    regression stay on the CPU (float64), so the numbers do not depend on it beyond rounding.
    """

    kernels: Sequence[int] = (2, 4, 8, 16)
    kernel_size: int = 7
    train_size: int | None = DEFAULT_TRAIN_SIZE
    seeds: int | Sequence[int] = DEFAULT_SEEDS
    hidden: int = DEFAULT_HIDDEN
    image_size: int = 32
    backend: str = "fc2"
    signed: bool = True
    lambdas: Sequence[float] = field(default=LAMBDA_GRID)
    centre: bool = True
    memory_bytes: int = MEMORY_BYTES
    eval_size: int | None = DEFAULT_EVAL_SIZE
    noise: MapNoise | None = DEFAULT_NOISE
    device: str = "cpu"  # where the kernels are taken (`hil.device.resolve_device`)

    @property
    def pooled(self) -> bool:
        """fc backends pool the maps first: the kernel is taken on `pooled_patches`."""
        return self.backend in ("fc2", "fc3")


def load(name: str, root: Path | str | None) -> Dataset:
    """The dataset `name`, from `root` when given."""
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


def kernel_list(kernels: Iterable[int]) -> list[int]:
    """The candidate kernel counts, sorted and unique; each must be >= 1."""
    out = sorted({int(m) for m in kernels})
    if not out or out[0] < 1:
        raise UserError(f"kernel counts must be >= 1 (got {list(kernels)})")
    return out


@dataclass(frozen=True)
class _Samples:
    """The regression's samples: display images, labels and, for fc backends, pooled patches."""

    x_tr: Tensor
    x_ev: Tensor  # validation, then test
    y_tr: Tensor  # one-hot
    y_va: Tensor
    y_te: Tensor
    sizes: tuple[int, int, int]  # train, val, test
    patches: Tensor | None
    bins: Tensor | None


def _samples(data: Dataset, settings: EstimateSettings) -> _Samples:
    """Validate the settings against ``data`` and draw the fixed subsets of each split."""
    if data.task != "classification":
        raise UserError(f"{data.name}: the NTK estimate needs a classification dataset")
    if settings.train_size is not None and settings.train_size < data.classes:
        raise UserError(f"train size {settings.train_size} is below the {data.classes} classes")
    if settings.noise is not None and not settings.pooled:
        raise UserError(
            f"sensor noise is modelled on pooled maps: backend fc2 or fc3, not {settings.backend}"
        )
    sizes = (settings.train_size, settings.eval_size, settings.eval_size)
    idx_tr, idx_va, idx_te = (
        balanced_subset(data.labels, data.split(s), n, SUBSET_SEED)
        for s, n in zip(("train", "val", "test"), sizes, strict=True)
    )
    shown = to_display(data.images, (settings.image_size, settings.image_size))
    x_tr = torch.as_tensor(shown[idx_tr])
    x_ev = torch.as_tensor(shown[np.concatenate([idx_va, idx_te])])
    y = torch.as_tensor(data.labels)
    patches = bins = None
    if settings.pooled:  # one (pool², C·k²) input per sample serves every kernel count and seed
        pool = pool_size(settings.image_size)
        patches = pooled_patches(torch.cat([x_tr, x_ev]), settings.kernel_size, pool)
        bins = bin_px(settings.image_size, pool)
    return _Samples(
        x_tr,
        x_ev,
        torch.nn.functional.one_hot(y[idx_tr], data.classes),
        y[idx_va],
        y[idx_te],
        (len(idx_tr), len(idx_va), len(idx_te)),
        patches,
        bins,
    )


def _scores(
    model: ONN, samples: _Samples, settings: EstimateSettings, grid: list[float], seed: int
) -> tuple[np.ndarray, float, float]:
    """(validation accuracy, validation squared error, test accuracy) per λ as a (3, λ) array,
    the kernel's mean diagonal, and the maps' SNR (inf without noise) of one initialisation."""
    snr = float("inf")
    if settings.pooled:
        inputs, snr = noisy_inputs(model, samples.patches, settings.noise, samples.bins, seed)
        n_tr = len(samples.x_tr)
        net, x_a, x_b, block = PooledONN(model), inputs[:n_tr], inputs[n_tr:], POOLED_BLOCK
    else:
        block = samples_per_pass(model.spec, settings.memory_bytes)
        net, x_a, x_b = model, samples.x_tr, samples.x_ev
    device = torch.device(settings.device)
    k_tt, k_et = ntk_blocks(net.to(device), x_a.to(device), x_b.to(device), block)
    reg = KernelRegression(k_tt, samples.y_tr, settings.centre)
    n_va = samples.sizes[1]
    onehot_va = torch.nn.functional.one_hot(samples.y_va, samples.y_tr.shape[1]).double()
    out = np.zeros((3, len(grid)))
    for j, rel in enumerate(grid):
        pred = reg.predict(k_et, rel * reg.scale)
        p_va, p_te = pred[:n_va], pred[n_va:]
        out[0, j] = float((p_va.argmax(1) == samples.y_va).double().mean())
        out[1, j] = float((p_va - onehot_va).pow(2).sum(1).mean())
        out[2, j] = float((p_te.argmax(1) == samples.y_te).double().mean())
    return out, reg.scale, snr


def _row(
    m: int, data: Dataset, samples: _Samples, settings: EstimateSettings, grid: list[float]
) -> dict[str, Any]:
    """The estimate for ``m`` kernels: every initialisation at the λ best on validation."""
    t0 = time.perf_counter()
    seeds = _seed_list(settings.seeds)
    val, mse, test = (np.zeros((len(seeds), len(grid))) for _ in range(3))
    scales, snrs = [], []
    for i, s in enumerate(seeds):
        spec = StudentSpec(
            kernels=m,
            kernel_size=settings.kernel_size,
            signed=settings.signed,
            channels=int(data.images.shape[1]),
            image_size=settings.image_size,
            backend=settings.backend,
            classes=data.classes,
            hidden=settings.hidden,
            seed=s,
        )
        with torch.random.fork_rng(devices=[]):  # ONN() reseeds the global generator
            model = ONN(spec)
        (val[i], mse[i], test[i]), scale, snr = _scores(model, samples, settings, grid, s)
        scales.append(scale)
        if settings.pooled and settings.noise is not None:
            snrs.append(snr)
    mean_val, mean_mse = val.mean(0), mse.mean(0)
    best = max(range(len(grid)), key=lambda j: (mean_val[j], -mean_mse[j]))
    per_seed = [
        {"seed": s, "test_accuracy": float(test[i, best]), "val_accuracy": float(val[i, best])}
        for i, s in enumerate(seeds)
    ]
    return {
        "kernels": m,
        "accuracy": float(test[:, best].mean()),
        "accuracy_std": float(test[:, best].std(ddof=1)) if len(seeds) > 1 else 0.0,
        "val_accuracy": float(mean_val[best]),
        "lambda": grid[best],
        "lambda_abs": grid[best] * float(np.mean(scales)),
        "lambda_at_edge": best in (0, len(grid) - 1),
        "map_snr": float(np.mean(snrs)) if snrs else None,
        "seconds": time.perf_counter() - t0,
        "per_seed": per_seed,
    }


def estimate(
    dataset: str | Dataset = "digits",
    settings: EstimateSettings = EstimateSettings(),  # noqa: B008  frozen, so one shared default
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    data_root: Path | str | None = None,
) -> dict[str, Any]:
    """Estimated test accuracy of the PSF ONN for each kernel count, by NTK regression.

    ``progress(row)`` is called after each kernel count with its finished row. Returns a
    JSON-ready dict; ``rows`` holds, per kernel count, ``accuracy`` (mean test accuracy over
    initialisations) and ``accuracy_std``, ``val_accuracy``, ``lambda`` (relative to the mean
    diagonal of Θ(X_tr, X_tr)), ``lambda_abs`` (its mean absolute value), ``lambda_at_edge``,
    ``map_snr`` (RMS of the pooled maps over that of their noise; None without noise) and
    ``seconds``.
    """
    t_start = time.perf_counter()
    data = dataset if isinstance(dataset, Dataset) else load(dataset, data_root)
    counts, seed_list = kernel_list(settings.kernels), _seed_list(settings.seeds)
    grid = sorted(float(v) for v in settings.lambdas)
    if not grid or grid[0] <= 0:
        raise UserError("the λ grid needs positive values")
    samples = _samples(data, settings)
    rows = []
    for m in counts:
        rows.append(_row(m, data, samples, settings, grid))
        if progress is not None:
            progress(rows[-1])
    noise = settings.noise
    return {
        "dataset": data.name,
        "classes": data.classes,
        "kernel_size": settings.kernel_size,
        "signed": settings.signed,
        "image_size": settings.image_size,
        "backend": settings.backend,
        "hidden": settings.hidden,
        "seeds": seed_list,
        "train_size": samples.sizes[0],
        "val_size": samples.sizes[1],
        "test_size": samples.sizes[2],
        "centred": settings.centre,
        "noise": noise.to_dict() if noise is not None else None,
        "lambda_grid": grid,
        "threads": torch.get_num_threads(),
        "device": settings.device,
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
