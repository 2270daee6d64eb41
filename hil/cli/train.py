"""`hil train`: the optical student in simulation, frontend and backend jointly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import (
    BatchSizeOpt,
    BenchOpt,
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
    TrainDatasetOpt,
    emit,
    epoch_printer,
    err,
    recorded,
    score,
)

MethodOpt = Annotated[str, typer.Option(help="none (CE only), kd or ntkd.")]
StudentOutOpt = Annotated[Path, typer.Option(help="Student checkpoint to write.")]
FrontendOpt = Annotated[str, typer.Option(help="psf or 4f.")]
KernelsOpt = Annotated[int, typer.Option(min=1)]
BackendOpt = Annotated[str, typer.Option(help="fc2, fc3, conv, or updecoder (segmentation).")]
VariantOpt = Annotated[str, typer.Option(help="mse or cka.")]
ResumeOpt = Annotated[
    bool, typer.Option(help="Continue an interrupted run from its resume state beside --out.")
]
AugmentOpt = Annotated[
    bool,
    typer.Option(
        help="Draw fabrication errors (gain, shift, rotation, kernel error; sizes from the "
        r"bench file's \[sim.fabrication]) and sensor noise afresh for every batch."
    ),
]
NoiseOpt = Annotated[
    float, typer.Option(min=0, help="With --augment: noise std relative to the maps' RMS.")
]


def train_cmd(  # noqa: PLR0913  typer: one parameter per command-line option
    dataset: TrainDatasetOpt = "digits",
    method: MethodOpt = "ntkd",
    teacher: TeacherOpt = "resnet18",
    out: StudentOutOpt = Path("onn.pt"),
    frontend: FrontendOpt = "psf",
    kernels: KernelsOpt = 8,
    kernel_size: KernelsOpt = 7,
    backend: BackendOpt = "fc2",
    epochs: EpochsOpt = 30,
    lr: LrOpt = 1e-2,
    batch_size: BatchSizeOpt = 128,
    beta: BetaOpt = 1.0,
    norm: NormOpt = "diag",
    variant: VariantOpt = "mse",
    projections: ProjectionsOpt = 64,
    temperature: TemperatureOpt = 4.0,
    seed: int = 0,
    resume: ResumeOpt = False,
    augment: AugmentOpt = False,
    noise: NoiseOpt = 0.01,
    bench: BenchOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Train the optical student in simulation (frontend and backend jointly).

    Also runs under `torchrun --nproc_per_node N -m hil train ...` as DistributedDataParallel.
    """
    from hil.bench.config import load_bench
    from hil.device import resolve_device
    from hil.errors import UserError
    from hil.jobs.train import StudentRequest, Teaching, plan_student, run_train
    from hil.models.onn import StudentSpec
    from hil.ntkd.losses import loss_options
    from hil.output.guard import check_output
    from hil.training.loop import Settings, ddp_rank_size

    check_output(out, "checkpoint", {"--teacher": Path(teacher), "--bench": bench}, force=force)
    on = resolve_device(device)
    options = loss_options(method, temperature=temperature, beta=beta, norm=norm, variant=variant)
    try:
        spec = StudentSpec(
            frontend=frontend, kernels=kernels, kernel_size=kernel_size, backend=backend, seed=seed
        )
    except ValueError as e:
        raise UserError(f"--{e}") from None
    request = StudentRequest(
        dataset=dataset,
        teaching=Teaching(method, teacher, options, projections),
        spec=spec,
        settings=Settings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=str(on)),
        out=out,
        resume=resume,
        augment_noise=noise if augment else None,
        data_root=data_root,
    )
    plan = plan_student(request, load_bench(bench), err)
    rank, _ = ddp_rank_size(on)
    runs = runs_dir if rank == 0 else runs_dir / f"rank{rank}"
    result = recorded(
        "train", runs, None, plan.args(), lambda _: run_train(plan, epoch_printer(err)), on
    )
    if rank == 0:
        emit(result, as_json, f"{method}: {score(result)}; {out}")
