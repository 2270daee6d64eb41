"""`hil evaluate`: live inference on the bench, scored, with a picture a person can open."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import (
    BenchOpt,
    CalibrationOpt,
    DataRootOpt,
    DatasetOpt,
    FractionOpt,
    JsonOpt,
    RunsOpt,
    SeedOpt,
    SplitOpt,
    app,
    emit,
    err,
)

OVERLAY_SAMPLES = 6


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="Student checkpoint (from `hil train`/`finetune`).")
    ],
    calibration: CalibrationOpt,
    bench: BenchOpt = None,
    dataset: DatasetOpt = "digits",
    split: SplitOpt = "test",
    fraction: FractionOpt = 1.0,
    seed: SeedOpt = 0,
    captures: Annotated[
        Path | None,
        typer.Option(
            help="Capture store to use (resumed if incomplete) instead of a new one in --out; "
            "it must come from the same dataset, split, fraction, seed and calibration."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the captures and pictures; default: the run's."),
    ] = None,
    data_root: DataRootOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Capture the split on the bench and score the student's backend on what it produced.

    Reports accuracy and writes a confusion matrix (classification), or reports mean IoU and
    writes mask overlays (segmentation), as PNG.
    """
    from calibration import calfile
    from hil.acquire.capture import run_capture
    from hil.acquire.store import read
    from hil.bench.config import load_bench
    from hil.data.datasets import load_dataset
    from hil.data.placement import place_masks, to_display
    from hil.jobs.evaluate import evaluate_store, predict, save_confusion_png, save_overlay_png
    from hil.models.checkpoint import check_maps, load_onn
    from hil.output.records import Run

    config = load_bench(bench)
    model = load_onn(checkpoint)
    cal = calfile.load(calibration)  # before capturing: a student that cannot read it fails now
    check_maps(model, (cal.kernels, *cal.display_shape[:2]), f"{checkpoint} with {calibration}")
    args = {
        "checkpoint": str(checkpoint),
        "calibration": str(calibration),
        "dataset": dataset,
        "split": split,
        "fraction": fraction,
        "seed": seed,
        "captures": str(captures) if captures else None,
        "out": str(out) if out else None,
        "data_root": str(data_root) if data_root else None,
    }
    with Run("evaluate", runs_dir, config, args) as run:
        folder = out or run.dir
        store = captures or folder / "captures.h5"
        capture = run_capture(
            config,
            calibration,
            dataset,
            split,
            store,
            err,
            fraction=fraction,
            seed=seed,
            data_root=data_root,
        )
        scores = evaluate_store(model, store)
        if scores["task"] == "classification":
            picture = save_confusion_png(
                scores["confusion"],
                folder / "confusion.png",
                f"{checkpoint.name} on {dataset}/{split} (bench): "
                f"accuracy {scores['accuracy']:.3f}, n={scores['n']}",
            )
        else:
            rows = read(store)
            rows_shown = slice(0, OVERLAY_SAMPLES)
            hw = rows.features.shape[-2:]
            data = load_dataset(dataset, data_root)
            shown = to_display(data.images[rows.index[rows_shown]], hw)
            shown = shown[:, 0] if shown.shape[1] == 1 else shown.transpose(0, 2, 3, 1)
            picture = save_overlay_png(
                shown,
                place_masks(rows.labels[rows_shown], hw),
                predict(model, rows.features[rows_shown]),
                folder / "overlays.png",
                f"{checkpoint.name} on {dataset}/{split} (bench): mIoU {scores['miou']:.3f}",
            )
        result = run.finish(
            {
                "checkpoint": str(checkpoint),
                "dataset": dataset,
                "split": split,
                "captures": str(store),
                "figure": str(picture),
                **scores,
                "capture": {
                    k: capture[k]
                    for k in ("planned", "captured", "resumed_from", "calibration_id", "simulated")
                },
            }
        )
    metric = (
        f"accuracy {scores['accuracy']:.4f}"
        if scores["task"] == "classification"
        else f"mIoU {scores['miou']:.4f}"
    )
    emit(
        result,
        as_json,
        f"{metric} on {scores['n']} samples of {dataset}/{split} captured on the bench; "
        f"{picture}; run record {run.dir}",
    )
