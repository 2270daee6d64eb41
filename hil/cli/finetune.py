"""`hil finetune`: the backend trained on captured feature maps against an electronic teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import DataRootOpt, JsonOpt, RunsOpt, app, emit, epoch_printer, err


@app.command("finetune")
def finetune_cmd(
    captures: Annotated[
        Path, typer.Option(help="Capture store of the train split (from `hil capture`).")
    ],
    checkpoint: Annotated[Path, typer.Option(help="The student trained in simulation.")],
    teacher: Annotated[
        str, typer.Option(help="Teacher architecture (stored for the dataset) or checkpoint.")
    ] = "resnet18",
    method: Annotated[str, typer.Option(help="ce, kd or ntkd.")] = "ntkd",
    out: Annotated[Path, typer.Option(help="Fine-tuned student to write.")] = Path(
        "onn-finetuned.pt"
    ),
    test_captures: Annotated[
        Path | None, typer.Option(help="Capture store of the test split, to score the result.")
    ] = None,
    val_captures: Annotated[
        Path | None,
        typer.Option(
            help="Capture store of the val split: the epoch scoring best on it is kept "
            "(the untouched backend when no epoch beats it)."
        ),
    ] = None,
    fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Fraction of the store that trains (stratified); default: 10% of the split.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    lr: Annotated[float, typer.Option(min=0)] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    beta: Annotated[float, typer.Option(help="Weight of the NTK term.")] = 1.0,
    norm: Annotated[
        str, typer.Option(help="Kernel normalisation: none, diag, frobenius.")
    ] = "diag",
    projections: Annotated[int, typer.Option(min=1, help="Teacher NTK projections.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.1, help="KD temperature.")] = 4.0,
    seed: int = 0,
    data_root: DataRootOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fine-tune.")] = False,
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
    from hil.jobs.finetune import run_finetune
    from hil.ntkd.losses import FINETUNE_METHODS, loss_options
    from hil.output.records import Run, write_json
    from hil.training.loop import Settings

    options = loss_options(
        method, choices=FINETUNE_METHODS, temperature=temperature, beta=beta, norm=norm
    )
    args = {
        "captures": str(captures),
        "checkpoint": str(checkpoint),
        "teacher": teacher,
        "method": method,
        "out": str(out),
        "test_captures": str(test_captures) if test_captures else None,
        "val_captures": str(val_captures) if val_captures else None,
        "fraction": fraction,
        "epochs": epochs,
        "lr": lr,
        "options": options,
        "seed": seed,
    }
    with Run("finetune", runs_dir, None, args) as run:
        record = run_finetune(
            teacher,
            captures,
            checkpoint,
            method,
            out,
            Settings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
            fraction=fraction,
            test_captures=test_captures,
            val_captures=val_captures,
            data_root=data_root,
            loss_options=options,
            projections=projections,
            resume=resume,
            on_epoch=epoch_printer(err),
        )
        write_json(run.dir / "metrics.json", record.pop("history"))
        result = run.finish(record | {"checkpoint": str(out)})
    scores = "  ".join(
        f"{k.replace('_accuracy', '')} {result['before'][k]:.4f} → {result['after'][k]:.4f}"
        for k in result["after"]
    )
    emit(result, as_json, f"{method} fine-tune: {scores}; {out}")
