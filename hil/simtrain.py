"""`hil train`: the optical student trained in simulation, without transfer, with KD or with NTKD.

The student sees each image as the display shows it; the teacher sees the raw image. NTKD's
teacher kernel comes from fixed random projections of the teacher's Jacobian, computed once per
training set and cached beside the teacher checkpoint, so a step only multiplies cached features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hil import ntk
from hil.datasets import Dataset, to_display
from hil.losses import build_loss
from hil.models.onn import ONN, StudentSpec
from hil.training import Settings, accuracy, fit, save_checkpoint


def student_inputs(data: Dataset, split: str, spec: StudentSpec) -> dict[str, torch.Tensor]:
    idx = data.split(split)
    shown = to_display(data.images[idx], (spec.image_size, spec.image_size))
    return {
        "x": torch.as_tensor(shown),
        "y": torch.as_tensor(data.labels[idx]),
        "raw": torch.as_tensor(data.images[idx]),
    }


def teacher_features(
    teacher: torch.nn.Module,
    raw: torch.Tensor,
    cache: Path | None,
    projections: int,
    seed: int,
) -> torch.Tensor:
    """φ(x) = J(x)·v_r for every training image, (N, C, R); computed once and cached."""
    if cache is not None and cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        if state["n"] == len(raw) and torch.equal(state["checksum"], raw.sum().reshape(1)):
            return state["features"]
    projected = ntk.ProjectedTeacher(teacher, projections=projections, seed=seed)
    features = projected.features_dataset(raw, batch_size=128)
    if cache is not None:
        save_checkpoint(
            cache, {"features": features, "n": len(raw), "checksum": raw.sum().reshape(1)}
        )
    return features


def train_student(
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
) -> tuple[ONN, dict[str, Any]]:
    """Train frontend and backend jointly; returns the student after the last epoch, a record."""
    model = ONN(spec)
    loss = build_loss(method, **(loss_options or {}))
    train, val, test = (student_inputs(data, s, spec) for s in ("train", "val", "test"))
    needs = getattr(loss, "needs", frozenset())
    if needs and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    extras = None
    if "teacher_logits" in needs:
        teacher.eval()

        def extras(idx):
            with torch.no_grad():
                return {"teacher_logits": teacher(train["raw"][idx])}

    elif "teacher_features" in needs:
        feats = teacher_features(teacher, train["raw"], teacher_cache, projections, settings.seed)

        def extras(idx):
            return {"teacher_features": feats[idx]}

    history = fit(
        model,
        loss,
        {"x": train["x"], "y": train["y"]},
        val,
        settings,
        batch_extras=extras,
        checkpoint=checkpoint,
        resume=resume,
        extra_state={"spec": spec.to_dict()},
        on_epoch=on_epoch,
    )
    record = {
        "method": method,
        "dataset": data.name,
        "spec": spec.to_dict(),
        "test_accuracy": accuracy(model, test["x"], test["y"]),
        "val_accuracy": accuracy(model, val["x"], val["y"]),
        "history": history,
    }
    return model, record
