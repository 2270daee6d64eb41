"""`hil teacher train`: an electronic teacher, trained locally on the raw images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import (
    DataRootOpt,
    DeviceOpt,
    EpochsOpt,
    JsonOpt,
    LrOpt,
    RunsOpt,
    TrainDatasetOpt,
    emit,
    epoch_printer,
    err,
    group,
    recorded,
    score,
)

app = group("Electronic teachers, trained locally.")

ArchOpt = Annotated[str, typer.Option(help="resnet18, lenet, alexnet or unet.")]
CheckpointOpt = Annotated[
    Path | None, typer.Option(help="Checkpoint path; default: where --teacher finds it.")
]


@app.command("train")
def teacher_train(  # noqa: PLR0913  typer: one parameter per command-line option
    arch: ArchOpt = "resnet18",
    dataset: TrainDatasetOpt = "digits",
    epochs: EpochsOpt = 15,
    lr: LrOpt = 1e-3,
    seed: int = 0,
    out: CheckpointOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOpt = "auto",
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Train an electronic teacher on the raw images and store it for `--teacher ARCH`."""
    from hil.device import resolve_device
    from hil.jobs.train import TeacherRequest, run_teacher_train
    from hil.output.guard import check_output
    from hil.training.loop import Settings

    if out is not None:
        check_output(out, "checkpoint")
    on = resolve_device(device)
    settings = Settings(epochs=epochs, lr=lr, seed=seed, device=str(on))
    request = TeacherRequest(arch, dataset, settings, out, data_root)
    result = recorded(
        "teacher train",
        runs_dir,
        None,
        request.args(),
        lambda _: run_teacher_train(request, on_epoch=epoch_printer(err)),
        device=on,
    )
    emit(result, as_json, f"{arch} on {dataset}: {score(result)}; stored {result['checkpoint']}")
