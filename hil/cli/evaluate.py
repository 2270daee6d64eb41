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
    emit,
    err,
    recorded,
)

StudentOpt = Annotated[
    Path, typer.Option("--checkpoint", help="Student checkpoint (from `hil train`/`finetune`).")
]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        help="Capture store to use (resumed if incomplete) instead of a new one in --out; "
        "it must come from the same dataset, split, fraction, seed and calibration."
    ),
]
FolderOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Folder for the captures and pictures; default: the run's."),
]


def evaluate_cmd(  # noqa: PLR0913  typer: one parameter per command-line option
    checkpoint: StudentOpt,
    calibration: CalibrationOpt,
    bench: BenchOpt = None,
    dataset: DatasetOpt = "digits",
    split: SplitOpt = "test",
    fraction: FractionOpt = 1.0,
    seed: SeedOpt = 0,
    captures: StoreOpt = None,
    out: FolderOpt = None,
    data_root: DataRootOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Capture the split on the bench and score the student's backend on what it produced.

    Reports accuracy and writes a confusion matrix (classification), or reports mean IoU and
    writes mask overlays (segmentation), as PNG.
    """
    from hil.bench.config import load_bench
    from hil.jobs.evaluate import EvaluateRequest, run_evaluate
    from hil.output.guard import check_output

    if out is not None:
        check_output(out, "folder", {"--bench": bench})
    config = load_bench(bench)
    request = EvaluateRequest(
        checkpoint,
        calibration,
        dataset,
        split,
        fraction,
        seed,
        captures=captures,
        out=out,
        data_root=data_root,
    )
    result = recorded(
        "evaluate",
        runs_dir,
        config,
        request.args(),
        lambda run_dir: run_evaluate(config, request, run_dir, err),
    )
    classified = result["task"] == "classification"
    metric = f"accuracy {result['accuracy']:.4f}" if classified else f"mIoU {result['miou']:.4f}"
    where = f"{result['n']} samples of {dataset}/{split} captured on the bench"
    emit(
        result, as_json, f"{metric} on {where}; {result['figure']}; run record {result['run_dir']}"
    )
