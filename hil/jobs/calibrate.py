"""`hil calibrate`: measure the bench's frontend, save the calibration file, plot what it found.

On a simulated bench it also compares every fitted quantity with the simulated world's ground
truth, so the calibration's quality is measured, not assumed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from scipy.ndimage import shift as subpixel_shift

from calibration import calfile
from calibration.geometry import apply_affine
from calibration.pipeline import STEPS, Design, Plan, calibrate
from calibration.psf import psf_centroid
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from hil.output.figures import save_calibration_plots
from hil.output.records import environment
from sim.devices import SimCamera
from sim.fabrication import illumination_map


def design_of(bench: Bench) -> Design:
    """The designed frontend the bench file describes (its `[sim.frontend]` digital twin)."""
    world = bench.world
    f = world.designed
    return Design(
        kernels=f.kernels,
        kernel_size=f.kernel_size,
        signed=f.signed,
        channels=f.channels,
        tile_boxes=list(world.layout.boxes),
        psfs=f.psfs.detach().numpy().astype(np.float64),
    )


def ground_truth(bench: Bench, cal: calfile.Calibration, design: Design) -> dict[str, Any]:
    """Fitted quantities against the simulated world that produced them.

    A PSF and a misalignment share their translation; the calibration pins each measured PSF to
    its design's centroid, so the truth is put in the same convention: the true registration
    moves by the fabricated PSF's centroid shift δ and the true PSF moves back by δ.
    """
    world = bench.world
    sensor, fab = world.sensor, world.fabrication
    scale = fab.gain * sensor.params.flux_e_per_s / sensor.gain_e_per_dn  # DN/s per irradiance
    fabricated = world.frontend.psfs.numpy().astype(np.float64)
    h, w = cal.display_shape[:2]
    ys, xs = np.mgrid[0:h:2, 0:w:2]
    points = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    landed = fab.warp_points(torch.as_tensor(points)).numpy()
    psf_err, reg_sq, gain_err = [], [], []
    for p, (y0, x0, _, _) in enumerate(design.tile_boxes):
        delta = psf_centroid(fabricated[p]) - psf_centroid(design.psfs[p])
        truth_pts = landed + [x0, y0] + delta
        reg_sq.append(np.mean(np.sum((apply_affine(cal.affines[p], points) - truth_pts) ** 2, 1)))
        back = (0, -delta[1], -delta[0])
        truth_psf = subpixel_shift(fabricated[p], back, order=3, mode="grid-constant") * scale
        psf_err.append(np.linalg.norm(cal.psfs[p] - truth_psf) / np.linalg.norm(truth_psf))
        gain_err.append(abs(cal.psfs[p].sum() / (fabricated[p].sum() * scale) - 1))
    illum_truth = illumination_map((h, w), fab.params.illumination_falloff).numpy()
    return {
        "psf_rel_error": float(np.mean(psf_err)),
        "psf_rel_error_max": float(np.max(psf_err)),
        "registration_rms_px": float(math.sqrt(np.mean(reg_sq))),
        "gain_rel_error": float(np.mean(gain_err)),
        "display_gamma_error": float(cal.display_gamma - world.params.display.gamma),
        "conversion_gain_rel_error": float(cal.conversion_gain_e_per_dn / sensor.gain_e_per_dn - 1),
        "illumination_rel_error": float(
            np.linalg.norm(cal.illumination - illum_truth) / np.linalg.norm(illum_truth)
        ),
    }


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
        design = design_of(bench)
        cal = calibrate(
            bench,
            design,
            plan,
            bench_name=config.name,
            versions=environment()["packages"],
            progress=progress,
        )
        bar.update(task, description="done", completed=len(STEPS))
        if isinstance(bench.camera, SimCamera) and not config.sim.replay:
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
