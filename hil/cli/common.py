"""What every `hil` command module shares: the typer apps, the consoles, the common options.

A command lives in the module of its subject (`hil/cli.py` for the bench and simulation,
`hil/cli_*.py` for the rest) and registers itself on `app` by decorator; `hil/cli.py` imports them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="Bring hybrid optical neural networks from simulation onto a real bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Bench files: the devices and the simulated world.", no_args_is_help=True
)
sim_app = typer.Typer(
    help="The simulated bench: see what the camera would see.", no_args_is_help=True
)
teacher_app = typer.Typer(help="Electronic teachers, trained locally.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(teacher_app, name="teacher")
app.add_typer(sim_app, name="sim")

out = Console()
err = Console(stderr=True)

BenchOpt = Annotated[
    Path | None,
    typer.Option(
        "--bench", help="Bench file (TOML); default: the simulated bench.", metavar="FILE"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result object as JSON on stdout.")]
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder with the dataset's files (mnist, cifar10, carvana)."),
]
CalibrationOpt = Annotated[Path, typer.Option("--calibration", help="Calibration file (HDF5).")]
DatasetOpt = Annotated[str, typer.Option(help="Dataset to show.")]
SplitOpt = Annotated[str, typer.Option(help="train, val or test.")]
FractionOpt = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Stratified fraction of the split.")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the subset (and of simulated noise).")]
RunsOpt = Annotated[Path, typer.Option("--runs-dir", help="Where run folders are written.")]


def emit(result: dict[str, Any], as_json: bool, summary: str = "") -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    elif summary:
        out.print(summary)


def epoch_printer(console: Console):
    def show(m: dict) -> None:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("epoch", "seconds"))
        console.print(f"epoch {m['epoch']:3d}  {terms}  ({m['seconds']:.1f} s)", highlight=False)

    return show
