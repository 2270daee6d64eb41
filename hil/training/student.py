"""`hil train`: the optical student trained in simulation, without transfer, with KD or with NTKD.

The student sees each image as the display shows it; the teacher sees the raw image. What the
teacher says is computed once per training set and cached beside the teacher checkpoint
(`hil.ntkd.teacher_cache`), whatever the seed: KD's logits, and NTKD's teacher kernel as fixed
random projections of the teacher's Jacobian, so a step only reads cached rows by sample index.

Segmentation: the student's logit map covers the whole display, so its target is the mask placed
exactly where `to_display` puts the image (`hil.data.placement`), with the display around it
labelled IGNORE; KD's teacher logits are placed the same way, and the NTK is traced over the
logits of the image's region pooled to a small grid, for the teacher over its whole (raw) output.

Fabrication-error augmentation (`hil.ntkd.augment`) trains the student through a freshly
"fabricated" optic every batch, so the design tolerates the glass it will become.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hil.data.datasets import Dataset
from hil.data.placement import FILL, display_region, place_maps, place_masks, to_display
from hil.errors import UserError
from hil.models.checkpoint import save_model
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.augment import FabricatedStudent, FabricationAugment
from hil.ntkd.losses import build_loss
from hil.ntkd.teacher_cache import PROJECTION_SEED, cache_file, teacher_features, teacher_logits
from hil.training.loop import (
    Settings,
    accuracy,
    best_epoch,
    ddp_rank_size,
    fit,
    resume_path,
    task_metric,
)

Extras = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def student_inputs(data: Dataset, split: str, spec: StudentSpec) -> dict[str, torch.Tensor]:
    """Display images "x", targets "y" (labels, or masks placed on the display) and raw images."""
    idx = data.split(split)
    hw = (spec.image_size, spec.image_size)
    shown = to_display(data.images[idx], hw, FILL)
    labels = data.labels[idx]
    if data.task == "segmentation":
        labels = place_masks(labels, hw)
    return {
        "x": torch.as_tensor(shown),
        "y": torch.as_tensor(labels),
        "raw": torch.as_tensor(data.images[idx]),
    }


def train_student(  # noqa: PLR0913  the `hil train` options, each named at its one call
    spec: StudentSpec,
    data: Dataset,
    method: str,
    settings: Settings,
    *,
    teacher: torch.nn.Module | None = None,
    teacher_cache: Path | None = None,
    loss_options: dict[str, Any] | None = None,
    projections: int = 64,
    projection_seed: int = PROJECTION_SEED,
    out: Path | None = None,
    resume: bool = False,
    on_epoch=None,
    augment: FabricationAugment | None = None,
) -> tuple[ONN, dict[str, Any]]:
    """Train frontend and backend jointly; returns the student of the epoch that scored best on
    val (`record["best_epoch"]`) and a record.

    Segmentation datasets need the `updecoder` backend and are judged by mIoU (`test_miou`,
    `val_miou`, history `val_miou`; `test_accuracy` is then the pixel accuracy). `augment` trains
    through random fabrication errors; validation and test see the designed optic.

    `teacher_cache`: a path (the teacher's checkpoint) beside which the teacher's logits (KD)
    and projected features (NTKD) of the training set are cached, named after its stem
    (`teacher_cache.cache_file`); None computes them afresh. Training runs on `settings.device`.

    With `out`, the resume state goes to `resume_path(out)` after every epoch (`resume` continues
    from it), and the finished student to the model file `out`, which removes the resume state.
    """
    model, (train, val, test), loss = _setup(spec, data, method, loss_options)
    hw = (spec.image_size, spec.image_size) if data.task == "segmentation" else None

    raw, device = train["raw"], settings.device

    def features(pool: int | None) -> torch.Tensor:
        tags = {"R": projections, "p": projection_seed, "pool": pool}
        path = None if teacher_cache is None else cache_file(teacher_cache, "ntk", raw, **tags)
        args = (teacher, raw, path, projections, projection_seed)
        return teacher_features(*args, pool=pool, device=device)

    def logits() -> torch.Tensor:
        path = None if teacher_cache is None else cache_file(teacher_cache, "logits", raw)
        return teacher_logits(teacher, raw, path, device=device)

    extras = _teacher_extras(loss, method, teacher, hw, features, logits)
    net = model
    if augment is not None:
        net = FabricatedStudent(model, augment)
        extras = _augmented_extras(net, train["x"], extras)
    name, metric = task_metric(data.task, data.classes)
    history = fit(
        net,
        loss,
        {"x": train["x"], "y": train["y"]},
        val,
        settings,
        batch_extras=extras,
        resume_state=resume_path(out) if out is not None else None,
        resume=resume,
        extra_state={"spec": spec.to_dict()},
        on_epoch=on_epoch,
        metric=metric,
        metric_name=name,
        keep_best=True,
    )
    scores = {
        f"{s}_{name}": metric(model, d["x"], d["y"]) for s, d in (("test", test), ("val", val))
    }
    record = {"method": method, "dataset": data.name, "data": data.provenance()}
    record |= {"spec": spec.to_dict(), **scores, "best_epoch": best_epoch(history, name)}
    record["device"] = str(settings.device)
    record |= {"history": history} | ({"augment": augment.to_dict()} if augment else {})
    if name != "accuracy":
        record["test_accuracy"] = accuracy(model, test["x"], test["y"])
    if out is not None and ddp_rank_size()[0] == 0:  # rank 0 writes the one model file
        save_model(out, "student", model, {k: v for k, v in record.items() if k != "history"})
        resume_path(out).unlink(missing_ok=True)
    return model, record


def _setup(
    spec: StudentSpec, data: Dataset, method: str, loss_options: dict[str, Any] | None
) -> tuple[ONN, list[dict[str, torch.Tensor]], Any]:
    """The untrained student, its (train, val, test) inputs and the loss (for segmentation
    NTKD, over the logits of the image's region on the display)."""
    segmentation = data.task == "segmentation"
    if segmentation != (spec.backend == "updecoder"):
        need = "the updecoder backend" if segmentation else "a classification backend"
        raise UserError(f"{data.name} is a {data.task} dataset: it needs {need}")
    model = ONN(spec)
    options = dict(loss_options or {})
    splits = [student_inputs(data, s, spec) for s in ("train", "val", "test")]
    hw = (spec.image_size, spec.image_size)
    if segmentation and method == "ntkd":
        options.setdefault("region", display_region(data.images.shape[-2:], hw))
    return model, splits, build_loss(method, **options)


def _teacher_extras(
    loss: Any,
    method: str,
    teacher: torch.nn.Module | None,
    display_hw: tuple[int, int] | None,
    features: Callable[[int | None], torch.Tensor],
    logits: Callable[[], torch.Tensor],
) -> Extras | None:
    """What the loss needs from the teacher per batch: KD's cached logits (`logits()`), NTKD's
    cached features (`features(pool)`, pooled for logit maps), or nothing."""
    needs = getattr(loss, "needs", frozenset())
    if needs and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    parts = []
    if "teacher_logits" in needs:
        parts.append(_logit_extras(logits(), display_hw))
    if "teacher_features" in needs:
        parts.append(_feature_extras(features(loss.pool if display_hw is not None else None)))
    if len(parts) < 2:
        return parts[0] if parts else None
    return lambda idx: {k: v for part in parts for k, v in part(idx).items()}


def _logit_extras(logits: torch.Tensor, display_hw: tuple[int, int] | None) -> Extras:
    """KD's per-batch rows of the cached teacher logits (of the raw images), placed on the
    display for logit maps."""

    def extras(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = logits[idx]
        return {"teacher_logits": rows if display_hw is None else place_maps(rows, display_hw)}

    return extras


def _feature_extras(features: torch.Tensor) -> Extras:
    """NTKD's per-batch rows of the cached teacher features."""

    def extras(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher_features": features[idx]}

    return extras


def _augmented_extras(net: FabricatedStudent, x: torch.Tensor, inner: Extras | None) -> Extras:
    """`inner`'s extras, and the batch's input drawn through a new fabricated optic."""

    def extras(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        out = inner(idx) if inner is not None else {}
        return out | {"x": net.redraw(idx, x[idx])}

    return extras
