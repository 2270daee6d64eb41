"""Scoring a student on the bench: its digital backend on feature maps the glass produced.

After fabrication the frontend is the optic on the bench, so live inference is the backend applied
to captured feature maps. Classification is scored by accuracy and a confusion matrix;
segmentation by mean IoU, as training scores it: the feature maps, and so the predicted masks,
cover the input grid, so the truth is the mask placed where its image was on the grid, and the
grid around it (IGNORE) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from hil.acquire import store as capture_store
from hil.acquire.identity import as_shown, check_source
from hil.bench.config import BenchConfig
from hil.data.datasets import Dataset, load_dataset
from hil.data.placement import place_masks
from hil.errors import UserError
from hil.jobs.capture import CaptureRequest, run_capture
from hil.models.checkpoint import check_labels, check_maps, load_onn
from hil.models.onn import ONN
from hil.output.figures import save_confusion_png, save_overlay_png
from hil.training.loop import IGNORE, iou_counts, mean_iou, predictions

OVERLAY_SAMPLES = 6  # rows of the segmentation picture


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


def evaluate_captures(
    model: ONN, captures: capture_store.Captures, source: Path | str
) -> dict[str, Any]:
    """Scores of `model` on `captures` (read from `source`, named in errors)."""
    n = len(captures.index)
    if n == 0:
        raise UserError(f"{source}: holds no captured samples yet")
    check_maps(model, captures.features.shape[1:], source)
    check_labels(model, captures.labels, source)
    classes = model.spec.classes
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
        check_maps(model, (cal.kernels, *cal.input_shape), source)

    capture = run_capture(config, capture_request, console, data=data, check=readable)
    rows = capture_store.read(store)
    check_source(store, rows, data)
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
    shown = as_shown(data.images[rows.index[shown_rows]], hw)
    return save_overlay_png(
        shown,
        place_masks(rows.labels[shown_rows], hw),
        predict(model, rows.features[shown_rows]),
        folder / "overlays.png",
        f"{title}: mIoU {scores['miou']:.3f}",
    )
