"""`hil calibrate`: measure the bench's frontend, save the calibration file, plot what it found.

The design it measures against is the bench file's (`Bench.design`). On a simulated bench it
also compares every fitted quantity with the simulated world's ground truth (`hil.bench.truth`),
so the calibration's quality is measured, not assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from calibration import calfile
from calibration.discovery import DiscoveryError
from calibration.errors import CalibrationError
from calibration.pipeline import STEPS, Plan, calibrate
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from hil.bench.design import grid_origin
from hil.bench.truth import ground_truth
from hil.output.figures import box_outline, save_calibration_plots, save_subimages_png
from hil.output.records import environment


def run_calibrate(
    config: BenchConfig, out_dir: Path, console: Console, plan: Plan = Plan()
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(config)
    columns = (TextColumn("{task.description:<18}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar, bench:
        task = bar.add_task("calibrating", total=len(STEPS))

        def progress(step: str) -> None:
            bar.update(task, description=step, completed=len(done))
            done.append(step)

        done: list[str] = []
        design = bench.design
        grid_origin(design, bench.display.shape, f"display {bench.display.name!r}")
        try:
            cal = calibrate(
                bench,
                design,
                plan,
                bench_name=config.name,
                versions=environment()["packages"],
                progress=progress,
            )
        except DiscoveryError as e:
            picture = out_dir / "subimages-found.png"
            labels = [str(i) for i in range(len(e.found))]
            boxes = [box_outline(s.box) for s in e.found]
            save_subimages_png(e.frame, boxes, labels, picture, str(e)[:90])
            raise CalibrationError(f"{e} — picture: {picture}") from None
        bar.update(task, description="done", completed=len(STEPS))
        cal.truth = ground_truth(bench, cal, design)
        snapshot = bench.snapshot()
    path = calfile.save(cal, out_dir / "calibration.h5")
    pictures = save_calibration_plots(cal, design.psfs, out_dir)
    validation = next(s for s in cal.steps if s["name"] == "validation")
    result = calfile.summary(cal) | {
        "calibration_file": str(path),
        "pictures": {k: str(v) for k, v in pictures.items()},
        **{k: v for k, v in validation.items() if k.startswith("prediction")},
        **(cal.truth or {}),
        "bench": snapshot,
    }
    return result
