"""The `hil` command line.

Every command that touches the bench takes `--bench FILE` (default: the simulated bench); every
command that does work writes a run folder under `--runs-dir` and prints its result object on
stdout with `--json`.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

import hil
from calibration.errors import CalibrationError
from drivers.errors import DeviceError

# the command modules register themselves on `app`
from hil.cli import estimate, evaluate, finetune  # noqa: E402, F401, I001
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
    bench_app,
    emit,
    epoch_printer,
    err,
    out,
    sim_app,
    teacher_app,
)
from hil.errors import UserError


def _version(value: bool) -> None:
    if value:
        out.print(f"hil {hil.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Calibrate a fabricated optical frontend, capture its feature maps, and fine-tune the
    digital backend against an electronic teacher (NTKD).

    Start with `hil bench init bench.toml`, then `hil devices --bench bench.toml`.
    """


@bench_app.command("init")
def bench_init(
    path: Annotated[Path, typer.Argument(help="Where to write the bench file.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented bench file with every key at its default."""
    from calibration.atomic import atomic_write_text
    from hil.bench.config import default_bench_toml

    if path.exists() and not force:
        raise UserError(f"{path}: exists already (use --force to overwrite)")
    atomic_write_text(path, default_bench_toml())
    out.print(f"wrote {path}")


@app.command("devices")
def devices(bench: BenchOpt = None, as_json: JsonOpt = False) -> None:
    """List the installed driver backends, then open each device of the bench file once.

    A backend that fails to import is listed with the reason; a device that cannot open is
    reported, and the others are still tried.
    """
    from drivers import registry
    from hil.bench.assembly import Bench
    from hil.bench.config import load_bench

    config = load_bench(bench)
    backends = [vars(info) for info in registry.available()]
    rows = Bench(config).probe()
    result = {"bench": str(bench) if bench else None, "backends": backends, "devices": rows}
    if as_json:
        return emit(result, True)
    table = Table(title="installed driver backends (entry points: hil.drivers)")
    for col in ("kind", "backend", "from", "import"):
        table.add_column(col)
    for b in backends:
        status = "[green]ok[/]" if b["error"] is None else f"[red]failed[/]: {escape(b['error'])}"
        table.add_row(b["kind"], b["backend"], b["target"], status)
    out.print(table)
    table = Table(title=f"{config.name} ({bench or 'built-in default bench'})")
    for col in ("device", "backend", "simulated", "state", "settings / error"):
        table.add_column(col)
    colours = {"ok": "green", "fallback": "yellow", "failed": "red"}
    hidden = ("name", "kind", "simulated", "backend")
    for r in rows:
        detail = ", ".join(f"{k}={v}" for k, v in r["detail"].items() if k not in hidden)
        simulated = {True: "yes", False: "no", None: "?"}[r["simulated"]]
        state = f"[{colours[r['state']]}]{r['state']}[/]"
        table.add_row(r["role"], r["backend"], simulated, state, escape(detail))
    out.print(table)


@sim_app.command("render")
def sim_render(
    image: Annotated[Path, typer.Argument(help="Input picture (PNG, JPEG, TIFF, .npy).")],
    out_path: Annotated[Path, typer.Option("--out", help="Frame PNG to write (16-bit).")],
    bench: BenchOpt = None,
    tiles: Annotated[
        Path | None, typer.Option("--tiles", help="Also write the cropped tiles as a PNG sheet.")
    ] = None,
    fill: Annotated[
        float, typer.Option(min=0.05, max=1.0, help="Fraction of the display the image fills.")
    ] = 0.75,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Show IMAGE on the simulated display and save the frame the camera records.

    The frame is a 16-bit PNG whose values are the camera's DN shifted to the top bits.
    """
    from hil.bench.config import load_bench
    from hil.jobs.render import render_image
    from hil.output.records import Run

    config = load_bench(bench)
    args = {"image": str(image), "out": str(out_path), "tiles": str(tiles) if tiles else None}
    with Run("sim render", runs_dir, config, args) as run:
        result = run.finish(render_image(config, image, out_path, tiles, fill))
    h, w = result["frame_shape"]
    emit(result, as_json, f"wrote {out_path} ({h}x{w}, max {result['max_dn']} DN); run {run.dir}")


@app.command("calibrate")
def calibrate_cmd(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the calibration file and plots.")
    ],
    bench: BenchOpt = None,
    patterns: Annotated[
        int, typer.Option(min=8, help="Random patterns for the kernel fit (more: less noise).")
    ] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the calibration patterns.")] = 0,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Measure the fabricated frontend: exposure, dark, stray light, photon transfer, display
    response, geometry, kernels; then check the result by predicting frames of new images.

    Writes OUT/calibration.h5 (every fitted quantity), OUT/result.json and PNG plots. On a
    simulated bench the result also compares each fitted quantity with the ground truth.
    """
    from calibration.pipeline import Plan
    from hil.bench.config import load_bench
    from hil.jobs.calibrate import run_calibrate
    from hil.output.records import Run, write_json

    config = load_bench(bench)
    plan = Plan(patterns=patterns, seed=seed)
    with Run("calibrate", runs_dir, config, {"out": str(out_dir), "patterns": patterns}) as run:
        result = run.finish(run_calibrate(config, out_dir, err, plan))
        write_json(out_dir / "result.json", result)
    emit(result, as_json, f"wrote {result['calibration_file']}; run record {run.dir}")


def _score(result: dict) -> str:
    if "test_miou" in result:
        return f"test mIoU {result['test_miou']:.4f}"
    return f"test accuracy {result['test_accuracy']:.4f}"


@teacher_app.command("train")
def teacher_train(
    arch: Annotated[str, typer.Option(help="resnet18, lenet, alexnet or unet.")] = "resnet18",
    dataset: Annotated[str, typer.Option(help="Dataset to train on.")] = "digits",
    epochs: Annotated[int, typer.Option(min=1)] = 15,
    lr: Annotated[float, typer.Option(min=0)] = 1e-3,
    seed: int = 0,
    out: Annotated[
        Path | None, typer.Option(help="Checkpoint path; default: where --teacher finds it.")
    ] = None,
    data_root: DataRootOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Train an electronic teacher on the raw images and store it for `--teacher ARCH`."""
    from hil.data.datasets import load_dataset
    from hil.output.records import Run, write_json
    from hil.training.loop import Settings
    from hil.training.teacher import save_teacher, teacher_path, train_teacher

    data = load_dataset(dataset, data_root)
    path = out or teacher_path(arch, dataset)
    args = {"arch": arch, "dataset": dataset, "epochs": epochs, "lr": lr, "seed": seed}
    with Run("teacher train", runs_dir, None, args) as run:
        settings = Settings(epochs=epochs, lr=lr, seed=seed)
        model, record = train_teacher(arch, data, settings, on_epoch=epoch_printer(err))
        save_teacher(model, record, path)
        write_json(run.dir / "metrics.json", record.pop("history"))
        result = run.finish(record | {"checkpoint": str(path)})
    emit(
        result,
        as_json,
        f"{arch} on {dataset}: {_score(result)}; stored {path}",
    )


@app.command("train")
def train_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset to train on.")] = "digits",
    method: Annotated[str, typer.Option(help="none (CE only), kd or ntkd.")] = "ntkd",
    teacher: Annotated[
        str, typer.Option(help="Teacher architecture (stored for the dataset) or checkpoint.")
    ] = "resnet18",
    out: Annotated[Path, typer.Option(help="Student checkpoint to write.")] = Path("onn.pt"),
    frontend: Annotated[str, typer.Option(help="psf or 4f.")] = "psf",
    kernels: Annotated[int, typer.Option(min=1)] = 8,
    kernel_size: Annotated[int, typer.Option(min=1)] = 7,
    backend: Annotated[
        str, typer.Option(help="fc2, fc3, conv, or updecoder (segmentation).")
    ] = "fc2",
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    lr: Annotated[float, typer.Option(min=0)] = 1e-2,
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    beta: Annotated[float, typer.Option(help="Weight of the NTK term.")] = 1.0,
    norm: Annotated[
        str, typer.Option(help="Kernel normalisation: none, diag, frobenius.")
    ] = "diag",
    variant: Annotated[str, typer.Option(help="mse or cka.")] = "mse",
    projections: Annotated[int, typer.Option(min=1, help="Teacher NTK projections.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.1, help="KD temperature.")] = 4.0,
    seed: int = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its resume state beside --out.")
    ] = False,
    augment: Annotated[
        bool,
        typer.Option(
            help="Draw fabrication errors (gain, shift, rotation, kernel error; sizes from the "
            "bench file's [sim.fabrication]) and sensor noise afresh for every batch."
        ),
    ] = False,
    noise: Annotated[
        float, typer.Option(min=0, help="With --augment: noise std relative to the maps' RMS.")
    ] = 0.01,
    bench: BenchOpt = None,
    data_root: DataRootOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Train the optical student in simulation (frontend and backend jointly).

    Also runs under `torchrun --nproc_per_node N -m hil train ...` as DistributedDataParallel.
    """
    from hil.bench.config import load_bench
    from hil.data.datasets import load_dataset
    from hil.models.onn import StudentSpec
    from hil.ntkd.augment import FabricationAugment
    from hil.ntkd.losses import loss_options
    from hil.output.records import Run, write_json
    from hil.training.loop import Settings, ddp_rank_size
    from hil.training.student import train_student
    from hil.training.teacher import load_teacher

    options = loss_options(method, temperature=temperature, beta=beta, norm=norm, variant=variant)
    data = load_dataset(dataset, data_root)
    if data.task == "segmentation" and backend != "updecoder":
        err.print(f"{dataset} is a segmentation dataset: using --backend updecoder")
        backend = "updecoder"
    sim = load_bench(bench).sim  # the display the student's images are shown on
    augmentation = None
    if augment:
        augmentation = FabricationAugment.from_fabrication(sim.fabrication, noise=noise, seed=seed)
    spec = StudentSpec(
        frontend=frontend,
        kernels=kernels,
        kernel_size=kernel_size,
        backend=backend,
        image_size=sim.display.height,
        channels=int(data.images.shape[1]),
        classes=data.classes,
        seed=seed,
    )
    t_model = cache = None
    if method in ("kd", "ntkd"):
        t_model, info, t_path = load_teacher(teacher, dataset)
        cache = t_path.with_name(f"{t_path.stem}.ntk-R{projections}-s{seed}.pt")
    rank, _ = ddp_rank_size()
    args = {
        "dataset": dataset,
        "method": method,
        "teacher": teacher,
        "spec": spec.to_dict(),
        "epochs": epochs,
        "lr": lr,
        "options": options,
        "out": str(out),
        "augment": augmentation.to_dict() if augmentation else None,
    }
    with Run("train", runs_dir if rank == 0 else runs_dir / f"rank{rank}", None, args) as run:
        model, record = train_student(
            spec,
            data,
            method,
            Settings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
            teacher=t_model,
            teacher_cache=cache,
            loss_options=options,
            projections=projections,
            out=out,
            resume=resume,
            on_epoch=epoch_printer(err),
            augment=augmentation,
        )
        write_json(run.dir / "metrics.json", record["history"])
        result = run.finish(
            {k: v for k, v in record.items() if k != "history"}
            | {"checkpoint": str(out), "epochs_run": len(record["history"])}
        )
    if rank == 0:
        score = _score(result)
        emit(result, as_json, f"{method}: {score}; {out}")


@app.command("capture")
def capture_cmd(
    calibration: CalibrationOpt,
    out: Annotated[Path, typer.Option("--out", help="Capture store to write or resume (HDF5).")],
    bench: BenchOpt = None,
    dataset: DatasetOpt = "digits",
    split: SplitOpt = "test",
    fraction: FractionOpt = 1.0,
    seed: SeedOpt = 0,
    keep_frames: Annotated[bool, typer.Option(help="Also store the raw frames.")] = False,
    data_root: DataRootOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Show dataset images on the bench and store the frontend's feature maps.

    A rerun of the same command resumes after the last stored sample; nothing captured is lost
    on Ctrl-C or a crash.
    """
    from hil.acquire.capture import run_capture
    from hil.bench.config import load_bench
    from hil.output.records import Run

    config = load_bench(bench)
    args = {
        "calibration": str(calibration),
        "out": str(out),
        "dataset": dataset,
        "split": split,
        "fraction": fraction,
        "seed": seed,
    }
    with Run("capture", runs_dir, config, args) as run:
        result = run.finish(
            run_capture(
                config,
                calibration,
                dataset,
                split,
                out,
                err,
                fraction=fraction,
                seed=seed,
                keep_frames=keep_frames,
                data_root=data_root,
            )
        )
    emit(
        result,
        as_json,
        f"{result['captured']}/{result['planned']} samples in {out} "
        f"({result['samples_per_s']:.1f} samples/s); run record {run.dir}",
    )


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo's report.")] = Path(
        "demo-output"
    ),
    bench: BenchOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of training and of the fabrication errors.")] = 0,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on the bundled digits and a simulated bench, in a few minutes.

    Trains a resnet18 teacher, trains the optical student with NTKD in simulation, fabricates it
    (the bench's [sim.fabrication] errors), calibrates the bench, captures 10% of the train split
    and the test split, fine-tunes the backend with CE and with NTKD, and writes OUT/REPORT.md
    with the accuracy table and the pictures.
    """
    from dataclasses import replace

    from hil.bench.config import load_bench
    from hil.jobs.demo import DemoPlan, run_demo
    from hil.output.records import Run

    config = load_bench(bench)
    with Run("demo", runs_dir, config, {"out": str(out_dir), "seed": seed}) as run:
        plan = DemoPlan(seed=seed)
        if bench is not None:  # the bench file's own fabrication errors
            plan = replace(plan, kernel_error=None, kernel_error_corr_px=None)
        result = run.finish(run_demo(config, out_dir, err, plan))
    table = "\n".join(f"  {k:<32} {100 * v:5.1f}%" for k, v in result["accuracy"].items())
    emit(result, as_json, f"test accuracy on digits:\n{table}\nreport: {out_dir / 'REPORT.md'}")


class _WarningsToStderr(logging.Handler):
    """Warnings (a simulated fallback, a retry) reach the person; errors are printed by main."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            print(f"warning: {record.getMessage()}", file=sys.stderr)


def main() -> None:
    """Entry point: user and device errors end in one line on stderr, not a traceback.

    SIGTERM unwinds like Ctrl-C, so benches switch their light off when a job is killed politely.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    hil_log = logging.getLogger("hil")
    if not any(isinstance(h, _WarningsToStderr) for h in hil_log.handlers):
        hil_log.addHandler(_WarningsToStderr())
    try:
        app()
    except (UserError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except DeviceError as e:
        print(f"device error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
