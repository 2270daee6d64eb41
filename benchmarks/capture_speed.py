"""Capture rate on the simulated bench against the camera's frame-rate limit.

    .venv/bin/python benchmarks/capture_speed.py [--seconds S] [--calibration CAL] [--load N]

Calibrates the default simulated bench (on a virtual clock) unless given a calibration, then runs
`hil capture`'s loop in real time with `[sim.sensor] fps_limit` at 30 and at 120, each for about
`--seconds` of the digits train split, and prints samples/s and its ratio to the limit. A ratio
near 1 means showing, rendering, feature extraction and storing all hide behind the camera.
`--load N` (default 1) runs N CPU-bound processes beside the capture, as a lab PC runs other
work; the table names the load average during each run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console

from calibration import calfile
from calibration.pipeline import Plan, calibrate
from hil.bench.assembly import Bench
from hil.bench.config import BenchConfig
from hil.data.datasets import load_dataset
from hil.jobs.capture import CaptureRequest, run_capture
from sim.clock import VirtualClock
from sim.params import SensorParams, SimParams

LIMITS = (30.0, 120.0)


def _spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


@contextlib.contextmanager
def cpu_hogs(n: int) -> Iterator[None]:
    """`n` CPU-bound processes running for the block: the load beside a capture."""
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for hog in hogs:
        hog.start()
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="capture time per fps limit")
    ap.add_argument("--calibration", type=Path, help="calibration of the default simulated bench")
    ap.add_argument("--load", type=int, default=1, help="CPU-bound processes beside the capture")
    args = ap.parse_args()
    print(
        f"{os.cpu_count()} CPU threads ({len(os.sched_getaffinity(0))} usable), "
        f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads, "
        f"{platform.processor() or platform.machine()}"
    )
    train = len(load_dataset("digits").split("train"))
    with tempfile.TemporaryDirectory() as tmp:
        cal = args.calibration
        if cal is None:
            bench = Bench(BenchConfig(), clock=VirtualClock())
            with bench:
                cal = calfile.save(
                    calibrate(bench, bench.design, Plan(patterns=16)), Path(tmp) / "cal.h5"
                )
        rows = []
        for fps in LIMITS:
            config = BenchConfig(sim=SimParams(sensor=SensorParams(fps_limit=fps)))
            store = Path(tmp) / f"fps{fps:g}.h5"
            fraction = min(1.0, fps * args.seconds / train)
            request = CaptureRequest(cal, "digits", "train", store, fraction)
            with cpu_hogs(args.load):
                result = run_capture(config, request, Console(quiet=True))
                load = os.getloadavg()[0]
            rows.append((fps, result["captured"], result["samples_per_s"], load))
        exposure_ms = calfile.load(cal).exposure_s * 1e3
    print(f"\nexposure {exposure_ms:.2f} ms (from the calibration)\n")
    print(f"{args.load} CPU-bound process(es) beside the capture\n")
    print("| fps limit | samples | samples/s | samples/s / fps limit | load average (1 min) |")
    print("|---:|---:|---:|---:|---:|")
    for fps, n, rate, load in rows:
        print(f"| {fps:g} | {n} | {rate:.1f} | {rate / fps:.3f} | {load:.1f} |")


if __name__ == "__main__":
    main()
