"""`hil demo`: the bundled digits through the simulated bench, as pictures a person can open."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from hil.bench import Bench
from hil.calibrate import run_calibrate
from hil.config import BenchConfig
from hil.datasets import digits
from hil.figures import save_frame_png, save_map_sheet
from hil.render import place_on_display
from hil.simrender import designed_feature_maps, raw_feature_maps, snap_dark, snap_levels


@contextmanager
def step(console: Console, what: str):
    t0 = time.perf_counter()
    console.print(f"[bold]•[/] {what} ...", highlight=False)
    yield
    console.print(f"  done in {time.perf_counter() - t0:.2f} s", style="dim")


def run_demo(config: BenchConfig, out_dir: Path, console: Console) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = digits()
    images, labels = data.images[:, 0], data.labels
    picks = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    with step(console, "open the simulated bench and record a dark frame"), Bench(config) as bench:
        shape = bench.display.shape[:2]
        levels = [place_on_display(images[i], shape) for i in picks]
        dark = snap_dark(bench)
        with step(console, f"show {len(picks)} digits and capture their frames"):
            frames = snap_levels(bench, levels)
        designed = np.stack([designed_feature_maps(bench, lv) for lv in levels])
        captured = np.stack([raw_feature_maps(bench, f.image, dark) for f in frames])
        bit_depth, simulated = bench.camera.bit_depth, bench.simulated

    with step(console, f"write pictures to {out_dir}"):
        pictures = {
            "frame": out_dir / "frame_digit0.png",
            "frames": out_dir / "frames.png",
            "feature_maps": out_dir / "feature_maps.png",
        }
        save_frame_png(frames[0].image, bit_depth, pictures["frame"])
        raw = np.stack([f.image.astype(np.float32) for f in frames])
        save_map_sheet([("camera frames", raw)], pictures["frames"], "digits 0-9 on the sensor")
        rows = []
        for d in (0, 1, 2):
            rows += [(f"{d}: design", designed[d]), (f"{d}: bench", captured[d])]
        save_map_sheet(rows, pictures["feature_maps"], "feature maps: design vs fabricated bench")

    err = np.linalg.norm((captured - designed).reshape(10, -1), axis=1)
    rel = float(np.mean(err / np.linalg.norm(designed.reshape(10, -1), axis=1)))
    console.print(f"uncalibrated feature maps differ from the design by {100 * rel:.1f}% (rel. L2)")

    with step(console, "calibrate the fabricated bench"):
        cal = run_calibrate(config, out_dir / "calibration", console)
    console.print(
        f"calibration: PSFs within {100 * cal['psf_rel_error']:.1f}% of the fabricated ones, "
        f"registration within {cal['registration_rms_px']:.3f} px, new frames predicted within "
        f"{100 * cal['prediction_excess_rel_error']:.1f}% beyond sensor noise"
    )
    return {
        "out_dir": str(out_dir),
        "pictures": {k: str(v) for k, v in pictures.items()},
        "samples": len(picks),
        "feature_map_rel_error": rel,
        "simulated": simulated,
        "calibration": cal,
    }
