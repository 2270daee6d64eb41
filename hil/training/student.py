"""`hil train`: the optical student trained in simulation, without transfer, with KD or with NTKD.

The student sees each image as the display shows it; the teacher sees the raw image. NTKD's
teacher kernel comes from fixed random projections of the teacher's Jacobian, computed once per
training set and cached beside the teacher checkpoint (`hil.ntkd.teacher_cache`), so a step only
multiplies cached features.

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
from hil.models.onn import ONN, StudentSpec
from hil.ntkd.augment import FabricatedStudent, FabricationAugment
from hil.ntkd.losses import build_loss
from hil.ntkd.teacher_cache import teacher_features
from hil.training.loop import Settings, accuracy, fit, task_metric

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
    checkpoint: Path | None = None,
    resume: bool = False,
    on_epoch=None,
    augment: FabricationAugment | None = None,
) -> tuple[ONN, dict[str, Any]]:
    """Train frontend and backend jointly; returns the student after the last epoch, a record.

    Segmentation datasets need the `updecoder` backend and are judged by mIoU (`test_miou`,
    `val_miou`, history `val_miou`; `test_accuracy` is then the pixel accuracy). `augment` trains
    through random fabrication errors; validation and test see the designed optic.
    """
    segmentation = data.task == "segmentation"
    if segmentation != (spec.backend == "updecoder"):
        need = "the updecoder backend" if segmentation else "a classification backend"
        raise UserError(f"{data.name} is a {data.task} dataset: it needs {need}")
    model = ONN(spec)
    options = dict(loss_options or {})
    train, val, test = (student_inputs(data, s, spec) for s in ("train", "val", "test"))
    hw = (spec.image_size, spec.image_size)
    if segmentation and method == "ntkd":
        options.setdefault("region", display_region(data.images.shape[-2:], hw))
    loss = build_loss(method, **options)
    needs = getattr(loss, "needs", frozenset())
    if needs and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    extras: Extras | None = None
    if "teacher_logits" in needs:
        extras = _logit_extras(teacher, train["raw"], hw if segmentation else None)
    elif "teacher_features" in needs:
        pool = loss.pool if segmentation else None
        feats = teacher_features(
            teacher, train["raw"], teacher_cache, projections, settings.seed, pool=pool
        )
        extras = _feature_extras(feats)
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
        checkpoint=checkpoint,
        resume=resume,
        extra_state={"spec": spec.to_dict()},
        on_epoch=on_epoch,
        metric=metric,
        metric_name=name,
    )
    record = {
        "method": method,
        "dataset": data.name,
        "spec": spec.to_dict(),
        f"test_{name}": metric(model, test["x"], test["y"]),
        f"val_{name}": metric(model, val["x"], val["y"]),
        "history": history,
    }
    if name != "accuracy":
        record["test_accuracy"] = accuracy(model, test["x"], test["y"])
    if augment is not None:
        record["augment"] = augment.to_dict()
    return model, record


def _logit_extras(teacher: torch.nn.Module, raw: torch.Tensor, display_hw) -> Extras:
    """KD's per-batch teacher logits on the raw images, placed on the display for logit maps."""
    teacher.eval()

    def extras(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = teacher(raw[idx])
        return {"teacher_logits": logits if display_hw is None else place_maps(logits, display_hw)}

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
