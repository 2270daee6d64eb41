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
  `hil.ntk.factored_ntk`, in blocks sized so one Jacobian pass stays within ``memory_bytes``
  (3 GiB: on digits everything up to 8 kernels is one pass; 16 kernels take two).
- **Training subset.** ``train_size`` samples of the training split, class-balanced and fixed, so
  that four kernel counts take well under a minute on 2 CPU cores (~17 s for 2/4/8/16 on
  digits); validation and test splits are capped at ``eval_size`` each (digits: whole).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hil.datasets import Dataset, load_dataset, to_display
from hil.design_layout import _pair, _positive, design_layout, layout_for_kernels
from hil.errors import UserError
from hil.models.onn import ONN, StudentSpec
from hil.ntk import factored_ntk

__all__ = [
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_HIDDEN",
    "DEFAULT_SEEDS",
    "DEFAULT_TRAIN_SIZE",
    "LAMBDA_GRID",
    "KernelRegression",
    "estimate",
    "format_table",
    "ntk_blocks",
    "run_estimate",
    "samples_per_pass",
    "save_curve_png",
    "train_subset",
]

DEFAULT_TRAIN_SIZE = 800
DEFAULT_SEEDS = 3
DEFAULT_HIDDEN = 1024
DEFAULT_EVAL_SIZE = 2000  # per split; bounds Θ(X_ev, X_tr) on MNIST/CIFAR-sized test sets
LAMBDA_GRID = tuple(float(v) for v in np.logspace(-6, 1, 15))  # × mean diag Θ(X_tr, X_tr)
MEMORY_BYTES = 3 * 2**30  # per Jacobian pass, see samples_per_pass
SUBSET_SEED = 0


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
        self.eigvals, self.eigvecs = torch.linalg.eigh(k)
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
) -> dict[str, Any]:
    """Estimated test accuracy of the PSF ONN for each kernel count, by NTK regression.

    ``train_size``: training samples (None: the whole training split); ``eval_size`` caps the
    validation and the test split each (digits: 359 and 360, both whole). ``seeds``: a number of
    initialisations (0..n-1) or the seeds themselves. ``progress(row)`` is called after each
    kernel count with its finished row. Returns a JSON-ready dict; ``rows`` holds, per kernel
    count, ``accuracy`` (mean test accuracy over initialisations) and ``accuracy_std``,
    ``val_accuracy``, ``lambda`` (relative to the mean diagonal of Θ(X_tr, X_tr)),
    ``lambda_abs`` (its mean absolute value), ``lambda_at_edge`` and ``seconds``.
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

    rows = []
    for m in counts:
        t0 = time.perf_counter()
        val = np.zeros((len(seed_list), len(grid)))
        mse = np.zeros_like(val)
        test = np.zeros_like(val)
        scales = []
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
            k_tt, k_et = ntk_blocks(model, x_tr, x_ev, samples_per_pass(spec, memory_bytes))
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
        "lambda_grid": grid,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }


def format_table(result: dict[str, Any]) -> str:
    """The estimate as a Markdown table (with the layout columns when layouts were designed)."""
    with_layout = any("layout" in r for r in result["rows"])
    head = ["kernels", "estimated test accuracy", "val accuracy", "λ / mean diag Θ", "s"]
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
        if with_layout:
            lay = r.get("layout") or {}
            grid = lay.get("grid")
            cells += [f"{grid[0]} x {grid[1]}" if grid else "-", "yes" if lay.get("fits") else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = len(result["seeds"])
    lines.append(
        f"\n{result['dataset']}: NTK regression of the ONN at initialisation (hidden "
        f"{result['hidden']}), {result['train_size']} training / {result['val_size']} validation "
        f"/ {result['test_size']} test samples, mean ± std over {n_seeds} initialisation"
        f"{'s' if n_seeds > 1 else ''}, {result['seconds']:.0f} s"
    )
    return "\n".join(lines)


def save_curve_png(result: dict[str, Any], path: Path | str) -> Path:
    """Estimated test accuracy against the kernel count (log2 axis), written atomically."""
    from hil.figures import _save, plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return path


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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_estimate(
    dataset: str = "digits",
    kernels: Sequence[int] = (2, 4, 8, 16),
    kernel_size: int = 7,
    out: Path | str = Path("estimate"),
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
) -> dict[str, Any]:
    """`hil estimate`: the estimate per kernel count, each candidate's layout, and the curve.

    With the physical constraints (``metasurface_um``, ``spacing_um``, ``pixel_um``,
    ``sensor_px``; ``magnification`` defaults to 1) each row gets ``layout``: ``fits`` and either
    the layout (`Layout.to_dict`: grid, tile boxes, ``frontend_toml``) or the ``reason`` it does
    not fit. The sub-optic side is ``kernel_um`` when given, else the largest that holds the
    candidate (`layout_for_kernels`). Bad input raises `UserError` before any computation.
    Writes ``estimate.png`` and ``estimate.json`` into ``out``; the result has ``table`` (text)
    and ``files``. ``data_root``: where datasets that read files (mnist, cifar10) find them.
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
    if physical is not None:
        physical["channels"] = int(data.images.shape[1])
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
    )
    if physical is not None:
        result["constraints"] = {
            k: v for k, v in physical.items() if k not in ("signed", "channels")
        } | {"kernel_um": kernel_um}
        for row in result["rows"]:
            row["layout"] = _layout_entry(row["kernels"], dict(physical), kernel_um)
    result["table"] = format_table(result)
    png, js = out / "estimate.png", out / "estimate.json"
    save_curve_png(result, png)
    result["files"] = {"curve": str(png), "result": str(js)}
    _write_json(js, result)
    return result
