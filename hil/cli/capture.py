"""`hil capture`: dataset images shown on the bench, the frontend's feature maps stored."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import (
    BenchOpt,
    CalibrationOpt,
    DataRootOpt,
    DatasetOpt,
    ForceOpt,
    FractionOpt,
    JsonOpt,
    RunsOpt,
    SeedOpt,
    SplitOpt,
    emit,
    err,
    recorded,
)

StoreOpt = Annotated[Path, typer.Option("--out", help="Capture store to write or resume (HDF5).")]
KeepFramesOpt = Annotated[bool, typer.Option(help="Also store the raw frames.")]


def capture_cmd(  # noqa: PLR0913  typer: one parameter per command-line option
    calibration: CalibrationOpt,
    out: StoreOpt,
    bench: BenchOpt = None,
    dataset: DatasetOpt = "digits",
    split: SplitOpt = "test",
    fraction: FractionOpt = 1.0,
    seed: SeedOpt = 0,
    keep_frames: KeepFramesOpt = False,
    data_root: DataRootOpt = None,
    force: ForceOpt = False,
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Show dataset images on the bench and store the frontend's feature maps.

    A rerun of the same command resumes after the last stored sample; nothing captured is lost
    on Ctrl-C or a crash.
    """
    from hil.bench.config import load_bench
    from hil.jobs.capture import CaptureRequest, run_capture
    from hil.output.guard import check_output

    inputs = {"--calibration": calibration, "--bench": bench}
    check_output(out, "capture store", inputs, force=force)
    config = load_bench(bench)
    request = CaptureRequest(
        calibration,
        dataset,
        split,
        out,
        fraction,
        seed,
        keep_frames=keep_frames,
        data_root=data_root,
    )
    result = recorded(
        "capture", runs_dir, config, request.args(), lambda _: run_capture(config, request, err)
    )
    rate = f"{result['samples_per_s']:.1f} samples/s"
    summary = f"{result['captured']}/{result['planned']} samples in {out} ({rate})"
    emit(result, as_json, f"{summary}; run record {result['run_dir']}")
