"""Every stage against its floor, in one table (`make bench`).

    .venv/bin/python benchmarks/speed_table.py [--repeats 3] [--steps 10] [--device auto]

One row per stage: what is measured, its floor or reference, the ratio (min / median over
interleaved repeats; one run for the bench rows, which take tens of seconds each), the goal,
and the load average (1 min) when the row was done. The floors:

- calibration: the summed frame periods the camera made it wait (max(exposure, 1/fps) each), on
  the default simulated bench and on examples/bench-demag.toml (1440×1080), in real time;
- capture: the camera's fps limit over 8 s of frames, with one CPU-bound process beside it;
- KD and NTKD steps (on `--device`): a CE step of the same student at batch 128 (8x8 digits on
  the 32x32 display; the teacher's cached logits and features are random tensors of their
  shapes, which cost the same as real ones);
- a segmentation NTKD epoch (on `--device`): a CE epoch of the shapes student (56 signed 3x3
  kernels + the up-convolution decoder, logits pooled to 4x4, batch 8);
- the teacher-feature cache: R x one batched JVP of resnet18 (28x28, R = 16, 32 samples);
- the PSF frontend's training step (its `auto` path): `F.conv2d` with the flipped kernel, for a
  small and a large PSF (on `--device`);
- the capture store's commits: a bare h5py dataset written and flushed in the same batches (the
  store also hashes every row, which alone costs 0.8x those writes, writes seven per-row
  metadata datasets and flushes twice per commit, rows before count: hence the goal of 4).

Each script named in the table prints the same figures with more detail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from capture_speed import cpu_hogs
from foreign_bench import ROOT, capture_rate, timed_calibration
from ntkd_speed import step_times, stepper
from optics_speed import CASES, case_paths, rate, training
from segmentation_speed import epoch_ratios
from store_speed import ratios as store_ratios
from teacher_cache_speed import cache_time, floor_time

from calibration import calfile
from hil.bench.config import BenchConfig, load_bench
from hil.data.datasets import digits, mnist5k
from hil.data.placement import to_display
from hil.device import add_device_argument
from hil.models.onn import ONN, StudentSpec
from hil.models.teachers import resnet18
from hil.ntkd.losses import CE, KD, NTKD

BENCHES = {"default bench": None, "1440×1080 bench": ROOT / "examples" / "bench-demag.toml"}


def load() -> float:
    return os.getloadavg()[0]


def bench_rows(tmp: Path) -> list[tuple]:
    """Calibration over its frame periods and capture over its fps limit, per bench."""
    rows = []
    for name, path in BENCHES.items():
        config = BenchConfig() if path is None else load_bench(path)
        cal, wall, frames = timed_calibration(config)
        rows.append(
            (f"calibration, {name}", "wall / summed frame periods", wall / frames.seconds,
             None, "≤ 1.5", load(), "foreign_bench.py")
        )  # fmt: skip
        cal_path = calfile.save(cal, tmp / f"{len(rows)}.h5")
        fps = 120.0 if path is None else 30.0
        with cpu_hogs(1):
            result = capture_rate(config, cal_path, fps, int(8 * fps), tmp / f"{len(rows)}s.h5")
            busy = load()
        rows.append(
            (f"capture {fps:g} fps, {name}, 1 CPU hog", "samples/s / fps limit",
             result["samples_per_s"] / fps, None, "≥ 0.97", busy, "capture_speed.py")
        )  # fmt: skip
    return rows


def step_rows(repeats: int, steps: int, device: torch.device) -> list[tuple]:
    """KD and NTKD steps over a CE step, interleaved repeats."""
    data = digits()
    batch = {
        "x": torch.as_tensor(to_display(data.images[:128], (32, 32))).to(device),
        "y": torch.as_tensor(data.labels[:128]).to(device),
    }
    logits, feats = torch.randn(128, 10, device=device), torch.randn(128, 10, 64, device=device)
    extras = {
        "ce": (CE(), dict),
        "kd": (KD(), lambda: {"teacher_logits": logits}),
        "ntkd": (NTKD(), lambda: {"teacher_features": feats}),
    }
    ratios: dict[str, list[float]] = {"kd": [], "ntkd": []}
    for _ in range(repeats):
        t = step_times(
            {
                k: stepper(ONN(StudentSpec()).to(device), loss, batch, e)
                for k, (loss, e) in extras.items()
            },
            steps,
            device,
        )
        for k in ratios:
            ratios[k].append(t[k] / t["ce"])
    busy = load()
    return [
        ("KD step, batch 128", "CE step", min(ratios["kd"]), statistics.median(ratios["kd"]),
         "≤ 1.2", busy, "ntkd_speed.py"),
        ("NTKD step, batch 128", "CE step", min(ratios["ntkd"]),
         statistics.median(ratios["ntkd"]), "≤ 1.5", busy, "ntkd_speed.py"),
    ]  # fmt: skip


def cache_row(repeats: int, device: torch.device) -> tuple:
    """The teacher-feature cache over R x one batched JVP, 28x28 inputs."""
    teacher = resnet18(1, 10).eval().to(device)
    raw = torch.as_tensor(mnist5k().images[:32]).to(device)
    ratios = []
    for _ in range(repeats):
        floor = floor_time(teacher, raw, 16)
        ratios.append(cache_time(teacher, raw, 16)[0] / floor)
    return (
        "teacher cache, 28x28, R = 16", "R × batched JVP", min(ratios),
        statistics.median(ratios), "≤ 1.3", load(), "teacher_cache_speed.py",
    )  # fmt: skip


def segmentation_row(repeats: int, device: torch.device) -> tuple:
    """A shapes NTKD epoch over a CE epoch, pool 4."""
    found, _ = epoch_ratios(repeats, 4, device)
    return (
        "segmentation NTKD epoch, pool 4", "CE epoch", min(found), statistics.median(found),
        "≤ 3", load(), "segmentation_speed.py",
    )  # fmt: skip


def optics_rows(repeats: int, device: torch.device) -> list[tuple]:
    """The frontend's training step (`auto`) over conv2d's, per case, interleaved repeats."""
    rows = []
    for name, m, k, size in CASES:
        paths = {p: training(f) for p, f in case_paths(m, k, size, 128, device).items()}
        found = [
            rate(paths["conv2d"], 128, 0.2, device) / rate(paths["auto"], 128, 0.2, device)
            for _ in range(repeats)
        ]
        rows.append(
            (f"PSF frontend training step, {name}", "F.conv2d", min(found),
             statistics.median(found), "≤ 1.1", load(), "optics_speed.py")
        )  # fmt: skip
    return rows


def store_row(repeats: int) -> tuple:
    """Capture-store commits over plain h5py writes of the same rows."""
    found, _ = store_ratios(960, 24, repeats)
    return (
        "capture store, 24 rows per commit", "plain h5py writes", min(found),
        statistics.median(found), "≤ 4", load(), "store_speed.py",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of step rows")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    add_device_argument(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{os.cpu_count()} CPU threads, torch {torch.__version__}, device {args.device}\n")
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_rows(Path(tmp))
    rows += step_rows(args.repeats, args.steps, args.device)
    rows.append(segmentation_row(args.repeats, args.device))
    rows.append(cache_row(2, args.device))
    rows += optics_rows(args.repeats, args.device)
    rows.append(store_row(args.repeats))
    print("| stage | floor or reference | ratio (min / median) | goal | met | load | script |")
    print("| --- | --- | ---: | --- | --- | ---: | --- |")
    for stage, ref, low, mid, goal, busy, script in rows:
        mid = low if mid is None else mid
        bound = float(goal.split()[-1])
        met = mid <= bound if goal.startswith("≤") else mid >= bound
        cells = [stage, ref, f"{low:.3f} / {mid:.3f}", goal, "yes" if met else "no"]
        print("| " + " | ".join([*cells, f"{busy:.1f}", script]) + " |")


if __name__ == "__main__":
    main()
