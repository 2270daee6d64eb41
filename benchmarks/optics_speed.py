"""Throughput of the PSF frontend against direct conv2d computing the same result.

    .venv/bin/python benchmarks/optics_speed.py [--batch N] [--seconds S] [--device auto]

For each case it prints images/s of the frontend's FFT path (cached PSF spectrum), of its `auto`
choice, and of `torch.nn.functional.conv2d` with the flipped kernel, all in one run, as ratios to
conv2d, inference and a training step (forward + backward) alike. Numbers depend on the machine;
the ratios are what the README reports. Last, the time the simulated bench takes to render one
camera frame (`SimWorld.irradiance`, and `capture` with the sensor noise) of a lab-like bench,
which the simulated bench computes on the CPU whatever `--device` says.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from hil.device import add_device_argument
from sim.layout import TileLayout
from sim.params import SimParams
from sim.psf_frontend import PSFFrontend
from sim.world import SimWorld

CASES = [
    ("8 signed 7x7 kernels, 28x28 images", 8, 7, 28),
    ("16 signed 28x28 PSFs, 64x64 images", 16, 28, 64),
]


# 8 signed 7×7 kernels on a 32×32 grid shown 8x on a 1920×1080 display, imaged at 0.31x onto a
# 1440×1080 sensor: 16 sub-images of ~79 px in a rotated, jittered, distorted grid.
BENCH = {
    "display": {"width": 1920, "height": 1080},
    "sensor": {"width": 1440, "height": 1080},
    "optics": {
        "magnification": 0.31,
        "tile_pitch_px": [340, 260],
        "grid_rotation_deg": 1.5,
        "tile_jitter_px": 2.0,
        "distortion_k1": 0.02,
        "tile_vignetting": 0.1,
        "hot_pixels": 1e-4,
    },
}


def frame_times(trials: int = 30) -> None:
    """Best and median ms of one noise-free and one noisy frame of the BENCH world."""
    psfs = PSFFrontend(8, 7, 1, True, trainable=False, seed=0).psfs
    t0 = time.perf_counter()
    params, layout = SimParams.model_validate(BENCH), TileLayout.grid(16, (32, 32), 4, True)
    world = SimWorld(params, psfs, True, layout, display_scale=8)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    (h, w), (ox, oy) = world.display_shape, world.display_origin
    levels = np.zeros((h, w), np.float32)
    levels[oy : oy + 256, ox : ox + 256] = np.kron(rng.random((32, 32)), np.ones((8, 8)))
    world.show(levels)
    world.set_source("light", True, 1.0)
    fh, fw = world.frame_shape
    print(f"\nsimulated bench frame {fw}x{fh}, 16 sub-images at magnification 0.31 x scale 8")
    print(f"{'':38s} built in {build:.2f} s, render matrix {world.render_lit.nnz} non-zeros")
    for name, fn in (("irradiance", world.irradiance), ("capture", lambda: world.capture(0.01))):
        fn()
        times = []
        for _ in range(trials):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        print(f"{name:38s} best {min(times):6.1f} ms   median {np.median(times):6.1f} ms")


def case_paths(m: int, k: int, size: int, batch: int, device: torch.device) -> dict:
    """The same signed convolution of a random batch three ways, each a call: conv2d with the
    flipped kernel, the frontend's FFT path and its `auto` choice."""
    x = torch.rand(batch, 1, size, size).to(device)
    fft = PSFFrontend(m, k, 1, True, seed=0, method="fft").to(device)
    auto = PSFFrontend(m, k, 1, True, seed=0, method="auto").to(device)
    auto.load_state_dict(fft.state_dict())
    return {
        "conv2d": lambda: F.conv2d(x, fft.kernel.flip(-2, -1), padding="same"),
        "fft": lambda: fft(x),
        "auto": lambda: auto(x),
    }


def training(fn):
    """A training step (forward and backward) of one of `case_paths`."""
    return lambda: fn().square().mean().backward()


def rate(fn, batch: int, seconds: float, device: torch.device) -> float:
    """Best-of-3 images/s of fn(), each trial running for about `seconds` (on a GPU, until
    its queue is done)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm up (plans, caches)
    best = 0.0
    for _ in range(3):
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        sync()
        best = max(best, n * batch / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=1.0, help="per timing trial")
    add_device_argument(ap)
    args = ap.parse_args()
    device = args.device
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"{platform.processor()}"
    )
    print(f"batch {args.batch}, best of 3 trials of {args.seconds} s each\n")
    header = f"{'case':38s} {'mode':9s} {'conv2d':>10s} {'fft':>10s} {'auto':>10s}"
    print(header + f" {'fft/conv2d':>11s} {'auto/conv2d':>12s}")
    for name, m, k, size in CASES:
        paths = case_paths(m, k, size, args.batch, device)
        with torch.no_grad():
            ref = paths["conv2d"]()
            err = float((paths["fft"]() - ref).norm() / ref.norm())
            infer = [rate(f, args.batch, args.seconds, device) for f in paths.values()]
        train = [rate(training(f), args.batch, args.seconds, device) for f in paths.values()]
        for mode, (c, f, a) in (("inference", infer), ("training", train)):
            print(f"{name:38s} {mode:9s} {c:10.0f} {f:10.0f} {a:10.0f} {f / c:11.2f} {a / c:12.2f}")
        print(f"{'':38s} FFT vs conv2d relative error {err:.1e}")
    frame_times()


if __name__ == "__main__":
    main()
