"""Electronic teachers, trained locally (nothing is downloaded), stored where `--teacher` looks.

`--teacher resnet18` means the resnet18 trained on the same dataset, in `$HIL_TEACHERS`
(default ~/.cache/hil/teachers); `--teacher path.pt` names a checkpoint file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hil.data.datasets import Dataset
from hil.errors import UserError
from hil.models.checkpoint import TEACHER_ARCH, load_model, save_model
from hil.models.teachers import TEACHERS, build_teacher
from hil.training.loop import Settings, accuracy, best_epoch, fit, task_metric


def teacher_dir() -> Path:
    return Path(os.environ.get("HIL_TEACHERS", Path.home() / ".cache" / "hil" / "teachers"))


def teacher_path(arch: str, dataset: str) -> Path:
    return teacher_dir() / f"{dataset}-{arch}.pt"


def tensors(data: Dataset, split: str) -> dict[str, torch.Tensor]:
    idx = data.split(split)
    return {
        "x": torch.as_tensor(data.images[idx]),
        "y": torch.as_tensor(data.labels[idx]),
        "idx": torch.as_tensor(idx),
    }


def train_teacher(
    arch: str, data: Dataset, settings: Settings, on_epoch=None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train on the raw images of the train split; keep the epoch with the best val metric.

    Classification is judged by accuracy; segmentation (masks, CE per pixel) by mIoU over the
    split, recorded as `val_miou`/`test_miou`, with `test_accuracy` the pixel accuracy.
    """
    segmentation = data.task == "segmentation"
    if segmentation != (arch == "unet"):
        need = "the unet" if segmentation else "a classifier (resnet18, lenet, alexnet)"
        raise UserError(f"{data.name} is a {data.task} dataset: its teacher is {need}")
    torch.manual_seed(settings.seed)
    model = build_teacher(arch, data.images.shape[1], data.classes)
    train, val, test = (tensors(data, s) for s in ("train", "val", "test"))
    name, metric = task_metric(data.task, data.classes)

    def ce(net, batch):  # per pixel for logit maps (N, C, H, W) and masks (N, H, W)
        loss = nn.functional.cross_entropy(net(batch["x"]), batch["y"])
        return {"ce": loss, "total": loss}

    key = f"val_{name}"
    history = fit(
        model,
        ce,
        {"x": train["x"], "y": train["y"]},
        val,
        settings,
        on_epoch=on_epoch,
        metric=metric,
        metric_name=name,
        keep_best=True,
    )
    model.eval()
    record = {
        "arch": arch,
        "dataset": data.name,
        "data": data.provenance(),
        "task": data.task,
        "in_channels": int(data.images.shape[1]),
        "classes": data.classes,
        "settings": _settings_record(settings),
        "best_epoch": best_epoch(history, name),
        key: max(h[key] for h in history),
        f"test_{name}": metric(model, test["x"], test["y"]),
        "history": history,
    }
    if segmentation:
        record["test_accuracy"] = accuracy(model, test["x"], test["y"])
    return model, record


def save_teacher(model: nn.Module, record: dict[str, Any], path: Path) -> None:
    """The teacher's model file: its architecture and the record of `train_teacher` (no history,
    which the run's metrics.json holds)."""
    arch = {k: record[k] for k in TEACHER_ARCH}
    save_model(
        path, "teacher", model, {k: v for k, v in record.items() if k != "history"}, arch=arch
    )


def stored_teacher(
    arch: str, data: Dataset, settings: Settings, path: Path, on_epoch=None
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher at `path`, trained (and saved there) first when it is missing or was trained
    with other settings than `settings`: (model, info). A script that
    asks for 40 epochs never silently gets the 3-epoch teacher an earlier run left."""
    if path.exists():
        model, info, _ = load_teacher(str(path), data.name)
        if info.get("arch") == arch and info.get("settings") == _settings_record(settings):
            return model, info
    model, record = train_teacher(arch, data, settings, on_epoch)
    save_teacher(model, record, path)
    model, info, _ = load_teacher(str(path), data.name)
    return model, info


def _settings_record(settings: Settings) -> dict[str, Any]:
    return {k: getattr(settings, k) for k in ("epochs", "lr", "batch_size", "seed")}


def load_teacher(spec: str, dataset: str) -> tuple[nn.Module, dict[str, Any], Path]:
    """`spec` is an architecture name (the stored teacher for `dataset`) or a checkpoint path."""
    path = Path(spec) if spec.endswith(".pt") or os.sep in spec else teacher_path(spec, dataset)
    if not path.exists():
        if spec in TEACHERS:
            raise UserError(
                f"no {spec} teacher for {dataset} in {path.parent}; train one with "
                f"`hil teacher train --arch {spec} --dataset {dataset}`"
            )
        raise UserError(f"{path}: teacher checkpoint not found")
    model, info = load_model(path, "teacher")
    if info.get("dataset") != dataset:
        raise UserError(f"{path}: a teacher for {info.get('dataset')}, not {dataset}")
    return model, info, path
