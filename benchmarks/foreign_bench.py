"""Calibration time and capture rate on a bench laid out like real glass (1440×1080 camera).

    .venv/bin/python benchmarks/foreign_bench.py [--bench examples/bench-demag.toml] [--samples 100]

Calibrates the bench in real time (the simulated camera waits out every exposure and frame
period, as a real one does) and prints the wall time against the sum of the frame times it had
to wait for; then captures `--samples` digits at a 30 fps limit and prints samples/s over the
limit. Goals (the foreign-bench issue): calibration ≤ 60 s, capture ≥ 0.9 of 30 fps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from calibration import calfile
from calibration.pipeline import Plan, calibrate
from hil.bench.assembly import Bench
from hil.bench.config import load_bench
from hil.data.datasets import load_dataset
from hil.jobs.capture import CaptureRequest, run_capture

ROOT = Path(__file__).resolve().parent.parent


class _FrameClock:
    """Counts the camera time calibration waited for: exposures and frame periods."""

    def __init__(self, camera) -> None:
        self.camera, self.frames, self.seconds = camera, 0, 0.0
        self._snap = camera.snap

        def snap(timeout_s):
            self.frames += 1
            self.seconds += camera.frame_period_s
            return self._snap(timeout_s)

        camera.snap = snap


def timed_calibration(config) -> tuple[calfile.Calibration, float, _FrameClock]:
    """(calibration, wall seconds, its frame clock) of `config`'s bench in real time."""
    bench = Bench(config)
    with bench:
        frames = _FrameClock(bench.camera)
        t0 = time.perf_counter()
        cal = calibrate(bench, bench.design, Plan())
        return cal, time.perf_counter() - t0, frames


def capture_rate(config, cal_path: Path, fps: float, samples: int, store: Path) -> dict:
    """`hil capture`'s result for `samples` digits with the camera limited to `fps`."""
    sensor = config.sim.sensor.model_copy(update={"fps_limit": fps})
    fast = config.model_copy(update={"sim": config.sim.model_copy(update={"sensor": sensor})})
    train = len(load_dataset("digits").split("train"))
    request = CaptureRequest(cal_path, "digits", "train", store, samples / train)
    return run_capture(fast, request, Console(quiet=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bench", type=Path, default=ROOT / "examples" / "bench-demag.toml")
    ap.add_argument("--samples", type=int, default=100)
    args = ap.parse_args()
    config = load_bench(args.bench)
    with tempfile.TemporaryDirectory() as tmp:
        cal, wall, frames = timed_calibration(config)
        path = calfile.save(cal, Path(tmp) / "cal.h5")
        steps = {s["name"]: s["seconds"] for s in cal.steps}
        result = capture_rate(config, path, 30.0, args.samples, Path(tmp) / "s.h5")
    print(
        f"bench {args.bench.name}: frame {cal.frame_shape[1]}×{cal.frame_shape[0]}, "
        f"exposure {cal.exposure_s * 1e3:.1f} ms"
    )
    print(
        f"calibration: {wall:.1f} s wall for {frames.frames} frames whose frame times sum to "
        f"{frames.seconds:.1f} s (ratio {wall / frames.seconds:.2f}; goal: wall ≤ 60 s)"
    )
    print("  per step (s): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    rate = result["samples_per_s"]
    print(
        f"capture: {result['captured']} samples at {rate:.1f} samples/s = {rate / 30:.3f} of "
        "the 30 fps limit (goal ≥ 0.9)"
    )


if __name__ == "__main__":
    main()
