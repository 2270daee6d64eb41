"""Scoring a student on the bench: its digital backend on feature maps the glass produced.

After fabrication the frontend is the optic on the bench, so live inference is the backend applied
to captured feature maps. Classification is scored by accuracy and a confusion matrix;
segmentation by mean IoU, as training scores it: the feature maps, and so the predicted masks,
cover the display, so the truth is the mask placed where its image was shown, and the display
around it (IGNORE) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console

from hil.acquire import store as capture_store
from hil.bench.config import BenchConfig
from hil.data.datasets import Dataset, load_dataset, to_display
from hil.errors import UserError
from hil.jobs.capture import CaptureRequest, run_capture
from hil.models.onn import ONN, StudentSpec
from hil.output.figures import save_figure
from hil.training.loop import IGNORE, iou_counts, load_checkpoint, mean_iou, predictions
from hil.training.student import place_masks

OVERLAY_SAMPLES = 6  # rows of the segmentation picture


def load_onn(path: Path | str) -> ONN:
    """The student of a `hil train` / `hil finetune` checkpoint, in eval mode; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: student checkpoint not found (write one with `hil train`)")
    try:
        state = load_checkpoint(path)
    except Exception as e:  # torch.load fails in many ways on a foreign file
        raise UserError(f"{path}: not a PyTorch checkpoint ({_first_sentence(e)})") from None
    if not (isinstance(state, dict) and {"spec", "model"} <= state.keys()):
        raise UserError(
            f"{path}: not a hil student checkpoint (no student spec and weights; "
            "a teacher's, or another program's?)"
        )
    try:
        model = ONN(StudentSpec(**state["spec"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: a damaged student checkpoint ({_first_sentence(e)})") from None
    return model.eval()


def _first_sentence(e: Exception) -> str:
    """torch's own messages run to many lines; the first sentence names the problem."""
    text = "" if isinstance(e, KeyError) else str(e).strip()  # torch.load: a bare magic number
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else "unrecognised contents"


def check_maps(model: ONN, shape: tuple[int, ...], source: Path | str) -> None:
    """Feature maps (m, H, W) must be what the student's backend takes."""
    s = model.spec
    takes = (s.kernels, s.image_size, s.image_size)
    if tuple(shape) != takes:
        raise UserError(
            f"{source}: feature maps of shape {tuple(shape)}, but the student takes {takes} "
            "(captured with another design or display?)"
        )


def predict(model: ONN, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class per sample (N,) or per pixel (N, H, W): the argmax of the backend's logits."""
    maps = torch.as_tensor(features)
    return torch.cat([p for _, p in predictions(model.backend, maps, batch_size)]).numpy()


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Counts (classes, classes): row = true class, column = predicted; IGNORE truth left out."""
    t, p = np.ravel(truth).astype(np.int64), np.ravel(predicted).astype(np.int64)
    keep = t != IGNORE
    pairs = t[keep] * classes + p[keep]
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def check_labels(labels: np.ndarray, classes: int, path: Path | str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(
            f"{path}: labels span {int(labels.min())}-{int(labels.max())}, but the student "
            f"has {classes} classes (a checkpoint for another dataset?)"
        )


def evaluate_captures(
    model: ONN, captures: capture_store.Captures, source: Path | str
) -> dict[str, Any]:
    """Scores of `model` on `captures` (read from `source`, named in errors)."""
    n = len(captures.index)
    if n == 0:
        raise UserError(f"{source}: holds no captured samples yet")
    check_maps(model, captures.features.shape[1:], source)
    classes = model.spec.classes
    check_labels(captures.labels, classes, source)
    predicted = predict(model, captures.features)
    if captures.labels.ndim == 1:
        matrix = confusion(captures.labels, predicted, classes)
        return {
            "task": "classification",
            "n": n,
            "accuracy": float(np.trace(matrix) / max(n, 1)),
            "per_class": {
                "support": matrix.sum(1).tolist(),
                "correct": np.diag(matrix).tolist(),
            },
            "confusion": matrix.tolist(),
        }
    truth = place_masks(captures.labels, predicted.shape[1:])
    counts = iou_counts(torch.as_tensor(predicted), torch.as_tensor(truth), classes)
    matrix = confusion(truth, predicted, classes)
    return {
        "task": "segmentation",
        "n": n,
        "miou": mean_iou(counts),
        "iou": [float(i / u) if u else None for i, u in counts.tolist()],
        "pixel_accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
        "confusion": matrix.tolist(),
    }


def evaluate_store(model: ONN, store_path: Path | str) -> dict[str, Any]:
    """Accuracy (classification) or mIoU (segmentation) of `model` on a capture store."""
    return evaluate_captures(model, capture_store.read(store_path), store_path)


def save_confusion_png(
    matrix: np.ndarray, path: Path | str, title: str = "", names: list[str] | None = None
) -> Path:
    """The confusion matrix as a picture: counts in each cell, rows true, columns predicted."""
    matrix = np.asarray(matrix)
    k = len(matrix)
    names = names or [str(c) for c in range(k)]
    fig = Figure(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    if k <= 30:
        top = matrix.max()
        for (i, j), v in np.ndenumerate(matrix):
            color = "white" if v > 0.6 * top else "black"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k), names, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_overlay_png(
    images: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    path: Path | str,
    title: str = "",
) -> Path:
    """A row per sample: the shown image, the true mask over it, the predicted mask over it.

    `images` (N, H, W) or (N, H, W, 3) in [0, 1]; masks (N, H, W) on the same grid.
    """
    n = len(images)
    fig = Figure(figsize=(6.0, 2.0 * n + (0.4 if title else 0.0)))
    axes = fig.subplots(n, 3, squeeze=False)
    for r in range(n):
        image = images[r] if images[r].ndim == 3 else np.repeat(images[r][..., None], 3, axis=2)
        for c, (label, mask) in enumerate(
            (("shown", None), ("true", truth), ("predicted", predicted))
        ):
            ax = axes[r, c]
            ax.imshow(image, vmin=0, vmax=1, interpolation="nearest")
            if mask is not None:  # background (0) and IGNORE stay clear
                shaded = np.ma.masked_less_equal(mask[r], 0)
                ax.imshow(shaded, cmap="autumn", alpha=0.55, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


@dataclass(frozen=True)
class EvaluateRequest:
    """What `hil evaluate` was asked: a student, and the split to capture and score it on."""

    checkpoint: Path
    calibration: Path
    dataset: str = "digits"
    split: str = "test"
    fraction: float = 1.0
    seed: int = 0
    captures: Path | None = None  # a store to use (resumed if incomplete) instead of a new one
    out: Path | None = None  # the folder for captures and pictures; default: the run's
    data_root: Path | None = None

    def args(self) -> dict[str, Any]:
        """The arguments a run record keeps."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


def run_evaluate(
    config: BenchConfig, request: EvaluateRequest, run_dir: Path, console: Console
) -> dict[str, Any]:
    """Capture the split on the bench (or resume a store), score the student on it, draw it.

    The checkpoint, the calibration, the store and the dataset are each read once.
    """
    r = request
    model = load_onn(r.checkpoint)
    folder = r.out or run_dir
    store = r.captures or folder / "captures.h5"
    data = load_dataset(r.dataset, r.data_root)
    capture_request = CaptureRequest(
        r.calibration, r.dataset, r.split, store, r.fraction, r.seed, data_root=r.data_root
    )

    def readable(cal) -> None:  # before capturing: a student that cannot read it fails now
        source = f"{r.checkpoint} with {r.calibration}"
        check_maps(model, (cal.kernels, *cal.display_shape[:2]), source)

    capture = run_capture(config, capture_request, console, data=data, check=readable)
    rows = capture_store.read(store)
    scores = evaluate_captures(model, rows, store)
    picture = _picture(
        model, rows, data, scores, folder, f"{r.checkpoint.name} on {r.dataset}/{r.split} (bench)"
    )
    kept = ("planned", "captured", "resumed_from", "calibration_id", "simulated")
    return {
        "checkpoint": str(r.checkpoint),
        "dataset": r.dataset,
        "split": r.split,
        "captures": str(store),
        "figure": str(picture),
        **scores,
        "capture": {k: capture[k] for k in kept},
    }


def _picture(
    model: ONN,
    rows: capture_store.Captures,
    data: Dataset,
    scores: dict[str, Any],
    folder: Path,
    title: str,
) -> Path:
    """The confusion matrix (classification) or the first samples' mask overlays."""
    if scores["task"] == "classification":
        return save_confusion_png(
            scores["confusion"],
            folder / "confusion.png",
            f"{title}: accuracy {scores['accuracy']:.3f}, n={scores['n']}",
        )
    shown_rows = slice(0, OVERLAY_SAMPLES)
    hw = rows.features.shape[-2:]
    shown = to_display(data.images[rows.index[shown_rows]], hw)
    shown = shown[:, 0] if shown.shape[1] == 1 else shown.transpose(0, 2, 3, 1)
    return save_overlay_png(
        shown,
        place_masks(rows.labels[shown_rows], hw),
        predict(model, rows.features[shown_rows]),
        folder / "overlays.png",
        f"{title}: mIoU {scores['miou']:.3f}",
    )
