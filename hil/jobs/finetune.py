"""`hil finetune`: after fabrication, train only the digital backend on captured feature maps.

The frontend is glass now, so the student is its backend and its input is what the bench
captured. NTKD takes the student's kernel over the backend's parameters on those captures while
the teacher sees the raw images of the same dataset indices (`../shared/NTKD.md`, stage 3). By
default 10% of the captured train split trains; the other captured rows are held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.acquire import store as capture_store
from hil.acquire.identity import check_source
from hil.data.datasets import load_dataset
from hil.data.sampling import stratified_fraction
from hil.errors import UserError
from hil.jobs.train import Teaching
from hil.models.checkpoint import check_labels, check_maps, load_onn, save_model
from hil.models.onn import ONN
from hil.ntkd.losses import FINETUNE_METHODS, build_loss, check_method
from hil.ntkd.teacher_cache import cache_file, teacher_features, teacher_logits
from hil.training.loop import Settings, accuracy, fit, resume_path
from hil.training.teacher import load_teacher

DEFAULT_SPLIT_FRACTION = 0.1


def rows_for_training(
    captures: capture_store.Captures, fraction: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(training rows, held-out rows, fraction of the store used).

    `fraction=None` means 10% of the split, whatever fraction of it the store holds.
    """
    held = captures.identity.fraction or 1.0
    use = min(1.0, DEFAULT_SPLIT_FRACTION / held) if fraction is None else fraction
    if not 0 < use <= 1:
        raise UserError(f"--fraction {use}: must be in (0, 1]")
    rows = np.arange(len(captures.index))
    labels = captures.labels if captures.labels.ndim == 1 else np.zeros(len(rows), int)
    train = stratified_fraction(labels, rows, use, seed)
    return train, np.setdiff1d(rows, train), use


Tensors = dict[str, torch.Tensor]  # "x" (feature maps) and "y" (labels) of some captured rows


@dataclass(frozen=True)
class FinetuneRequest:
    """What `hil finetune` was asked: which stores train, watch and score, and how it is taught."""

    captures: Path  # the train split's store
    checkpoint: Path  # the student trained in simulation
    out: Path = Path("onn-finetuned.pt")
    teaching: Teaching = Teaching()
    test_captures: Path | None = None
    val_captures: Path | None = None  # the epoch scoring best on it is kept
    fraction: float | None = None  # of the store that trains; None: 10% of the split
    data_root: Path | None = None
    resume: bool = False

    def args(self, settings: Settings) -> dict[str, Any]:
        """The arguments a run record keeps."""
        path = {k: str(v) if v is not None else None for k, v in vars(self).items()}
        return {
            "captures": path["captures"],
            "checkpoint": path["checkpoint"],
            "teacher": self.teaching.teacher,
            "method": self.teaching.method,
            "out": path["out"],
            "test_captures": path["test_captures"],
            "val_captures": path["val_captures"],
            "fraction": self.fraction,
            "epochs": settings.epochs,
            "lr": settings.lr,
            "options": self.teaching.loss_options,
            "seed": settings.seed,
            "device": settings.device,
        }


@dataclass(frozen=True)
class Lesson:
    """What the backend learns from: captured rows, the rows its curve watches, and for KD and
    NTKD the teacher with the raw images of the training rows (and the teacher's checkpoint,
    beside which its logits and features of those rows are cached; None: not cached)."""

    train: Tensors
    watched: Tensors
    teacher: torch.nn.Module | None = None
    raw: torch.Tensor | None = None
    cache: Path | None = None


class _KeepBest:
    """Watches the epochs: remembers the backend of the best on the watched rows (-1: as given)."""

    def __init__(self, backend: torch.nn.Module, watched: Tensors, on_epoch=None) -> None:
        self.backend, self.on_epoch = backend, on_epoch
        self.best = {"val_accuracy": accuracy(backend, watched["x"], watched["y"]), "epoch": -1}
        self.state = self._copy()

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.backend.state_dict().items()}

    def __call__(self, metrics: dict[str, float]) -> None:
        if metrics["val_accuracy"] > self.best["val_accuracy"]:
            self.best.update(metrics)
            self.state = self._copy()
        if self.on_epoch is not None:
            self.on_epoch(metrics)


def teacher_extras(loss, lesson: Lesson, teaching: Teaching, device: str = "cpu"):
    """What the loss needs of the teacher per batch (rows of its cached logits or NTK features,
    computed on `device`), or None. The projections are seeded by `teaching.projection_seed`."""
    needs = getattr(loss, "needs", frozenset())
    if needs and (lesson.teacher is None or lesson.raw is None):
        raise ValueError("this method needs a teacher and the raw images")
    teacher, raw, beside = lesson.teacher, lesson.raw, lesson.cache
    if "teacher_logits" in needs:
        path = None if beside is None else cache_file(beside, "logits", raw)
        logits = teacher_logits(teacher, raw, path, device=device)
        return lambda idx: {"teacher_logits": logits[idx]}
    if "teacher_features" in needs:
        r, seed = teaching.projections, teaching.projection_seed
        path = None if beside is None else cache_file(beside, "ntk", raw, R=r, p=seed)
        feats = teacher_features(teacher, raw, path, r, seed, device=device)
        return lambda idx: {"teacher_features": feats[idx]}
    return None


def finetune(
    model: ONN,
    lesson: Lesson,
    teaching: Teaching,
    settings: Settings,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    keep_best: bool = False,
    on_epoch=None,
) -> tuple[list[dict[str, float]], int]:
    """Train `model.backend` in place on captured feature maps, on `settings.device` (where the
    whole model moves); the frontend stays frozen. Returns the metrics of every epoch and the
    epoch the backend ends with.

    `keep_best`: end with the epoch (or the untouched backend, -1) that scores best on the
    watched rows, so a fine-tune that does not help on validation captures changes nothing.
    """
    model.freeze_frontend()
    model.to(settings.device)
    loss = build_loss(teaching.method, **teaching.loss_options)
    extras = teacher_extras(loss, lesson, teaching, settings.device)
    watch = _KeepBest(model.backend, lesson.watched, on_epoch)
    history = fit(
        model.backend,
        loss,
        lesson.train,
        lesson.watched,
        settings,
        batch_extras=extras,
        resume_state=checkpoint,
        resume=resume,
        on_epoch=watch,
    )
    if not keep_best:
        return history, len(history) - 1
    model.backend.load_state_dict(watch.state)
    return history, int(watch.best["epoch"])


def _tensors(captures: capture_store.Captures, rows: np.ndarray | None = None) -> Tensors:
    rows = np.arange(len(captures.index)) if rows is None else rows
    return {
        "x": torch.as_tensor(captures.features[rows]),
        "y": torch.as_tensor(captures.labels[rows]).long(),
    }


def _read(model: ONN, path: Path | None) -> capture_store.Captures | None:
    """A capture store whose maps the student takes (None for no path)."""
    if path is None:
        return None
    found = capture_store.read(path)
    check_maps(model, found.features.shape[1:], path)
    check_labels(model, found.labels, path)
    return found


def _accuracies(model: ONN, scored: dict[str, Tensors | None]) -> dict[str, float]:
    """Accuracy of the backend on each scored set ("held_out", "test") that exists."""
    return {
        f"{name}_accuracy": accuracy(model.backend, rows["x"], rows["y"])
        for name, rows in scored.items()
        if rows is not None
    }


def _lesson(request: FinetuneRequest, found, train_rows, scored, val) -> tuple[Lesson, str]:
    """The lesson, and the name of the rows its curve watches: the validation captures (whose
    best epoch is kept), else the held-out captures, else the test captures (watched only: the
    last epoch is kept, nothing is selected on them), else the training rows themselves."""
    train = _tensors(found, train_rows)
    candidates = (("val", val), ("held out", scored["held_out"]), ("test", scored["test"]))
    watched, name = next(((v, k) for k, v in candidates if v is not None), (train, "train"))
    if request.teaching.method == "ce":
        return Lesson(train, watched), name
    dataset = found.identity.dataset
    teacher, _, t_path = load_teacher(request.teaching.teacher, dataset)
    data = load_dataset(dataset, request.data_root)
    check_source(request.captures, found, data)
    raw = torch.as_tensor(data.images[found.index[train_rows]])
    return Lesson(train, watched, teacher, raw, t_path), name


def run_finetune(request: FinetuneRequest, settings: Settings, on_epoch=None) -> dict[str, Any]:
    """Fine-tune the backend of `request.checkpoint` on a capture store; write it to `out`."""
    r = request
    method = check_method(r.teaching.method, FINETUNE_METHODS)
    model = load_onn(r.checkpoint)
    found = _read(model, r.captures)
    if found.identity.split != "train":
        raise UserError(
            f"{r.captures}: captured from the {found.identity.split} split; fine-tune on the "
            "train split and evaluate on the test split (--test-captures)"
        )
    train_rows, held_rows, used = rows_for_training(found, r.fraction, settings.seed)
    tests, vals = _read(model, r.test_captures), _read(model, r.val_captures)
    scored = {
        "held_out": _tensors(found, held_rows) if len(held_rows) else None,
        "test": _tensors(tests) if tests is not None else None,
    }
    lesson, watched = _lesson(
        r, found, train_rows, scored, _tensors(vals) if vals is not None else None
    )
    before = _accuracies(model, scored)
    history, kept = finetune(
        model,
        lesson,
        r.teaching,
        settings,
        checkpoint=resume_path(r.out),
        resume=r.resume,
        keep_best=vals is not None,
        on_epoch=on_epoch,
    )
    record = {
        "method": method,
        "teacher": r.teaching.teacher if method != "ce" else None,
        "dataset": found.identity.dataset,
        "captures": str(r.captures),
        "calibration_id": found.identity.calibration_id,
        "train_samples": int(len(train_rows)),
        "held_out_samples": int(len(held_rows)),
        "curve_watches": watched,
        "kept_epoch": kept,
        "fraction_of_store": used,
        "device": str(settings.device),
        "before": before,
        "after": _accuracies(model, scored),
        "history": history,
    }
    save_model(r.out, "student", model, {k: v for k, v in record.items() if k != "history"})
    resume_path(r.out).unlink(missing_ok=True)
    return record
