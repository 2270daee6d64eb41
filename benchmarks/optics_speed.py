"""Throughput of the PSF frontend against direct conv2d computing the same result.

    .venv/bin/python benchmarks/optics_speed.py [--batch N] [--seconds S]

For each case it prints images/s of the frontend's FFT path (cached PSF spectrum), of its `auto`
choice, and of `torch.nn.functional.conv2d` with the flipped kernel, all in one run, as ratios to
conv2d, inference and a training step (forward + backward) alike. Numbers depend on the machine;
the ratios are what the README reports.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
import torch.nn.functional as F

from sim.psf_frontend import PSFFrontend

CASES = [
    ("8 signed 7x7 kernels, 28x28 images", 8, 7, 28),
    ("16 signed 28x28 PSFs, 64x64 images", 16, 28, 64),
]


def rate(fn, batch: int, seconds: float) -> float:
    """Best-of-3 images/s of fn(), each trial running for about `seconds`."""
    fn()  # warm up (plans, caches)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            fn()
            n += 1
        best = max(best, n * batch / elapsed)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=1.0, help="per timing trial")
    args = ap.parse_args()
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print(f"batch {args.batch}, best of 3 trials of {args.seconds} s each\n")
    header = f"{'case':38s} {'mode':9s} {'conv2d':>10s} {'fft':>10s} {'auto':>10s}"
    print(header + f" {'fft/conv2d':>11s} {'auto/conv2d':>12s}")
    for name, m, k, size in CASES:
        x = torch.rand(args.batch, 1, size, size)
        fft = PSFFrontend(m, k, 1, True, seed=0, method="fft")
        auto = PSFFrontend(m, k, 1, True, seed=0, method="auto")
        auto.load_state_dict(fft.state_dict())
        paths = {
            "conv2d": lambda x=x, f=fft: F.conv2d(x, f.kernel.flip(-2, -1), padding="same"),
            "fft": lambda x=x, f=fft: f(x),
            "auto": lambda x=x, f=auto: f(x),
        }
        with torch.no_grad():
            ref = paths["conv2d"]()
            err = float((paths["fft"]() - ref).norm() / ref.norm())
            infer = [rate(f, args.batch, args.seconds) for f in paths.values()]
        train = [
            rate(lambda f=f: f().square().mean().backward(), args.batch, args.seconds)
            for f in paths.values()
        ]
        for mode, (c, f, a) in (("inference", infer), ("training", train)):
            print(f"{name:38s} {mode:9s} {c:10.0f} {f:10.0f} {a:10.0f} {f / c:11.2f} {a / c:12.2f}")
        print(f"{'':38s} FFT vs conv2d relative error {err:.1e}")


if __name__ == "__main__":
    main()
