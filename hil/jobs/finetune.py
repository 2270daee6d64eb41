"""`hil finetune`: after fabrication, train only the digital backend on captured feature maps.

The frontend is glass now, so the student is its backend and its input is what the bench
captured. NTKD takes the student's kernel over the backend's parameters on those captures while
the teacher sees the raw images of the same dataset indices (`../shared/NTKD.md`, stage 3). By
default 10% of the captured train split trains; the other captured rows are held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.acquire import store as capture_store
from hil.acquire.identity import check_source
from hil.data.datasets import load_dataset
from hil.data.sampling import stratified_fraction
from hil.errors import UserError
from hil.models.checkpoint import check_maps, load_onn, save_model
from hil.models.onn import ONN
from hil.ntkd.losses import FINETUNE_METHODS, build_loss, check_method
from hil.ntkd.teacher_cache import teacher_features
from hil.training.loop import Settings, accuracy, fit, resume_path

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


def finetune(
    model: ONN,
    features: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    settings: Settings,
    *,
    val: dict[str, torch.Tensor],
    teacher: torch.nn.Module | None = None,
    raw: torch.Tensor | None = None,
    loss_options: dict[str, Any] | None = None,
    projections: int = 64,
    checkpoint: Path | None = None,
    resume: bool = False,
    keep_best: bool = False,
    on_epoch=None,
) -> tuple[list[dict[str, float]], int]:
    """Train `model.backend` in place on captured `features`; the frontend stays frozen.
    Returns the metrics of every epoch and the epoch the backend ends with.

    `keep_best`: end with the epoch (or the untouched backend, -1) that scores best on `val`, so
    a fine-tune that does not help on validation captures changes nothing.
    """
    model.freeze_frontend()
    backend = model.backend
    loss = build_loss(method, **(loss_options or {}))
    needs = getattr(loss, "needs", frozenset())
    extras = None
    if needs and (teacher is None or raw is None):
        raise ValueError(f"method {method!r} needs a teacher and the raw images")
    if "teacher_logits" in needs:
        teacher.eval()
        with torch.no_grad():
            logits = teacher(raw)

        def extras(idx):
            return {"teacher_logits": logits[idx]}

    elif "teacher_features" in needs:
        feats = teacher_features(teacher, raw, None, projections, settings.seed)

        def extras(idx):
            return {"teacher_features": feats[idx]}

    best = {"val_accuracy": accuracy(backend, val["x"], val["y"]), "epoch": -1}
    best["state"] = {k: v.clone() for k, v in backend.state_dict().items()}

    def watch(metrics: dict[str, float]) -> None:
        if metrics["val_accuracy"] > best["val_accuracy"]:
            best.update(metrics, state={k: v.clone() for k, v in backend.state_dict().items()})
        if on_epoch is not None:
            on_epoch(metrics)

    history = fit(
        backend,
        loss,
        {"x": features, "y": labels},
        val,
        settings,
        batch_extras=extras,
        resume_state=checkpoint,
        resume=resume,
        on_epoch=watch,
    )
    if not keep_best:
        return history, len(history) - 1
    backend.load_state_dict(best["state"])
    return history, int(best["epoch"])


def _tensors(captures: capture_store.Captures, rows: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "x": torch.as_tensor(captures.features[rows]),
        "y": torch.as_tensor(captures.labels[rows]).long(),
    }


def run_finetune(
    teacher: str,
    captures: Path,
    checkpoint: Path,
    method: str,
    out: Path,
    settings: Settings,
    *,
    fraction: float | None = None,
    test_captures: Path | None = None,
    val_captures: Path | None = None,
    data_root: Path | None = None,
    loss_options: dict[str, Any] | None = None,
    projections: int = 64,
    resume: bool = False,
    on_epoch=None,
) -> dict[str, Any]:
    """Fine-tune the backend of `checkpoint` on a capture store; write the student to `out`."""
    from hil.training.teacher import load_teacher

    check_method(method, FINETUNE_METHODS)
    model = load_onn(checkpoint)
    found = capture_store.read(captures)
    check_maps(model, found.features.shape[1:], captures)
    train_rows, held_rows, used = rows_for_training(found, fraction, settings.seed)
    dataset = found.identity.dataset
    if found.identity.split != "train":
        raise UserError(
            f"{captures}: captured from the {found.identity.split} split; fine-tune on the "
            "train split and evaluate on the test split (--test-captures)"
        )
    tests = None
    if test_captures is not None:
        tests = capture_store.read(test_captures)
        check_maps(model, tests.features.shape[1:], test_captures)
    t_model = raw = None
    if method != "ce":
        t_model, _, _ = load_teacher(teacher, dataset)
        data = load_dataset(dataset, data_root)
        check_source(captures, found.identity, found.index, found.meta["pattern_hash"], data)
        raw = torch.as_tensor(data.images[found.index[train_rows]])
    train = _tensors(found, train_rows)
    held = _tensors(found, held_rows) if len(held_rows) else None
    test = _tensors(tests, np.arange(len(tests.index))) if tests is not None else None
    val = None
    if val_captures is not None:
        found_val = capture_store.read(val_captures)
        check_maps(model, found_val.features.shape[1:], val_captures)
        val = _tensors(found_val, np.arange(len(found_val.index)))
    # the epoch curve watches the validation captures (and the best epoch on them is kept), else
    # held-out captures, else the test captures (watched only: the last epoch is kept, nothing is
    # selected on them), else the training rows themselves
    watched, watched_name = next(
        (v, k)
        for k, v in (("val", val), ("held out", held), ("test", test), ("train", train))
        if v is not None
    )

    def scores() -> dict[str, float]:
        s = {}
        if held is not None:
            s["held_out_accuracy"] = accuracy(model.backend, held["x"], held["y"])
        if test is not None:
            s["test_accuracy"] = accuracy(model.backend, test["x"], test["y"])
        return s

    before = scores()
    history, kept = finetune(
        model,
        train["x"],
        train["y"],
        method,
        settings,
        val=watched,
        teacher=t_model,
        raw=raw,
        loss_options=loss_options,
        projections=projections,
        checkpoint=resume_path(out),
        resume=resume,
        keep_best=val is not None,
        on_epoch=on_epoch,
    )
    record = {
        "method": method,
        "teacher": teacher if method != "ce" else None,
        "dataset": dataset,
        "captures": str(captures),
        "calibration_id": found.identity.calibration_id,
        "train_samples": int(len(train_rows)),
        "held_out_samples": int(len(held_rows)),
        "curve_watches": watched_name,
        "kept_epoch": kept,
        "fraction_of_store": used,
        "before": before,
        "after": scores(),
        "history": history,
    }
    save_model(out, "student", model, {k: v for k, v in record.items() if k != "history"})
    resume_path(out).unlink(missing_ok=True)
    return record
