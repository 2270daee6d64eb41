"""The demo's report folder: a markdown summary and the pictures it links."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.atomic import atomic_write_text
from hil.acquire.store import read
from hil.data.datasets import Dataset
from hil.data.placement import to_display
from hil.models.onn import ONN
from hil.output.figures import plt, save_confusion_png, save_figure, save_map_sheet


def save_confusions(confusions: dict[str, np.ndarray], out_dir: Path) -> dict[str, Path]:
    paths = {}
    for name, matrix in confusions.items():
        slug = name.lower().replace(" ", "_").replace("-", "")
        title = f"{name}: {np.trace(matrix) / matrix.sum():.1%}"
        paths[f"confusion matrix, {name}"] = save_confusion_png(
            matrix, out_dir / f"confusion_{slug}.png", title
        )
    return paths


def save_training_curves(histories: dict[str, list[dict[str, float]]], path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, history in histories.items():
        epochs = [h["epoch"] + 1 for h in history]
        axes[0].plot(epochs, [h["total"] for h in history], label=name)
        axes[1].plot(epochs, [h["val_accuracy"] for h in history], label=name)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    axes[1].set(
        xlabel="epoch",
        ylabel="accuracy",
        title="validation (fine-tunes: captured val split)",
    )
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


@torch.no_grad()
def save_design_vs_bench(student: ONN, test_store: Path, data: Dataset, path, samples: int = 3):
    """Feature maps the student was trained to produce next to the ones the bench gave."""
    caps = read(test_store)
    rows = []
    for i in range(samples):
        image = data.images[caps.index[i] : caps.index[i] + 1]
        side = student.spec.image_size
        designed = student.features(torch.as_tensor(to_display(image, (side, side))))[0]
        label = int(caps.labels[i])
        rows += [(f"{label}: design", designed.numpy()), (f"{label}: bench", caps.features[i])]
    save_map_sheet(rows, path, "feature maps: the trained design vs the fabricated bench")


def write_pictures(
    out_dir: Path,
    *,
    student: ONN,
    test_store: Path,
    data: Dataset,
    histories: dict[str, list[dict[str, float]]],
    confusions: dict[str, np.ndarray],
) -> dict[str, Path]:
    paths = {
        "training curves": out_dir / "training_curves.png",
        "feature maps": out_dir / "feature_maps.png",
    }
    save_training_curves(histories, paths["training curves"])
    save_design_vs_bench(student, test_store, data, paths["feature maps"])
    return paths | save_confusions(confusions, out_dir)


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}%"


def headline(result: dict[str, Any]) -> str:
    """What the fabrication cost and what each fine-tune won back, in one sentence."""
    acc, plan = result["accuracy"], result.get("plan", {})
    lost = acc["ONN in simulation (as designed)"] - acc["no compensation"]
    won = "; ".join(
        f"{name} recovered {_pct(rec)}" for name, rec in result["recovered_fraction"].items()
    )
    teacher = f" (teacher: {plan['teacher']})" if "teacher" in plan else ""
    return f"The fabrication cost {100 * lost:.1f} points; {won}{teacher}."


def write_summary(path: Path, result: dict[str, Any]) -> None:
    out_dir = Path(result["out_dir"])
    dataset = result.get("plan", {}).get("dataset", "digits")
    lines = [
        f"# hil demo: {dataset} through a fabricated optical frontend",
        "",
        headline(result),
        "",
        "| model | test accuracy | accuracy lost to fabrication recovered |",
        "| --- | ---: | ---: |",
    ]
    for name, acc in result["accuracy"].items():
        rec = result["recovered_fraction"].get(name)
        lines.append(f"| {name} | {_pct(acc)} | {'' if rec is None else _pct(rec)} |")
    fab = result["fabrication"]
    cal = result["calibration"]
    lines += [
        "",
        f"Captured {result['captured']['train']} train samples (the fine-tuning set), "
        f"{result['captured']['val']} val samples (to keep the best fine-tuning epoch) and "
        f"{result['captured']['test']} test samples on the simulated bench.",
        "",
        "Fabrication errors of the simulated bench: "
        + ", ".join(f"{k} {v}" for k, v in fab.items()),
        "",
        "Calibration: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in cal.items()),
        "",
        "## Pictures",
        "",
    ]
    for name, picture in result["pictures"].items():
        rel = Path(picture).relative_to(out_dir)
        lines += [f"### {name}", "", f"![{name}]({rel.as_posix()})", ""]
    lines += ["## Steps", "", "| step | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
