"""`hil calibrate`: measure the fabricated frontend on the bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli.common import BenchOpt, JsonOpt, RunsOpt, emit, err, recorded

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the calibration file and plots.")]
PatternsOpt = Annotated[
    int, typer.Option(min=8, help="Random patterns for the kernel fit (more: less noise).")
]
PatternSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the calibration patterns.")]


def calibrate_cmd(
    out_dir: OutOpt,
    bench: BenchOpt = None,
    patterns: PatternsOpt = 32,
    seed: PatternSeedOpt = 0,
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
    from hil.output.guard import check_output
    from hil.output.records import write_json

    check_output(out_dir, "folder", {"--bench": bench})
    config = load_bench(bench)
    plan = Plan(patterns=patterns, seed=seed)
    args = {"out": str(out_dir), "patterns": patterns}
    result = recorded(
        "calibrate", runs_dir, config, args, lambda _: run_calibrate(config, out_dir, err, plan)
    )
    write_json(out_dir / "result.json", result)
    emit(result, as_json, f"wrote {result['calibration_file']}; run record {result['run_dir']}")
