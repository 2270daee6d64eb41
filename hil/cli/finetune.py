"""`hil finetune`: the backend trained on captured feature maps against an electronic teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import (
    BatchSizeOpt,
    BetaOpt,
    DataRootOpt,
    DeviceOpt,
    EpochsOpt,
    ForceOpt,
    JsonOpt,
    LrOpt,
    NormOpt,
    ProjectionsOpt,
    RunsOpt,
    TeacherOpt,
    TemperatureOpt,
    emit,
    epoch_printer,
    err,
    recorded,
)

TrainStoreOpt = Annotated[
    Path, typer.Option(help="Capture store of the train split (from `hil capture`).")
]
StudentOpt = Annotated[Path, typer.Option(help="The student trained in simulation.")]
MethodOpt = Annotated[str, typer.Option(help="ce, kd or ntkd.")]
TunedOpt = Annotated[Path, typer.Option(help="Fine-tuned student to write.")]
TestStoreOpt = Annotated[
    Path | None, typer.Option(help="Capture store of the test split, to score the result.")
]
ValStoreOpt = Annotated[
    Path | None,
    typer.Option(
        help="Capture store of the val split: the epoch scoring best on it is kept "
        "(the untouched backend when no epoch beats it)."
    ),
]
TrainFractionOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Fraction of the store that trains (stratified); default: 10% of the split.",
    ),
]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted fine-tune.")]


def finetune_cmd(  # noqa: PLR0913  typer: one parameter per command-line option
    captures: TrainStoreOpt,
    checkpoint: StudentOpt,
    teacher: TeacherOpt = "resnet18",
    method: MethodOpt = "ntkd",
    out: TunedOpt = Path("onn-finetuned.pt"),
    test_captures: TestStoreOpt = None,
    val_captures: ValStoreOpt = None,
    fraction: TrainFractionOpt = None,
    epochs: EpochsOpt = 30,
    lr: LrOpt = 1e-3,
    batch_size: BatchSizeOpt = 128,
    beta: BetaOpt = 1.0,
    norm: NormOpt = "diag",
    projections: ProjectionsOpt = 64,
    temperature: TemperatureOpt = 4.0,
    seed: int = 0,
    data_root: DataRootOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune only the digital backend on feature maps the fabricated frontend produced.

    The frontend stays as fabricated; the backend trains on a small part of the captured train
    split (default 10% of the split) with cross-entropy (`ce`), Hinton KD (`kd`) or NTK
    distillation (`ntkd`: the teacher sees the raw images of the same samples). The other
    captured rows are held out and scored before and after, as is `--test-captures`.

        hil finetune --captures train.h5 --checkpoint onn.pt --teacher resnet18 \\
            --method ntkd --test-captures test.h5 --out onn-ntkd.pt
    """
    from hil.device import resolve_device
    from hil.jobs.finetune import FinetuneRequest, run_finetune
    from hil.jobs.train import Teaching
    from hil.ntkd.losses import FINETUNE_METHODS, loss_options
    from hil.output.guard import check_output
    from hil.training.loop import Settings

    inputs = {
        "--captures": captures,
        "--checkpoint": checkpoint,
        "--test-captures": test_captures,
        "--val-captures": val_captures,
        "--teacher": Path(teacher),
    }
    check_output(out, "checkpoint", inputs, force=force)
    on = resolve_device(device)
    options = loss_options(
        method, choices=FINETUNE_METHODS, temperature=temperature, beta=beta, norm=norm
    )
    request = FinetuneRequest(
        captures,
        checkpoint,
        out,
        Teaching(method, teacher, options, projections),
        test_captures=test_captures,
        val_captures=val_captures,
        fraction=fraction,
        data_root=data_root,
        resume=resume,
    )
    settings = Settings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=str(on))

    def job(_) -> dict:
        return run_finetune(request, settings, epoch_printer(err)) | {"checkpoint": str(out)}

    result = recorded("finetune", runs_dir, None, request.args(settings), job, on)
    emit(result, as_json, f"{method} fine-tune: {_scores(result)}; {out}")


def _scores(result: dict) -> str:
    """Each scored set's accuracy before → after: "held_out 0.81 → 0.93  test 0.80 → 0.92"."""
    before, after = result["before"], result["after"]
    return "  ".join(
        f"{k.replace('_accuracy', '')} {before[k]:.4f} → {after[k]:.4f}" for k in after
    )
