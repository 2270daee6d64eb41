"""`hil estimate`: how many kernels fit, and what accuracy they buy, before anything is made."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hil.cli.common import DATASETS_HELP, DeviceOpt, JsonOpt, RunsOpt, emit, err, out, recorded
from hil.design.defaults import DEFAULT_SEEDS, DEFAULT_TRAIN_SIZE
from hil.errors import UserError

DatasetOpt = Annotated[str, typer.Option(help=f"Dataset to estimate on: {DATASETS_HELP}")]
DataRootOpt = Annotated[
    Path | None, typer.Option(help="Where mnist/cifar10 files are (default: their cache).")
]
KernelsOpt = Annotated[str, typer.Option(help="Candidate kernel counts, comma-separated.")]
KernelSizeOpt = Annotated[int, typer.Option(min=1, help="Kernel (PSF) side in pixels.")]
SignedOpt = Annotated[
    bool, typer.Option("--signed/--unsigned", help="Signed kernels take a ± pair of PSFs.")
]
MetasurfaceOpt = Annotated[
    str | None, typer.Option(help="Metasurface height,width in µm (enables the layout).")
]
SpacingOpt = Annotated[float | None, typer.Option(help="Minimum spacing between sub-optics in µm.")]
KernelUmOpt = Annotated[
    float | None,
    typer.Option(help="Sub-optic side in µm; default: the largest that holds each candidate."),
]
MagnificationOpt = Annotated[float, typer.Option(help="Metasurface-to-sensor magnification.")]
PixelOpt = Annotated[float | None, typer.Option(help="Sensor pixel pitch in µm.")]
SensorOpt = Annotated[str | None, typer.Option(help="Sensor height,width in pixels.")]
MapsBenchOpt = Annotated[
    Path | None,
    typer.Option(
        help=r"Bench file whose \[frontend] input_px and \[sim.sensor] noise the maps have; "
        "default: the simulated bench's.",
        metavar="FILE",
    ),
]
NoiseOpt = Annotated[
    bool,
    typer.Option(
        "--noise/--no-noise", help="Sensor noise in the maps (--no-noise: the paper's form)."
    ),
]
SeedsOpt = Annotated[
    int, typer.Option(min=1, help="Random initialisations averaged per kernel count.")
]
TrainSizeOpt = Annotated[str, typer.Option(help="Training samples in the regression, or 'all'.")]
OutOpt = Annotated[
    Path, typer.Option("--out", help="Folder for the table, curve, layouts and TOML.")
]


def _numbers(option: str, text: str | None, kind: type, count: int | None, example: str):
    """A comma list of numbers from the command line, or a one-line UserError showing the form."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if not values or (count is not None and len(values) != count):
        what = f"{count} comma-separated" if count else "comma-separated"
        noun = "whole numbers" if kind is int else "numbers"
        raise UserError(f"{option}: give {what} {noun}, e.g. {example} (got {text!r})")
    return values


def _train_size(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--train-size: a whole number or 'all' (got {text!r})") from None


def _layout_text(row: dict[str, Any]) -> str:
    lay = row["layout"]
    head = f"{row['kernels']} kernels: "
    if not lay["fits"]:
        return head + "does not fit: " + lay["reason"]
    lines = [
        head + f"{lay['grid'][0]} x {lay['grid'][1]} grid of {lay['kernel_um']:g} µm sub-optics "
        f"at a {lay['pitch_um']:g} µm pitch, {lay['tiles']} tiles of {lay['tile_px']} px "
        f"({lay['gap_px']} px gaps) on a {lay['sensor_px'][0]} x {lay['sensor_px'][1]} px sensor",
        *(f"  {note}" for note in lay["binding"]),
        *(f"  {line}" for line in lay["frontend_toml"].splitlines() if line[:1] not in "#"),
    ]
    return "\n".join(lines)


def estimate_cmd(  # noqa: PLR0913  typer: one parameter per command-line option
    dataset: DatasetOpt = "digits",
    data_root: DataRootOpt = None,
    kernels: KernelsOpt = "2,4,8,16",
    kernel_size: KernelSizeOpt = 7,
    signed: SignedOpt = True,
    metasurface_um: MetasurfaceOpt = None,
    spacing_um: SpacingOpt = None,
    kernel_um: KernelUmOpt = None,
    magnification: MagnificationOpt = 1.0,
    pixel_um: PixelOpt = None,
    sensor_px: SensorOpt = None,
    bench: MapsBenchOpt = None,
    noise: NoiseOpt = True,
    seeds: SeedsOpt = DEFAULT_SEEDS,
    train_size: TrainSizeOpt = str(DEFAULT_TRAIN_SIZE),
    out_dir: OutOpt = Path("estimate-output"),
    device: DeviceOpt = "auto",
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    r"""Estimate, before fabrication, the test accuracy each kernel count buys, and lay it out.

    The estimate is kernel ridge regression with the neural tangent kernel of the untrained ONN
    (the optical layer with m kernels, then the digital backend): what training the linearised
    network to convergence predicts, with the ridge chosen on the validation split. It is a
    diagnostic for choosing m, not a trained model; expect it a few points above what `hil train`
    reaches. The maps carry the sensor's shot and read noise at the exposure calibration would
    set (the table's map SNR; --no-noise leaves it out). On digits, 2,4,8,16 kernels take about
    30 s on 2 CPU cores; the time grows with --seeds, --train-size and the kernel count.

    With --metasurface-um, --spacing-um, --pixel-um and --sensor-px, each candidate also gets the
    largest symmetric grid of sub-optics that holds it, its tiles on the sensor and the bench
    file's \[frontend] section, or the constraint that makes it impossible.

    Writes OUT/estimate.md (the table), OUT/estimate.png (accuracy against kernel count),
    OUT/estimate.json (everything), and with a layout OUT/layouts.json and OUT/frontend-M.toml.
    """
    from hil.device import resolve_device
    from hil.output.guard import check_output

    check_output(out_dir, "folder", {"--bench": bench})
    on = resolve_device(device)
    args = {
        "dataset": dataset,
        "data_root": str(data_root) if data_root else None,
        "kernels": _numbers("--kernels", kernels, int, None, "2,4,8,16"),
        "kernel_size": kernel_size,
        "signed": signed,
        "metasurface_um": _numbers("--metasurface-um", metasurface_um, float, 2, "1000,1000"),
        "spacing_um": spacing_um,
        "kernel_um": kernel_um,
        "magnification": magnification,
        "pixel_um": pixel_um,
        "sensor_px": _numbers("--sensor-px", sensor_px, int, 2, "512,512"),
        "bench": str(bench) if bench else None,
        "noise": noise,
        "seeds": seeds,
        "train_size": _train_size(train_size),
        "out": str(out_dir),
        "device": str(on),
    }
    result = recorded(
        "estimate", runs_dir, None, args, lambda _: _estimate(args, bench, data_root), on
    )
    if as_json:
        return emit(result, True)
    _print_estimate(result)


def _progress(row: dict[str, Any]) -> None:
    err.print(
        f"{row['kernels']:3d} kernels: {100 * row['accuracy']:.2f} ± "
        f"{100 * row['accuracy_std']:.2f} %  ({row['seconds']:.1f} s)",
        highlight=False,
    )


def _estimate(args: dict[str, Any], bench: Path | None, data_root: Path | None) -> dict[str, Any]:
    """The estimate of the command line's `args` (parsed), on the bench file's maps."""
    from hil.bench.config import load_bench
    from hil.bench.design import square_side
    from hil.design.estimate import EstimateSettings
    from hil.design.regression import MapNoise
    from hil.jobs.estimate import LayoutConstraints, run_estimate

    counts, ms, sensor = args["kernels"], args["metasurface_um"], args["sensor_px"]
    config = load_bench(bench)
    sim = config.sim
    settings = EstimateSettings(
        kernels=counts,
        kernel_size=args["kernel_size"],
        signed=args["signed"],
        train_size=args["train_size"],
        seeds=args["seeds"],
        noise=MapNoise.from_sensor(sim.sensor) if args["noise"] else None,
        image_size=square_side(config, "hil estimate"),
        device=args["device"],
    )
    layout = LayoutConstraints.from_options(
        metasurface_um=tuple(ms) if ms else None,
        spacing_um=args["spacing_um"],
        magnification=args["magnification"],
        pixel_um=args["pixel_um"],
        sensor_px=tuple(sensor) if sensor else None,
        kernel_um=args["kernel_um"],
    )
    return run_estimate(
        args["dataset"],
        settings,
        Path(args["out"]),
        layout,
        progress=_progress,
        data_root=data_root,
    )


def _print_estimate(result: dict[str, Any]) -> None:
    from rich.markup import escape

    text = [result["table"]]
    if "constraints" in result:
        text += ["", "Layouts:", *(_layout_text(r) for r in result["rows"])]
    text += ["", f"wrote {', '.join(result['files'].values())}; run record {result['run_dir']}"]
    out.print(escape("\n".join(text)), highlight=False, soft_wrap=True)
